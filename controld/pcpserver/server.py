"""The socket edge of the LAN PCP and NAT-PMP server (docs/lan-pcp.md, "The datagram path").

One UDP socket on the LAN address, port 5351, and one on each of the LAN interface's IPv6
addresses (PCP only, docs/lan-pcp.md "PCP over IPv6"), each bound to its address so answers
leave from the address the request was sent to (RFC 6887 §8.3); the sans-I/O logic in
:mod:`controld.pcpserver.pcp` decides, the core maps (:class:`controld.core.service.Iwf` for
IPv4, :class:`controld.core.pinhole.Pinholes` for a MAP with an IPv6 internal address, see
:mod:`controld.pcpserver.firewall`), and one asyncio timer drives the
:class:`~controld.pcpserver.epoch.Announcer`.
Bounded: a per-host token bucket before parsing, at most ``max_inflight`` requests
waiting on the core (more are dropped, RFC 6887 §8.2: an overloaded server MAY drop).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from controld.core.model import CoreError, CreateRequest, FrontEnd, NotOwner, Origin
from controld.core.pinhole import PinholeError, Pinholes
from controld.core.service import Iwf
from controld.pcpserver import firewall, pcp
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
    remote_filter,
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


def lan6_hosts(addresses: Iterable[str], ifname: str) -> list[str]:
    """The LAN interface's IPv6 addresses to serve: every unicast one (global and ULA as they
    are, link-local with the interface as scope); loopback and multicast never."""
    out: list[str] = []
    for raw in addresses:
        ip = ipaddress.IPv6Address(raw)
        if ip.is_multicast or ip.is_loopback or ip.is_unspecified:
            continue
        out.append(f"{ip}%{ifname}" if ip.is_link_local else str(ip))
    return out


class _Endpoint(asyncio.DatagramProtocol):
    """One bound UDP socket of the server: the LAN IPv4 address or one LAN IPv6 address."""

    def __init__(self, server: LanPcpServer, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port  # as bound (tests bind port 0)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """asyncio hands over the socket's transport."""
        self.transport = cast(asyncio.DatagramTransport, transport)  # (3.11's is not a subclass)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server.received(data, addr, self)

    def send(self, payload: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(payload, addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class LanPcpServer:
    """PCP and NAT-PMP for LAN hosts, proxied to the core; PCP MAPs for IPv6 internal addresses
    become pinholes (``pinholes`` None: no IPv6 firewall, NOT_AUTHORIZED)."""

    def __init__(self, core: Iwf, cfg: LanServerConfig, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, pinholes: Pinholes | None = None) -> None:
        self.core = core
        self.cfg = cfg
        self.pinholes = pinholes
        self.clock = clock
        self.wall = wall
        now = clock()
        saved = _load_record(core)
        self.epoch = ServerEpoch.after_restart(now, wall(), saved, core.restored_all)
        self.announcer = Announcer(self.epoch, pcp=cfg.policy.pcp, natpmp=cfg.policy.natpmp)
        self.limiter = HostRateLimiter(cfg.rate, cfg.burst, cfg.max_hosts)
        self.v4: _Endpoint | None = None
        self.v6: dict[str, _Endpoint] = {}  # by the host it is bound to ("fe80::1%br-lan" for link-local)
        self._ifindex6 = 0  # the LAN interface: where IPv6 announcements leave
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
        v4 = self.v4 = _Endpoint(self, address, int(sock.getsockname()[1]))
        await loop.create_datagram_endpoint(lambda: v4, sock=sock)
        self.core.watch_state_loss(self.state_lost)
        if self.restarted:
            self.state_lost("our restart did not keep every mapping")
        return v4.port

    async def listen6(self, hosts: Iterable[str], ifname: str, port: int = PCP_SERVER_PORT) -> None:
        """Serve PCP on exactly ``hosts`` (see :func:`lan6_hosts`) of ``ifname``: new addresses get
        a socket, gone ones lose theirs; one that cannot be bound yet (DAD) is tried at the next call."""
        want = set(hosts)
        for host in [h for h in self.v6 if h not in want]:
            self.v6.pop(host).close()
            log.info("PCP no longer served on [%s]:%d (address gone)", host, port)
        if want - self.v6.keys():
            self._ifindex6 = socket.if_nametoindex(ifname)
        for host in sorted(want - self.v6.keys()):
            try:
                await self._bind6(host, port)
            except OSError as exc:
                log.debug("PCP on [%s]:%d not yet: %s", host, port, exc)
                continue
            log.info("PCP on [%s]:%d", host, port)
        self.announcer.ipv6 = bool(self.v6)  # ANNOUNCE to ff02::1 too (RFC 6887 §14.1.3)

    async def _bind6(self, host: str, port: int) -> None:
        # bytes: a str host goes through the idna codec (~0.3 MiB imported) for a numeric address
        sockaddr = socket.getaddrinfo(host.encode(), port, socket.AF_INET6, socket.SOCK_DGRAM,
                                      flags=socket.AI_NUMERICHOST)[0][4]
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # clients' addresses stay IPv6
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self._ifindex6)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        except OSError:
            sock.close()
            raise
        ep = self.v6[host] = _Endpoint(self, host, int(sock.getsockname()[1]))
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: ep, sock=sock)

    def close(self) -> None:
        """Stop serving; the epoch is kept for the next start (RFC 6887 §8.5)."""
        if self._timer is not None:
            self._timer.cancel()
        for t in self._inflight:
            t.cancel()
        rec = self.epoch.record(self.clock(), self.wall())
        self.core.table.set_meta(EPOCH_META, f"{rec.seconds} {rec.wall}")
        self.close_sockets()

    def close_sockets(self) -> None:
        """Close every socket (a start that failed half-way keeps no epoch record)."""
        for ep in [self.v4, *self.v6.values()]:
            if ep is not None:
                ep.close()
        self.v4 = None
        self.v6.clear()

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
            if ":" not in d.host:
                if self.v4 is not None:
                    self.v4.send(d.payload, (d.host, d.port))
                continue
            for ep in self.v6.values():  # from each address, so a client hears the one it asked (§14.1.3)
                ep.send(d.payload, (d.host, d.port, 0, self._ifindex6))
        self._arm()

    # --- requests -----------------------------------------------------------------------

    def received(self, data: bytes, addr: Any, endpoint: _Endpoint) -> None:
        """One datagram on one of our sockets; answers go back through the same socket."""
        now = self.clock()
        host = addr[0].split("%", 1)[0]  # a link-local source's scope is the socket's interface
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
            endpoint.send(handled.payload, addr)
        elif isinstance(handled, AnnounceWanted | AddressWanted):
            endpoint.send(pcp.respond(handled, self._address(handled), self.epoch.seconds(now)), addr)
        elif len(self._inflight) >= self.cfg.max_inflight:
            log.warning("dropped a request from %s: %d requests in progress", host, len(self._inflight))
        else:
            task = asyncio.get_running_loop().create_task(self._serve(handled, addr, endpoint))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _address(self, event: AnnounceWanted | AddressWanted) -> Outcome:
        if isinstance(event, AnnounceWanted):
            return Done()  # never relayed upstream (RFC 7648)
        ip = self.core.outer_address(str(event.requester.address))
        # no external address known: result 3, Network Failure (RFC 6886 §3.5)
        return Address(ipaddress.IPv4Address(ip)) if ip else Refused(Result.NETWORK_FAILURE)

    async def _serve(self, event: Wanted, addr: Any, endpoint: _Endpoint) -> None:
        try:
            outcome = await self._decide(event)
        except CoreError as exc:
            lifetime = exc.lifetime if isinstance(exc, NotOwner) else None
            log.info("refused %s from %s: %s", type(event).__name__, addr[0], exc)
            outcome = refusal(event, exc.kind.value, exc.pcp_result, lifetime)
        except Exception:  # a daemon never dies of one request (common standards)
            log.exception("request from %s failed", addr[0])
            outcome = Refused(Result.NETWORK_FAILURE)
        endpoint.send(pcp.respond(event, outcome, self.epoch.seconds(self.clock())), addr)

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
        if event.internal_ip.version == 6:  # IPv6 firewall mode (docs/pinholes.md)
            return await self._pinhole(event)
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
        remote = remote_filter(event.filters, 4)
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

    async def _pinhole(self, event: MapWanted | DeleteWanted) -> Outcome:
        """A MAP for an IPv6 internal address: a pinhole through the pinhole core (docs/pinholes.md)."""
        if self.pinholes is None:
            return Refused(Result.NOT_AUTHORIZED)  # no IPv6 firewall to open (FirewallDisabled)
        internal, who = str(event.internal_ip), firewall.owner(event)
        try:
            if isinstance(event, DeleteWanted):
                await self.pinholes.lan_delete(who, firewall.nonce(event), internal, event.internal_port,
                                               event.protocol)
                return Done()
            ask = firewall.pinhole_ask(event, self.cfg.max_lifetime)
            if isinstance(ask, Refused):
                return ask
            p = await self.pinholes.lan_map(ask.owner, ask.nonce, ask.int_client, ask.int_port, ask.protocol,
                                            ask.remote_host, ask.lease)
        except PinholeError as exc:
            outcome = firewall.pinhole_refusal(event, exc.kind, exc.lifetime)
            if isinstance(outcome, Refused):
                log.info("refused %s of [%s]:%d from %s: %s", type(event).__name__, internal, event.internal_port,
                         event.requester.address, exc)
            return outcome
        return firewall.granted(event, p.lease)


def _load_record(core: Iwf) -> EpochRecord | None:
    raw = core.table.get_meta(EPOCH_META)
    try:
        seconds, wall = (raw or "").split()
        return EpochRecord(int(seconds), float(wall))
    except ValueError:
        return None
