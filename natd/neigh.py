"""Is an IPv4 and an IPv6 address one LAN host? The router's neighbour table answers (rtnetlink).

controld serves UPnP over IPv4, so a control point calls from its IPv4 address while the
pinhole it asks for names its IPv6 one; secure mode (docs/pinholes.md "Policy") lets it
through only when both are the same host. Two addresses are one host when both have a
neighbour entry on the LAN interface with the same link-layer address in a usable state
(REACHABLE, STALE, DELAY, PROBE, PERMANENT; never INCOMPLETE or FAILED): one RTM_GETNEIGH dump
per family, stdlib netlink (shared/netlink.py), bounded in entries and time.

A host that has not spoken IPv6 with the router yet has no IPv6 entry. Then natd solicits it
once: a zero-length UDP datagram to the discard port of each unknown address (only addresses
inside the LAN's subnets and prefixes), which makes the kernel resolve the neighbour (ARP or
Neighbor Solicitation, RFC 4861 §7.2), and reads the table again once, SOLICIT_WAIT_S later.
Solicitations are rate limited overall and per address, so requests cannot make natd flood
the LAN. Pure parts (:func:`decode`, :func:`usable_table`, :func:`verdict`) take bytes and
return facts; :class:`SameHostCheck` is the edge on natd's loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from shared import netlink as nl
from shared import wire
from shared.const import DISCARD_PORT
from shared.guard import RateLimit

log = logging.getLogger("natd.neigh")

RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NDA_DST, NDA_LLADDR = 1, 2
NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE, NUD_DELAY = 0x01, 0x02, 0x04, 0x08
NUD_PROBE, NUD_FAILED, NUD_NOARP, NUD_PERMANENT = 0x10, 0x20, 0x40, 0x80
USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT
_NDMSG = struct.Struct("=BBHiHBB")  # ndmsg: family, pad, pad, ifindex, state, flags, type

MAX_NEIGHBOURS = 65536  # bound on one dump (gc_thresh3 defaults to 1024 per family)
DUMP_TIMEOUT_S = 1.0
RECV_BYTES = 1 << 16
SOLICIT_WAIT_S = 0.2  # one re-read after a solicitation: ND answers within ms on a LAN
SOLICIT_BURST, SOLICIT_WINDOW_S = 32, 1.0  # at most this many solicitations per window, overall
SOLICIT_AGAIN_S = 5.0  # an address is solicited at most once in this time
MAX_RECENT = 4096  # bound on the addresses remembered as recently solicited

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Neighbour:
    """One neighbour entry: interface index, IP address, link-layer address, NUD state bits."""

    ifindex: int
    ip: Address
    lladdr: bytes
    state: int

    @property
    def usable(self) -> bool:
        """A resolved (or being re-confirmed) entry that names a link-layer address."""
        return bool(self.state & USABLE) and any(self.lladdr)


def dump_request(family: int, seq: int = 1) -> bytes:
    """An RTM_GETNEIGH dump of ``family`` (AF_INET or AF_INET6)."""
    return nl.message(RTM_GETNEIGH, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, _NDMSG.pack(family, 0, 0, 0, 0, 0, 0))


def decode(msg: nl.Msg) -> Neighbour | None:
    """An RTM_NEWNEIGH of IPv4 or IPv6, or None (another type or family, truncated, no address)."""
    if msg.type != RTM_NEWNEIGH or len(msg.payload) < _NDMSG.size:
        return None
    family, _p1, _p2, ifindex, state, _flags, _type = _NDMSG.unpack_from(msg.payload)
    at = nl.attrs(msg.payload, _NDMSG.size)
    dst = at.get(NDA_DST, b"")
    if (family, len(dst)) not in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
        return None
    return Neighbour(ifindex, ipaddress.ip_address(dst), at.get(NDA_LLADDR, b""), state)


def usable_table(msgs: Iterable[nl.Msg], ifindex: int) -> dict[Address, bytes]:
    """{address: link-layer address} of the usable entries on interface ``ifindex``."""
    out: dict[Address, bytes] = {}
    for m in msgs:
        n = decode(m)
        if n is not None and n.ifindex == ifindex and n.usable:
            out[n.ip] = n.lladdr
    return out


def verdict(table: dict[Address, bytes], a: Address, b: Address) -> bool | None:
    """True: one link-layer address; False: two; None: one of them has no usable entry."""
    la, lb = table.get(a), table.get(b)
    if la is None or lb is None:
        return None
    return la == lb


def canonical(text: str) -> Address:
    """``text`` as an address; an IPv4-mapped IPv6 address is its IPv4 address."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


async def dump(family: int) -> list[nl.Msg]:
    """One neighbour dump read through the running loop: at most MAX_NEIGHBOURS, DUMP_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    out: list[nl.Msg] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.setblocking(False)
        await loop.sock_sendall(s, dump_request(family))

        async def read() -> None:
            while len(out) < MAX_NEIGHBOURS:
                for m in nl.messages(await loop.sock_recv(s, RECV_BYTES)):
                    if m.type == nl.NLMSG_DONE:
                        return
                    if m.type == nl.NLMSG_ERROR:
                        raise OSError(nl.error_code(m), "neighbour dump")
                    out.append(m)
            log.warning("neighbour dump cut at %d entries", MAX_NEIGHBOURS)

        await asyncio.wait_for(read(), DUMP_TIMEOUT_S)
    return out


async def read_table(ifindex: int, families: Iterable[int]) -> dict[Address, bytes]:
    """The usable neighbour entries of ``families`` on ``ifindex``."""
    table: dict[Address, bytes] = {}
    for family in families:
        table.update(usable_table(await dump(family), ifindex))
    return table


def solicit(ip: Address) -> None:
    """Make the kernel resolve ``ip``: a zero-length UDP datagram to its discard port."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        try:
            s.sendto(b"", (str(ip), DISCARD_PORT))
        except OSError as exc:  # no route, buffer full: the re-read simply finds nothing
            log.debug("soliciting %s failed: %s", ip, exc)


class SameHostCheck:
    """natd's ``neigh.same_host`` handler (shared/wire.py SameHost)."""

    def __init__(self, lan_if: Callable[[], str], lan_nets: Callable[[], Iterable[Network]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lan_if = lan_if
        self.lan_nets = lan_nets
        self.clock = clock
        self.limit = RateLimit(SOLICIT_BURST, SOLICIT_WINDOW_S)
        self.recent: dict[Address, float] = {}  # address -> when it was last solicited

    def handle(self, msg: wire.SameHost) -> wire.Message | Coroutine[Any, Any, wire.Message]:
        """Equal addresses answer at once; others after a look at the neighbour table."""
        a, b = canonical(msg.a), canonical(msg.b)
        if a == b:
            return wire.SameHostReply(True)
        return self._ask(a, b)

    async def _ask(self, a: Address, b: Address) -> wire.Message:
        try:
            return wire.SameHostReply(await self.same_host(a, b))
        except (OSError, TimeoutError) as exc:
            log.warning("neighbour table unreadable for %s and %s: %s", a, b, exc)
            return wire.Error("failed", f"neighbour table: {exc}"[:wire.MAX_STR])

    async def same_host(self, a: Address, b: Address) -> bool:
        """Both have usable entries with one link-layer address; unknown ones are solicited once."""
        try:
            ifindex = socket.if_nametoindex(self.lan_if())
        except OSError:
            return False
        families = sorted({socket.AF_INET6 if ip.version == 6 else socket.AF_INET for ip in (a, b)})
        table = await read_table(ifindex, families)
        found = verdict(table, a, b)
        if found is None:
            asked = [ip for ip in (a, b) if ip not in table and self._may_solicit(ip)]
            for ip in asked:
                solicit(ip)
            if asked:
                await asyncio.sleep(SOLICIT_WAIT_S)
                table = await read_table(ifindex, families)
                found = verdict(table, a, b)
        log.debug("same host %s / %s: %s", a, b, found)
        return bool(found)

    def _may_solicit(self, ip: Address) -> bool:
        """Inside the LAN, not solicited lately, within the overall budget."""
        if not any(ip.version == n.version and ip in n for n in self.lan_nets()):
            return False
        now = self.clock()
        if now - self.recent.get(ip, -SOLICIT_AGAIN_S) < SOLICIT_AGAIN_S or not self.limit.allow(now)[0]:
            return False
        if len(self.recent) >= MAX_RECENT:
            self.recent = dict(_fresh(self.recent, now))
        if len(self.recent) >= MAX_RECENT:
            return False
        self.recent[ip] = now
        return True


def _fresh(recent: dict[Address, float], now: float) -> Iterator[tuple[Address, float]]:
    return ((ip, t) for ip, t in recent.items() if now - t < SOLICIT_AGAIN_S)
