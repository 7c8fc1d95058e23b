"""IPv6 pinholes: their own model beside the port mappings (docs/upnp.md "IPv6 pinholes").

A pinhole lets inbound IPv6 from any host (or one remote host) reach one LAN address,
protocol and port; there is no address translation, so no external port and no upstream
PCP. The front ends (UPnP WANIPv6FirewallControl:1, PCP MAP in IPv6 firewall mode) ask
:class:`Pinholes`; it checks the policy (LAN prefixes only, secure mode, the privileged-port
rule, quotas shared with the host's IPv4 mappings), keeps the rows with their UniqueIDs,
owners and leases, and asks a :class:`PinholeBackend` (natd's nftables sets, wired at merge)
to open and close them. Failures are :class:`PinholeError` with a neutral kind; the front
end turns each into its own code. Time is passed in (``clock``), so the logic is testable.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from controld.core.policy import Permissions
from shared.const import PROTO_NAMES

log = logging.getLogger("controld.core.pinhole")

MAX_LEASE = 86400  # WANIPv6FirewallControl:1 A_ARG_TYPE_LeaseTime: 1..86400 s
MAX_UID = 65535  # UniqueID is a ui2; 0 is never handed out
MIN_PORT = 1024  # as miniupnpd: no pinhole to a privileged port of a LAN host
# Linux conntrack defaults for the idle timeout of an outbound flow (GetOutboundPinholeTimeout)
OUTBOUND_SYSCTL = {6: "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
                   17: "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream"}
OUTBOUND_DEFAULT = {6: 432000, 17: 120}


class PinholeErrorKind(enum.Enum):
    """Why a pinhole request failed, neutral of the front end (UPnP codes: controld/upnp/errors.py)."""

    FIREWALL_DISABLED = "firewall-disabled"  # no IPv6 firewall under natd's control
    NOT_ALLOWED = "not-allowed"  # inbound pinholes switched off by the admin
    NOT_AUTHORIZED = "not-authorized"  # another host's address or pinhole; privileged port; not LAN
    NO_SUCH_ENTRY = "no-such-entry"
    QUOTA = "quota"
    PROTOCOL = "protocol"  # not TCP or UDP
    PROTOCOL_WILDCARD = "protocol-wildcard"
    PORT_WILDCARD = "port-wildcard"
    CLIENT_WILDCARD = "client-wildcard"
    INVALID = "invalid"
    NO_TRAFFIC = "no-traffic"  # CheckPinholeWorking: nothing came through yet
    UNAVAILABLE = "unavailable"  # natd did not answer or failed


class PinholeError(Exception):
    """A pinhole request the core refuses, with a neutral ``kind``."""

    def __init__(self, kind: PinholeErrorKind, detail: str, lifetime: int | None = None) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail
        self.lifetime = lifetime  # another owner's pinhole: its remaining lease (PCP, RFC 6887 §11.3)


@dataclass(frozen=True)
class Pinhole:
    """One pinhole row. ``remote_host`` "" and ``remote_port`` 0 are wildcards."""

    uid: int
    owner: str  # the address of the control point that opened it
    int_client: str  # IPv6 literal, compressed
    int_port: int
    proto: int
    remote_host: str
    remote_port: int
    lease: int  # as last asked, seconds
    expires: float  # on the core's clock
    nonce: bytes | None = None  # a PCP MAP's mapping nonce (RFC 6887 §11.1); None: made by UPnP

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES.get(self.proto, str(self.proto))

    def key(self) -> tuple[str, int, int, str, int]:
        """What makes two pinholes the same hole in the firewall."""
        return self.int_client, self.int_port, self.proto, self.remote_host, self.remote_port

    def __str__(self) -> str:
        remote = f"[{self.remote_host or '*'}]:{self.remote_port or '*'}"
        return f"pinhole {self.uid} {self.proto_name} {remote} -> [{self.int_client}]:{self.int_port}"


@dataclass(frozen=True)
class FirewallStatus:
    """What natd reports: is there an IPv6 firewall it controls, and the LAN's IPv6 prefixes."""

    enabled: bool
    lan_prefixes: tuple[str, ...] = ()


class PinholeBackend(Protocol):
    """What the core needs from natd for pinholes (wire: pinhole.status/add/delete/counters).

    Every call raises :class:`PinholeError` (FIREWALL_DISABLED, QUOTA, NOT_AUTHORIZED for an
    address outside the LAN prefixes, UNAVAILABLE when natd is away or nft failed).
    """

    async def status(self) -> FirewallStatus:
        """Whether pinholes can be opened at all, and the LAN prefixes they may point into."""
        ...

    async def open(self, p: Pinhole, lease: int) -> None:
        """Open ``p`` for ``lease`` seconds from now, or re-lease it (same uid: replace)."""
        ...

    async def close(self, uid: int) -> None:
        """Close pinhole ``uid``; closing one natd does not hold is not an error."""
        ...

    async def packets(self, uid: int) -> int:
        """Packets pinhole ``uid`` has let in."""
        ...

    async def same_host(self, a: str, b: str) -> bool:
        """Are addresses ``a`` and ``b`` (either family) the same LAN host (neighbour table: one MAC)?"""
        ...


class PinholeRows(Protocol):
    """Where rows persist (controld/core/pinhole_store.py); the core works without one too."""

    def load(self) -> list[Pinhole]: ...

    def save(self, p: Pinhole) -> None: ...

    def delete(self, uid: int) -> None: ...


class NoFirewall:
    """The backend while natd has no pinhole support: nothing can be opened (FirewallDisabled)."""

    async def status(self) -> FirewallStatus:
        return FirewallStatus(False)

    async def open(self, p: Pinhole, lease: int) -> None:
        raise PinholeError(PinholeErrorKind.FIREWALL_DISABLED, "natd manages no IPv6 firewall")

    async def close(self, uid: int) -> None:
        return None

    async def packets(self, uid: int) -> int:
        return 0

    async def same_host(self, a: str, b: str) -> bool:
        return a == b


@dataclass(frozen=True)
class PinholePolicy:
    """The admin's rules for pinholes: switched on, secure mode, quotas (0: no limit)."""

    allowed: bool = True  # InboundPinholeAllowed
    secure_mode: bool = True  # a host opens pinholes to its own addresses only
    max_per_host: int = 256  # pinholes plus the host's IPv4 mappings
    max_total: int = 4096  # pinholes plus every IPv4 mapping
    min_port: int = MIN_PORT
    permissions: Permissions = Permissions()  # only its IPv6 rules apply (internal port as both ports)


_K = TypeVar("_K")


def _ipv6(raw: str, what: str) -> str:
    try:
        return str(ipaddress.IPv6Address(raw.strip()))
    except ValueError:
        raise PinholeError(PinholeErrorKind.INVALID, f"{what} {raw[:64]!r} is not an IPv6 address") from None


def _lease(lease: int) -> int:
    if not 1 <= lease <= MAX_LEASE:
        raise PinholeError(PinholeErrorKind.INVALID, f"LeaseTime must be 1..{MAX_LEASE}, got {lease}")
    return lease


def outbound_timeout(proto: int, read: Callable[[str], str] | None = None) -> int:
    """Idle seconds before the firewall forgets an outbound flow of ``proto`` (conntrack's)."""
    if proto not in OUTBOUND_DEFAULT:
        raise PinholeError(PinholeErrorKind.PROTOCOL, f"protocol {proto} is not TCP or UDP")
    try:
        raw = (read or _read_text)(OUTBOUND_SYSCTL[proto]).strip()
        return int(raw) if raw.isdigit() else OUTBOUND_DEFAULT[proto]
    except OSError:
        return OUTBOUND_DEFAULT[proto]


def _read_text(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read(32)


def _discard(index: dict[_K, set[int]], key: _K, uid: int) -> None:
    """``uid`` out of ``index[key]``; an emptied key goes, so the index never outgrows the table."""
    uids = index.get(key)
    if uids is not None:
        uids.discard(uid)
        if not uids:
            del index[key]


class Pinholes:
    """The pinhole table and its rules; one instance per controld, shared by the front ends."""

    def __init__(self, backend: PinholeBackend, policy: PinholePolicy | None = None,
                 ipv4_count: Callable[[str], int] = lambda ip: 0, ipv4_total: Callable[[], int] = lambda: 0,
                 clock: Callable[[], float] = time.monotonic, store: PinholeRows | None = None) -> None:
        self.backend = backend
        self.store = store
        self.policy = policy or PinholePolicy()
        self.ipv4_count = ipv4_count  # the IPv4 mappings of one LAN address (quotas are shared)
        self.ipv4_total = ipv4_total
        self.clock = clock
        # rows by uid, plus the indexes every operation needs, so none walks the table (O(1) each;
        # expiry from a heap with stale entries skipped)
        self.rows: dict[int, Pinhole] = {}
        self._by_key: dict[tuple[str, int, int, str, int], int] = {}
        self._by_tuple: dict[tuple[str, int, int], set[int]] = {}
        self._by_owner: dict[str, set[int]] = {}
        self._expiry: list[tuple[float, int]] = []
        for p in store.load() if store is not None else []:
            self._index(p)
        self.status = FirewallStatus(False)
        self._prefixes: tuple[tuple[str, ...], tuple[ipaddress.IPv6Network, ...]] = ((), ())  # parsed once
        self.on_change: Callable[[], None] = lambda: None  # evented FirewallEnabled/InboundPinholeAllowed
        self._next_uid = 1

    async def refresh(self) -> FirewallStatus:
        """Ask natd for the firewall status again (start, GetFirewallStatus, natd events).

        Rows whose address left the LAN's prefixes go (natd closed them when the prefix went)."""
        before = self.status
        try:
            self.status = await self.backend.status()
        except PinholeError as exc:
            log.info("pinhole status unavailable: %s", exc)
            self.status = FirewallStatus(False)
        if self.status.enabled != before.enabled:
            log.info("IPv6 firewall %s", "enabled" if self.status.enabled else "disabled")
            self.on_change()
        if self.status.enabled and self.status.lan_prefixes != before.lan_prefixes:
            log.info("LAN IPv6 prefixes: %s", ", ".join(self.status.lan_prefixes) or "none")
            for uid in [uid for uid, p in self.rows.items() if not self._in_lan(p.int_client)]:
                log.info("%s closed: its address left the LAN prefixes", self._drop(uid))
        return self.status

    def set_policy(self, policy: PinholePolicy) -> None:
        """A reload's new policy; subscribers hear of a changed InboundPinholeAllowed."""
        changed = policy.allowed != self.policy.allowed
        self.policy = policy
        if changed:
            self.on_change()

    def firewall_enabled(self) -> bool:
        return self.status.enabled

    def inbound_allowed(self) -> bool:
        return self.status.enabled and self.policy.allowed

    def expire(self) -> int:
        """Forget rows past their lease (natd's element timeouts close them in the kernel)."""
        now, heap, gone = self.clock(), self._expiry, 0
        while heap and heap[0][0] <= now:
            expires, uid = heapq.heappop(heap)
            p = self.rows.get(uid)
            if p is not None and p.expires == expires:  # else re-leased or gone since: a stale entry
                log.info("%s expired", self._drop(uid))
                gone += 1
        return gone

    def remaining(self, p: Pinhole) -> int:
        return max(0, int(p.expires - self.clock()))

    def _check_on(self) -> None:
        if not self.status.enabled:
            raise PinholeError(PinholeErrorKind.FIREWALL_DISABLED, "no IPv6 firewall under igdpcp's control")
        if not self.policy.allowed:
            raise PinholeError(PinholeErrorKind.NOT_ALLOWED, "inbound pinholes are switched off")

    async def _mine(self, cp: str, addr: str) -> bool:
        return cp == addr or await self.backend.same_host(cp, addr)

    def _in_lan(self, addr: str) -> bool:
        ip, names = ipaddress.IPv6Address(addr), self.status.lan_prefixes
        if self._prefixes[0] is not names:
            self._prefixes = (names, tuple(ipaddress.IPv6Network(n, strict=False) for n in names))
        return any(ip in net for net in self._prefixes[1])

    async def add(self, cp: str, int_client: str, int_port: int, proto: int, remote_host: str,
                  remote_port: int, lease: int) -> Pinhole:
        """AddPinhole: a new pinhole, or the caller's identical one re-leased (same UniqueID)."""
        self.expire()
        client, remote, lease = await self._checked(cp, int_client, int_port, proto, remote_host, lease)
        key = (client, int_port, proto, remote, remote_port)
        same_uid = self._by_key.get(key)
        same = self.rows[same_uid] if same_uid is not None else None
        if same is not None:
            if not await self._mine(cp, same.owner):
                raise PinholeError(PinholeErrorKind.NOT_AUTHORIZED, f"{same} belongs to {same.owner}")
            return await self._lease(same, lease, "re-leased")
        await self._check_quota(cp)
        p = Pinhole(self._new_uid(), cp, client, int_port, proto, remote, remote_port, lease,
                    self.clock() + lease)
        await self.backend.open(p, lease)
        self._keep(p)
        log.info("%s opened by %s for %d s", p, cp, lease)
        return p

    async def _checked(self, cp: str, int_client: str, int_port: int, proto: int, remote_host: str,
                       lease: int) -> tuple[str, str, int]:
        """The policy every new or re-leased pinhole passes; its internal and remote address and lease."""
        self._check_on()
        if proto == 65535:
            raise PinholeError(PinholeErrorKind.PROTOCOL_WILDCARD, "a pinhole for every protocol")
        if proto not in PROTO_NAMES:
            raise PinholeError(PinholeErrorKind.PROTOCOL, f"protocol {proto}: only TCP (6) and UDP (17)")
        if int_port == 0:
            raise PinholeError(PinholeErrorKind.PORT_WILDCARD, "a pinhole for every internal port")
        if int_client.strip() in ("", "*"):
            raise PinholeError(PinholeErrorKind.CLIENT_WILDCARD, "InternalClient must name one address")
        lease = _lease(lease)
        client = _ipv6(int_client, "InternalClient")
        remote = "" if remote_host.strip() in ("", "*") else _ipv6(remote_host, "RemoteHost")
        if not self._in_lan(client):
            await self.refresh()  # natd may know of a prefix this view has not heard of yet
            if not self._in_lan(client):
                raise PinholeError(PinholeErrorKind.NOT_AUTHORIZED, f"{client} is in no LAN prefix")
        if self.policy.secure_mode and not await self._mine(cp, client):
            raise PinholeError(PinholeErrorKind.NOT_AUTHORIZED, f"{cp} may open pinholes to itself only")
        if int_port < self.policy.min_port:
            raise PinholeError(PinholeErrorKind.NOT_AUTHORIZED, f"port {int_port} < {self.policy.min_port}")
        if not self.policy.permissions.allowed(int_port, client, int_port):
            raise PinholeError(PinholeErrorKind.NOT_AUTHORIZED, f"permission rules refuse [{client}]:{int_port}")
        return client, remote, lease

    async def _check_quota(self, cp: str) -> None:
        pol = self.policy
        if pol.max_total and len(self.rows) + self.ipv4_total() >= pol.max_total:
            raise PinholeError(PinholeErrorKind.QUOTA, f"{pol.max_total} pinholes and mappings in total")
        if pol.max_per_host:
            others = [o for o in self._by_owner if o != cp]  # one question per owner
            same = await asyncio.gather(*(self.backend.same_host(cp, o) for o in others))
            mine = [cp, *(o for o, yes in zip(others, same, strict=True) if yes)]
            own = sum(len(self._by_owner.get(o, ())) for o in mine)
            if own + self.ipv4_count(cp) >= pol.max_per_host:
                raise PinholeError(PinholeErrorKind.QUOTA, f"{cp} holds {pol.max_per_host} pinholes and mappings")

    def _index(self, p: Pinhole) -> None:
        old = self.rows.get(p.uid)
        if old is not None:
            self._unindex(old)
        self.rows[p.uid] = p
        self._by_key[p.key()] = p.uid
        self._by_tuple.setdefault((p.int_client, p.int_port, p.proto), set()).add(p.uid)
        self._by_owner.setdefault(p.owner, set()).add(p.uid)
        heapq.heappush(self._expiry, (p.expires, p.uid))
        if len(self._expiry) > 4 * len(self.rows) + 64:  # re-leases leave stale entries: keep it bounded
            self._expiry = [(r.expires, r.uid) for r in self.rows.values()]
            heapq.heapify(self._expiry)

    def _unindex(self, p: Pinhole) -> None:
        if self._by_key.get(p.key()) == p.uid:
            del self._by_key[p.key()]
        _discard(self._by_tuple, (p.int_client, p.int_port, p.proto), p.uid)
        _discard(self._by_owner, p.owner, p.uid)

    def _keep(self, p: Pinhole) -> None:
        self._index(p)
        if self.store is not None:
            self.store.save(p)

    def _drop(self, uid: int) -> Pinhole | None:
        """Row ``uid`` out of the table, its indexes and the store; the row, if there was one."""
        p = self.rows.pop(uid, None)
        if p is not None:
            self._unindex(p)
        if self.store is not None:
            self.store.delete(uid)
        return p

    def _new_uid(self) -> int:
        if len(self.rows) >= MAX_UID:
            raise PinholeError(PinholeErrorKind.QUOTA, "every UniqueID is in use")
        for _ in range(MAX_UID):  # bounded: at least one id is free
            uid, self._next_uid = self._next_uid, self._next_uid % MAX_UID + 1
            if uid not in self.rows:
                return uid
        raise PinholeError(PinholeErrorKind.QUOTA, "every UniqueID is in use")  # pragma: no cover

    async def _lease(self, p: Pinhole, lease: int, what: str) -> Pinhole:
        new = replace(p, lease=lease, expires=self.clock() + lease)
        await self.backend.open(new, lease)
        self._keep(new)
        log.info("%s %s for %d s", new, what, lease)
        return new

    async def owned(self, cp: str, uid: int) -> Pinhole:
        """Pinhole ``uid`` if ``cp`` may act on it (its owner, or the same host); raises otherwise."""
        self.expire()
        p = self.rows.get(uid)
        if p is None:
            raise PinholeError(PinholeErrorKind.NO_SUCH_ENTRY, f"no pinhole {uid}")
        if not await self._mine(cp, p.owner) and not await self._mine(cp, p.int_client):
            raise PinholeError(PinholeErrorKind.NOT_AUTHORIZED, f"{p} belongs to {p.owner}")
        return p

    async def update(self, cp: str, uid: int, lease: int) -> Pinhole:
        """UpdatePinhole: a new lease from now."""
        lease = _lease(lease)
        p = await self.owned(cp, uid)
        self._check_on()
        return await self._lease(p, lease, f"re-leased by {cp}")

    async def _held(self, cp: str, nonce: bytes, client: str, int_port: int, proto: int) -> list[Pinhole]:
        """The pinholes on an internal tuple, all of them the PCP client's: its address and nonce
        (RFC 6887 §11.3); any other (another nonce, or made by UPnP) is NOT_AUTHORIZED with its
        remaining lease, as a LAN PCP MAP meets a UPnP port mapping (docs/lan-pcp.md, Ownership)."""
        held = [self.rows[uid] for uid in sorted(self._by_tuple.get((client, int_port, proto), ()))]
        for p in held:
            if p.nonce != nonce or not await self._mine(cp, p.owner):
                raise PinholeError(PinholeErrorKind.NOT_AUTHORIZED, f"{p} belongs to another client or nonce",
                                   self.remaining(p) or 1)
        return held

    async def lan_map(self, cp: str, nonce: bytes, int_client: str, int_port: int, proto: int, remote_host: str,
                      lease: int) -> Pinhole:
        """PCP MAP in IPv6 firewall mode (RFC 6887 §11.3): open the pinhole of an internal tuple, or
        re-lease the client's own (same UniqueID), re-pointed when its FILTER names another remote host."""
        self.expire()
        try:
            known = self.status.enabled and self._in_lan(_ipv6(int_client, "internal address"))
        except PinholeError:
            known = True  # not an address at all: _checked refuses it
        if not known:
            await self.refresh()  # natd's firewall back, or a prefix delegated since we last asked
        client, remote, lease = await self._checked(cp, int_client, int_port, proto, remote_host, lease)
        held = await self._held(cp, nonce, client, int_port, proto)
        if held:
            return await self._lease(replace(held[0], remote_host=remote), lease, f"re-leased by PCP client {cp}")
        await self._check_quota(cp)
        p = Pinhole(self._new_uid(), cp, client, int_port, proto, remote, 0, lease, self.clock() + lease, nonce)
        await self.backend.open(p, lease)
        self._keep(p)
        log.info("%s opened by PCP client %s for %d s", p, cp, lease)
        return p

    async def lan_delete(self, cp: str, nonce: bytes, int_client: str, int_port: int, proto: int) -> None:
        """PCP MAP lifetime 0 (RFC 6887 §15.1): close the client's pinhole of an internal tuple;
        NO_SUCH_ENTRY when there is none, NOT_AUTHORIZED (with its lease) when it is not the client's."""
        self.expire()
        held = await self._held(cp, nonce, _ipv6(int_client, "internal address"), int_port, proto)
        if not held:
            raise PinholeError(PinholeErrorKind.NO_SUCH_ENTRY, f"no pinhole to [{int_client}]:{int_port}")
        for p in held:
            await self.backend.close(p.uid)
            self._drop(p.uid)
            log.info("%s closed by PCP client %s", p, cp)

    async def delete(self, cp: str, uid: int) -> None:
        """DeletePinhole: closed in natd first, then the row goes."""
        p = await self.owned(cp, uid)
        await self.backend.close(uid)
        self._drop(uid)
        log.info("%s closed by %s", p, cp)

    async def packets(self, cp: str, uid: int) -> int:
        """GetPinholePackets."""
        await self.owned(cp, uid)
        return await self.backend.packets(uid)

    async def working(self, cp: str, uid: int) -> bool:
        """CheckPinholeWorking: True once a packet came through; NO_TRAFFIC before."""
        if await self.packets(cp, uid) == 0:
            raise PinholeError(PinholeErrorKind.NO_TRAFFIC, f"no packet through pinhole {uid} yet")
        return True

    def count_of(self, cp: str) -> int:
        """Pinholes opened by ``cp`` (for the IPv4 side's shared quota)."""
        return len(self._by_owner.get(cp, ()))
