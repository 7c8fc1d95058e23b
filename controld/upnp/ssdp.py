"""SSDP (UPnP Device Architecture 1.1 §1): discovery answers and announcements.

The message logic is pure (:func:`parse`, :func:`search_targets`, :func:`response`,
:func:`notify`, :class:`RateLimit`); :class:`SsdpServer` is the socket edge. Only LAN
sources are answered, at most one answer per matching type per search, after a random
delay within MX, and each source is rate limited (an answer is ~10 datagrams, so an
unlimited responder would be an amplifier). ssdp:alive at start and every
NOTIFY_INTERVAL minus jitter; ssdp:byebye on shutdown and, with a new BOOTID and
ssdp:alive, when the LAN address changes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin

from controld.upnp.description import ROOT_PATH, Device, Gateway
from controld.upnp.parse import ascii_uint
from shared import config
from shared.const import SERVER, SSDP_GROUP, SSDP_PORT
from shared.guard import Guard

log = logging.getLogger("controld.upnp.ssdp")

NOTIFY_INTERVAL = config.default("notify-interval")
MAX_AGE_FACTOR = 3  # max-age is this many intervals, so control points never time us out
MAX_AGE = MAX_AGE_FACTOR * NOTIFY_INTERVAL
NOTIFY_JITTER = 60.0  # subtracted at random from each interval, so routers do not sync up
MAX_DATAGRAM = 2048
RATE_BURST = 10.0  # M-SEARCHes one source may send at once
RATE_PER_S = 2.0  # and then per second
RATE_SOURCES = 1024  # sources remembered (bounded)
ANSWER_UNIT = 10  # datagrams one token pays for: an ssdp:all answer of one IGD:1 root device
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux, <linux/in.h>; not in every Python


class RateLimit:
    """Token bucket per source address; time is passed in."""

    def __init__(self, burst: float = RATE_BURST, rate: float = RATE_PER_S, sources: int = RATE_SOURCES) -> None:
        self.burst, self.rate, self.sources = burst, rate, sources
        self.buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, last time)

    def allow(self, source: str, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens for ``source``; False when it has not that many left."""
        tokens, last = self.buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self.buckets) >= self.sources:
            self.buckets.pop(next(iter(self.buckets)))  # forget the least recently seen
        ok = tokens >= cost
        self.buckets[source] = (tokens - cost if ok else tokens, now)
        return ok


@dataclass(frozen=True)
class Target:
    st: str  # what is searched for / announced (ST or NT)
    usn: str
    root_path: str = ROOT_PATH  # the root device's description, relative to the server
    config_id: int = 0  # CONFIGID.UPNP.ORG of that root device
    lower: bool = True  # also answers a search for a lower version of st (UDA 1.1 §1.3.2)


def search_targets(gw: Device | Gateway) -> list[Target]:
    """Every type each root device answers for, with its USN."""
    out = []
    for dev in gw.devices:
        def t(st: str, usn: str, d: Device = dev) -> Target:
            return Target(st, usn, d.root_path, d.config_id, d.lower)
        out.append(t("upnp:rootdevice", f"uuid:{dev.uuid_root}::upnp:rootdevice"))
        for uuid, dtype in dev.device_types():
            out.append(t(f"uuid:{uuid}", f"uuid:{uuid}"))
            out.append(t(dtype, f"uuid:{uuid}::{dtype}"))
        owners = {dev.l3f.type: dev.uuid_root, dev.wancfg.type: dev.uuid_wan}
        owners.update({s.type: dev.uuid_wcd for s in dev.wcd_services})
        for stype, uuid in owners.items():
            out.append(t(stype, f"uuid:{uuid}::{stype}"))
    return out


def parse(data: bytes) -> tuple[str, dict[str, str]] | None:
    """Start line and upper-cased headers of an SSDP datagram; None if it is not one."""
    try:
        text = data[:MAX_DATAGRAM].decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        return None
    lines = text.replace("\r\n", "\n").split("\n")  # bare LF tolerated (RFC 7230 §3.5)
    headers = {}
    for line in lines[1:40]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().upper()] = value.strip()
    return lines[0], headers


def matches(targets: list[Target], st: str) -> list[Target]:
    """The targets one search answers: ssdp:all gets one of each, a versioned type any lower version."""
    if st == "ssdp:all":
        return targets
    base, _, ver = st.rpartition(":")
    out = []
    for t in targets:
        if t.st == st:
            out.append(t)
        elif (wanted := ascii_uint(ver, 4)) is not None and t.st.startswith("urn:") \
                and t.st.rpartition(":")[0] == base:
            served = int(t.st.rpartition(":")[2])
            if wanted < served and t.lower:
                # UDA 1.1 §1.3.3: answer with the version that was asked for
                out.append(Target(st, t.usn.replace(t.st, st), t.root_path, t.config_id, t.lower))
    return out


def response(t: Target, location: str, boot_id: int, config_id: int, max_age: int = MAX_AGE) -> bytes:
    return ("HTTP/1.1 200 OK\r\n"
            f"CACHE-CONTROL: max-age={max_age}\r\nDATE: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}\r\n"
            f"EXT:\r\nLOCATION: {location}\r\nSERVER: {SERVER}\r\nST: {t.st}\r\nUSN: {t.usn}\r\n"
            f"BOOTID.UPNP.ORG: {boot_id}\r\nCONFIGID.UPNP.ORG: {config_id}\r\n\r\n").encode()


def notify(t: Target, nts: str, location: str, boot_id: int, config_id: int,
           next_boot_id: int | None = None, max_age: int = MAX_AGE) -> bytes:
    """ssdp:alive, ssdp:byebye, or ssdp:update (UDA 1.1 §1.2.4: carries NEXTBOOTID)."""
    alive = nts == "ssdp:alive"
    return ("NOTIFY * HTTP/1.1\r\n"
            f"HOST: {SSDP_GROUP}:{SSDP_PORT}\r\n"
            + (f"CACHE-CONTROL: max-age={max_age}\r\nSERVER: {SERVER}\r\n" if alive else "")
            + (f"LOCATION: {location}\r\n" if nts != "ssdp:byebye" else "")
            + f"NT: {t.st}\r\nNTS: {nts}\r\nUSN: {t.usn}\r\n"
            f"BOOTID.UPNP.ORG: {boot_id}\r\nCONFIGID.UPNP.ORG: {config_id}\r\n"
            + (f"NEXTBOOTID.UPNP.ORG: {next_boot_id}\r\n" if next_boot_id is not None else "")
            + "\r\n").encode()


class SsdpServer(asyncio.DatagramProtocol):
    """Listens on the SSDP group (UDA 2.0 §1.1.2) on the LAN interface; answers M-SEARCH, sends NOTIFY."""

    def __init__(self, device: Device | Gateway, lan_ip: str, location: str,
                 lan_subnets: Callable[[], list[str]], notify_interval: int = NOTIFY_INTERVAL) -> None:
        self.device = device
        self.notify_interval = notify_interval
        self.max_age = MAX_AGE_FACTOR * notify_interval
        self.lan_ip = lan_ip
        self.location = location  # the first root device's; the others' are relative to it
        self.lan_subnets = lan_subnets
        self.targets = search_targets(device)
        self.boot_id = int(time.time()) & 0x7FFFFFFF  # UDA 1.1: 0..2^31-1
        self.rng = random.Random()
        self.limit = RateLimit()
        self.transport: asyncio.DatagramTransport | None = None
        self._sock: socket.socket | None = None
        self._unicast: asyncio.DatagramTransport | None = None
        self._reopen: asyncio.Task[None] | None = None
        self._pending = 0
        self.guard = Guard(log, "ssdp")

    async def start(self) -> None:
        """Listen on the SSDP group joined on the LAN interface only, and on the LAN address
        (unicast M-SEARCH): never on 0.0.0.0, so nothing from the WAN side reaches the parser."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((SSDP_GROUP, SSDP_PORT))  # Linux sends from it with the routed source address
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)  # only the group joined here, not others'
        mreq = struct.pack("4s4s", socket.inet_aton(SSDP_GROUP), socket.inet_aton(self.lan_ip))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self.lan_ip))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self._sock = sock
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        await self._open_unicast()

    async def _open_unicast(self) -> None:
        """The unicast listener on the LAN address (UDA 1.1 §1.3.2: unicast M-SEARCH to port 1900)."""
        if self._unicast is not None:
            self._unicast.close()
            self._unicast = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.lan_ip, SSDP_PORT))
            self._unicast, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        except OSError as exc:
            sock.close()
            log.warning("ssdp: no unicast listener on %s:%d: %s", self.lan_ip, SSDP_PORT, exc)

    def relocate(self, lan_ip: str, location: str) -> None:
        """The LAN address changed: ssdp:update (BOOTID -> NEXTBOOTID, UDA 1.1 §1.2.4) and
        ssdp:alive at the new LOCATION, so control points keep the device instead of dropping it."""
        next_boot = (self.boot_id + 1) & 0x7FFFFFFF
        log.info("LAN address %s -> %s: ssdp:update BOOTID %d -> %d, ssdp:alive at %s",
                 self.lan_ip, lan_ip, self.boot_id, next_boot, location)
        if self._sock is not None:
            try:
                old = struct.pack("4s4s", socket.inet_aton(SSDP_GROUP), socket.inet_aton(self.lan_ip))
                self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, old)
            except OSError:
                pass  # the old address is already gone with its membership
            new = struct.pack("4s4s", socket.inet_aton(SSDP_GROUP), socket.inet_aton(lan_ip))
            self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, new)
            self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(lan_ip))
        self.lan_ip, self.location = lan_ip, location
        if self.transport is not None:
            self._reopen = asyncio.get_running_loop().create_task(self._open_unicast())
        self.announce("ssdp:update", next_boot)
        self.boot_id = next_boot
        self.announce("ssdp:alive")

    def announce(self, nts: str, next_boot_id: int | None = None) -> None:
        """One NOTIFY per target (ssdp:alive, ssdp:byebye or ssdp:update)."""
        if self.transport is None:
            return
        for t in self.targets:
            self.transport.sendto(notify(t, nts, self.location_of(t), self.boot_id, t.config_id, next_boot_id,
                                         self.max_age),
                                  (SSDP_GROUP, SSDP_PORT))

    def location_of(self, t: Target) -> str:
        """LOCATION of ``t``'s root device description."""
        return urljoin(self.location, t.root_path)

    async def run_notify(self) -> None:
        """ssdp:alive at start (twice, as UDP may drop one) and then periodically."""
        while True:
            self.announce("ssdp:alive")
            await asyncio.sleep(0.25)
            self.announce("ssdp:alive")
            await asyncio.sleep(max(1.0, self.notify_interval - 0.25
                                    - self.rng.uniform(0, min(NOTIFY_JITTER, self.notify_interval / 10))))

    def _in_lan(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in ipaddress.ip_network(n) for n in self.lan_subnets())

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self._search(data, addr)
        except Exception as exc:  # the guard (shared/guard.py): a datagram never ends SSDP
            self.guard.unexpected(addr[0], exc)

    def _search(self, data: bytes, addr: tuple[str, int]) -> None:
        parsed = parse(data)
        if parsed is None or not parsed[0].startswith("M-SEARCH * HTTP/1.1"):
            return
        _, h = parsed
        if h.get("MAN", "").strip('"') != "ssdp:discover" or not self._in_lan(addr[0]):
            return
        found = matches(self.targets, h.get("ST", ""))
        if not found or self._pending > 256:  # bounded work per burst of searches
            return
        # Charged by the answer's size: two root devices answer ssdp:all with twice the datagrams,
        # and the limit is on what we send (no amplifier), not on how often we are asked.
        if not self.limit.allow(addr[0], time.monotonic(), max(1.0, len(found) / ANSWER_UNIT)):
            log.debug("ssdp: rate limit for %s", addr[0])
            return
        raw_mx = h.get("MX", "")
        mx = ascii_uint(raw_mx, 3) or 1
        delay = self.rng.uniform(0, min(max(mx, 1), 5) * 0.5)
        self._pending += 1
        asyncio.get_running_loop().call_later(delay, self._answer, found, addr)

    def _answer(self, found: list[Target], addr: tuple[str, int]) -> None:
        self._pending -= 1
        if self.transport is None:
            return
        for t in found:
            self.transport.sendto(response(t, self.location_of(t), self.boot_id, t.config_id, self.max_age), addr)

    def close(self) -> None:
        if self._unicast is not None:
            self._unicast.close()
            self._unicast = None
        if self.transport is not None:
            self.announce("ssdp:byebye")
            self.transport.close()
            self.transport = None
