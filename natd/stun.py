"""The socket edge of STUN (RFC 8489 Binding; the codec is shared/stun.py): natd asks a STUN
server, from its WAN address, which address the Internet sees, so controld can report the
outer NAT's address in a double NAT without PCP (docs/stun.md).

One probe at start, one on every WAN address change, one every ``stun_interval`` seconds;
each result is published (:class:`shared.wire.StunResult`) and the last one repeated every
``REPEAT_S`` so a controld that subscribes late learns it without asking.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from shared import stun, wire

log = logging.getLogger("natd.stun")

RESOLVE_S = 5.0  # bound on resolving the server's name
REPEAT_S = 10.0  # re-publish the last answer this often (PUB/SUB keeps no history)
TRIES = 5  # RFC 8489 §6.2.1 schedule cut to 5 sends: an answer or a verdict within 11.5 s


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: the retries decide
        log.debug("stun socket error: %s", exc)


async def resolve(host: str, port: int) -> str:
    """The server's first IPv4 address (a literal needs no lookup)."""
    try:
        socket.inet_aton(host)
        if host.count(".") == 3:
            return host
    except OSError:
        pass
    infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
        host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM), RESOLVE_S)
    if not infos:
        raise OSError(f"no IPv4 address for {host}")
    return str(infos[0][4][0])


async def probe(wan_ip: str, server: str, port: int, rto: float = stun.RTO, tries: int = TRIES) -> wire.StunResult:
    """One Binding transaction from ``wan_ip`` (any port) to ``server``; never raises."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[stun.BindingResponse] = loop.create_future()
    transport = None
    local_port = 0
    try:
        addr = await resolve(server, port)
        t = stun.BindingTransaction(time.monotonic(), rto=rto, tries=tries)

        def on_datagram(data: bytes, src: tuple[str, int]) -> None:
            if src[:2] != (addr, port) or got.done():
                return  # only the server we asked (RFC 8489 §6.3 matches by transaction too)
            r = t.receive(data)
            if r is not None:
                got.set_result(r)

        transport, _ = await loop.create_datagram_endpoint(lambda: _Proto(on_datagram), local_addr=(wan_ip, 0))
        local_port = transport.get_extra_info("sockname")[1]
        while True:  # bounded: the transaction gives up after `tries` sends
            pkt, nxt = t.poll(time.monotonic())
            if pkt is not None:
                transport.sendto(pkt, (addr, port))
            if nxt is None:
                break
            try:
                r = await asyncio.wait_for(asyncio.shield(got), max(0.0, nxt - time.monotonic()))
            except TimeoutError:
                continue
            if r.mapped is None:
                code, reason = r.error or (0, "")
                return wire.StunResult(server, wan_ip, None, 0, local_port, f"error {code} {reason}".strip())
            ip, eport = r.mapped
            if ":" in ip:
                return wire.StunResult(server, wan_ip, None, 0, local_port, f"IPv6 answer {ip}")
            return wire.StunResult(server, wan_ip, ip, eport, local_port)
        return wire.StunResult(server, wan_ip, None, 0, local_port, f"no answer after {tries} tries")
    except (OSError, TimeoutError) as exc:
        return wire.StunResult(server, wan_ip, None, 0, local_port, f"{type(exc).__name__}: {exc}"[:200])
    finally:
        if transport is not None:
            transport.close()


class StunProbe:
    """Runs the probes for natd: ``settings()`` gives (server or None, port, interval) live
    from the config, ``wan_ip()`` the current WAN address, ``publish`` sends the event."""

    def __init__(self, settings: Callable[[], tuple[str | None, int, float]], wan_ip: Callable[[], str | None],
                 publish: Callable[[wire.Message], None]) -> None:
        self.settings = settings
        self.wan_ip = wan_ip
        self.publish = publish
        self.last: wire.StunResult | None = None
        self._wake = asyncio.Event()

    def kick(self) -> None:
        """Probe now (WAN address changed, config reloaded)."""
        self._wake.set()

    async def run(self) -> None:
        """Probe, publish, repeat; idle (but awake to kicks) while no server is configured."""
        next_probe = 0.0
        while True:
            woken = self._wake.is_set()
            self._wake.clear()
            server, port, interval = self.settings()
            wan = self.wan_ip()
            if not server or not wan:
                self.last = None
                wait = REPEAT_S
            elif woken or time.monotonic() >= next_probe:
                result = await probe(wan, server, port)
                if self.last is None or (result.external_ip, result.error) != (self.last.external_ip, self.last.error):
                    if result.external_ip:
                        log.info("stun %s:%d: %s:%d is seen as %s:%d", server, port, wan, result.local_port,
                                 result.external_ip, result.external_port)
                    else:
                        log.warning("stun %s:%d from %s: %s", server, port, wan, result.error)
                self.last = result
                self.publish(result)
                next_probe = time.monotonic() + interval
                wait = min(REPEAT_S, interval)
            else:
                if self.last is not None:
                    self.publish(self.last)
                wait = min(REPEAT_S, max(0.0, next_probe - time.monotonic()))
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
