"""The socket edge of the LAN PCP and NAT-PMP server (docs/lan-pcp.md, "The datagram path").

One UDP socket on the LAN address, port 5351, bound to that address so answers leave
from the address the request was sent to (RFC 6887 §8.3); the sans-I/O logic in
:mod:`controld.pcpserver.pcp` decides, the core (:class:`controld.core.service.Iwf`)
maps, and one asyncio timer drives the :class:`~controld.pcpserver.epoch.Announcer`.
Bounded: a per-host token bucket before parsing, at most ``max_inflight`` requests
waiting on the core (more are dropped, RFC 6887 §8.2: an overloaded server MAY drop).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from controld.core.model import CoreError, CreateRequest, FrontEnd, NotOwner, Origin
from controld.core.service import Iwf
from controld.pcpserver import pcp
from controld.pcpserver.epoch import Announcer, EpochRecord, ServerEpoch
from controld.pcpserver.events import (
    Address,
    AddressWanted,
    AnnounceWanted,
    DeleteWanted,
    Done,
    Drop,
    Granted,
    MapWanted,
    Outcome,
    PeerWanted,
    Refused,
    Reply,
    Wanted,
    refusal,
)
from controld.pcpserver.ratelimit import HostRateLimiter
from shared.const import PCP_MAX_PACKET, PCP_SERVER_PORT
from shared.pcp import Result

log = logging.getLogger("controld.pcpserver")

EPOCH_META = "lan_epoch"  # table meta key: the epoch record kept over a restart (RFC 6887 §8.5)


@dataclass(frozen=True)
class LanServerConfig:
    """The edge's settings (rows of shared/config.py's OPTIONS)."""

    policy: pcp.ServerPolicy
    rate: float
    burst: int
    max_lifetime: int
    max_hosts: int = 1024  # hosts whose bucket is remembered (LRU beyond)
    max_inflight: int = 256  # requests waiting on the core at once


def _filter_host(event: MapWanted) -> str | None:
    """FILTER as the core's one remote host: "" for none or prefix 0, None if not installable (§13.3)."""
    if not event.filters:
        return ""
    if len(event.filters) != 1:
        return None
    f = event.filters[0]
    if f.prefix_len == 0:
        return ""
    peer = pcp.plain(f.peer_ip)
    if f.peer_port != 0 or peer.version != 4 or f.prefix_len != 128:
        return None
    return str(peer)


class LanPcpServer(asyncio.DatagramProtocol):
    """PCP and NAT-PMP for LAN hosts on one socket, proxied to the core."""

    def __init__(self, core: Iwf, cfg: LanServerConfig, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.core = core
        self.cfg = cfg
        self.clock = clock
        self.wall = wall
        now = clock()
        saved = _load_record(core)
        self.epoch = ServerEpoch.after_restart(now, wall(), saved, core.restored_all)
        self.announcer = Announcer(self.epoch, pcp=cfg.policy.pcp, natpmp=cfg.policy.natpmp)
        self.limiter = HostRateLimiter(cfg.rate, cfg.burst, cfg.max_hosts)
        self.transport: asyncio.DatagramTransport | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.restarted = not (core.restored_all and saved is not None)

    async def start(self, address: str, port: int = PCP_SERVER_PORT) -> int:
        """Bind ``address``:``port`` (0: any, for tests); announce if our state did not survive."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        # announcements leave by the LAN interface, one hop (RFC 6887 §14.1.3)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        await loop.create_datagram_endpoint(lambda: self, sock=sock)  # connection_made keeps the transport
        self.core.watch_state_loss(self.state_lost)
        if self.restarted:
            self.state_lost("our restart did not keep every mapping")
        return int(sock.getsockname()[1])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """asyncio hands over the socket's transport."""
        self.transport = cast(asyncio.DatagramTransport, transport)  # (3.11's is not a subclass)

    def close(self) -> None:
        """Stop serving; the epoch is kept for the next start (RFC 6887 §8.5)."""
        if self._timer is not None:
            self._timer.cancel()
        for t in self._inflight:
            t.cancel()
        rec = self.epoch.record(self.clock(), self.wall())
        self.core.table.set_meta(EPOCH_META, f"{rec.seconds} {rec.wall}")
        if self.transport is not None:
            self.transport.close()

    # --- announcements ------------------------------------------------------------------

    def state_lost(self, why: str) -> None:
        """Reset the epoch and multicast ANNOUNCE and NAT-PMP's address notice (RFC 6887 §14.1.3,
        RFC 6886 §3.2.1)."""
        ip = self.core.outer_address("")
        external = ipaddress.IPv4Address(ip) if ip else None
        log.info("LAN PCP/NAT-PMP epoch reset (%s): announcing to the LAN", why)
        self.announcer.lose_state(self.clock(), external)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.announcer.next_deadline()
        if due is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, due - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        ip = self.core.outer_address("")
        self.announcer.set_external(ipaddress.IPv4Address(ip) if ip else None)
        for d in self.announcer.on_timer(self.clock()):
            self._send(d.payload, (d.host, d.port))
        self._arm()

    # --- requests -----------------------------------------------------------------------

    def _send(self, payload: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(payload, addr)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        now = self.clock()
        host = addr[0]
        if not self.limiter.allow(host, now):
            log.debug("dropped a datagram from %s: over its rate (docs/lan-pcp.md)", host)
            return
        try:
            source = ipaddress.ip_address(host)
        except ValueError:
            return
        handled = pcp.handle_datagram(data[:PCP_MAX_PACKET + 4], source, addr[1], self.epoch.seconds(now),
                                      self.cfg.policy)
        if isinstance(handled, Drop):
            log.debug("dropped a datagram from %s: %s", host, handled.reason)
        elif isinstance(handled, Reply):
            log.info("answered %s at once: %s", host, handled.reason)
            self._send(handled.payload, addr)
        elif isinstance(handled, AnnounceWanted | AddressWanted):
            self._send(pcp.respond(handled, self._address(handled), self.epoch.seconds(now)), addr)
        elif len(self._inflight) >= self.cfg.max_inflight:
            log.warning("dropped a request from %s: %d requests in progress", host, len(self._inflight))
        else:
            task = asyncio.get_running_loop().create_task(self._serve(handled, addr))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _address(self, event: AnnounceWanted | AddressWanted) -> Outcome:
        if isinstance(event, AnnounceWanted):
            return Done()  # never relayed upstream (RFC 7648)
        ip = self.core.outer_address(str(event.requester.address))
        # no external address known: result 3, Network Failure (RFC 6886 §3.5)
        return Address(ipaddress.IPv4Address(ip)) if ip else Refused(Result.NETWORK_FAILURE)

    async def _serve(self, event: Wanted, addr: tuple[str, int]) -> None:
        try:
            outcome = await self._decide(event)
        except CoreError as exc:
            lifetime = exc.lifetime if isinstance(exc, NotOwner) else None
            log.info("refused %s from %s: %s", type(event).__name__, addr[0], exc)
            outcome = refusal(event, exc.kind.value, exc.pcp_result, lifetime)
        except Exception:  # a daemon never dies of one request (common standards)
            log.exception("request from %s failed", addr[0])
            outcome = Refused(Result.NETWORK_FAILURE)
        self._send(pcp.respond(event, outcome, self.epoch.seconds(self.clock())), addr)

    def _origin(self, event: MapWanted | DeleteWanted) -> Origin:
        who = event.requester
        front = FrontEnd.PCP if who.front_end == "pcp" else FrontEnd.NATPMP
        # THIRD_PARTY from a manager: the mapping is the named host's (docs/lan-pcp.md, Ownership)
        client = str(event.internal_ip) if event.third_party else str(who.address)
        return Origin(front, client, 1, who.nonce)

    async def _decide(self, event: Wanted) -> Outcome:
        if isinstance(event, PeerWanted):
            return Refused(Result.UNSUPP_OPCODE)
        if isinstance(event, AnnounceWanted | AddressWanted):
            return self._address(event)
        if event.internal_ip.version != 4:
            return Refused(Result.UNSUPP_PROTOCOL)  # not reachable: the socket is IPv4 only
        origin = self._origin(event)
        if isinstance(event, DeleteWanted):
            if event.internal_port == 0 and origin.front_end == FrontEnd.NATPMP:
                await self.core.lan_delete_all(origin, event.protocol)
            else:
                try:
                    await self.core.lan_delete(origin, event.protocol, str(event.internal_ip), event.internal_port)
                except CoreError as exc:
                    return refusal(event, exc.kind.value, exc.pcp_result,
                                   exc.lifetime if isinstance(exc, NotOwner) else None)
            return Done()
        remote = _filter_host(event)
        if remote is None:
            return Refused(Result.EXCESSIVE_REMOTE_PEERS)
        outer = self.core.outer_address(origin.client)
        if event.prefer_failure and (event.family != 4 or (event.suggested_ip is not None and outer
                                                           and str(event.suggested_ip) != outer)):
            return Refused(Result.CANNOT_PROVIDE_EXTERNAL)  # we cannot give that address (§13.2)
        req = CreateRequest(event.protocol, event.suggested_port, str(event.internal_ip), event.internal_port,
                            min(event.lifetime, self.cfg.max_lifetime), event.description or "",
                            event.prefer_failure, remote)
        grant = await self.core.lan_map(origin, req)
        if not grant.ext_ip:
            return Refused(Result.NETWORK_FAILURE)  # no external address known yet
        log.debug("%s %s -> %s:%d for %d s", origin.front_end.value, grant.mapping.describe(), grant.ext_ip,
                 grant.ext_port, grant.lifetime)
        return Granted(ipaddress.ip_address(grant.ext_ip), grant.ext_port, grant.lifetime, grant.mapping.description)


def _load_record(core: Iwf) -> EpochRecord | None:
    raw = core.table.get_meta(EPOCH_META)
    try:
        seconds, wall = (raw or "").split()
        return EpochRecord(int(seconds), float(wall))
    except ValueError:
        return None
