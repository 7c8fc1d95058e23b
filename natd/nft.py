"""NAT1 in nftables: forwards as map elements behind a fixed set of rules, atomic batches.

One code path, two layouts (chosen by configuration, see :class:`Layout`):

- ``standalone``: natd's own ``table ip igdpcp`` with four base chains
  (prerouting, output, postrouting, forward);
- ``fw4``: regular chains ``igdpcp_dstnat``/``igdpcp_srcnat``/``igdpcp_forward``/``igdpcp_input``
  inside OpenWrt's ``table inet fw4``, reached by jumps the include files in packaging/fw4/
  put into fw4's chains: ``srcnat`` and ``input`` at their start (chain-pre: the mapped source
  port must win over fw4's ``srcnat_wan`` masquerade, which ends NAT for the packet),
  ``dstnat`` and ``forward`` at their end (chain-post: user redirects first).

Objects (names carry the layout's prefix):
- ``map fwd4``  proto . wan port -> lan addr . lan port    (DNAT: one O(1) lookup per packet)
- ``map snat4`` lan addr . proto . lan port -> wan addr . wan port (endpoint-independent
  SNAT so traffic the LAN host starts from a mapped port leaves from the mapped port)
- ``set wan4``  the WAN addresses the forwards answer on
- ``set lan4``  the LAN subnets (hairpin masquerade)
- ``set wanif`` the WAN device: SNAT only on WAN egress (no rewrite into a guest or VPN zone)
- ``set inif``  the WAN and LAN devices: DNAT and the forward accept only on their ingress,
  so a host in another zone (guest) cannot reach a LAN host through WANaddr:port
- ``set pcp4``  (fw4) the PCP servers natd talks to: their ANNOUNCE (udp 5351 -> 5350) gets
  through fw4's input policy (RFC 6887 §14.1.3), nobody else's
Rules never change with the number of forwards. Every rule starts with an explicit IPv4
selector (``meta nfproto ipv4`` in ``inet``, ``ip version 4`` in ``ip``) so no IPv6
packet can match an IPv4 forward (miniupnpd.md §2.10). Every change is one transaction: whole or nothing
(a libnftables command; a bulk change of map elements only, such as the restore of N forwards after a
restart, is the same nf_tables batch written through natd.netlink, skipping libnftables' ~25 us per
element of parsing).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nftables

from natd import netlink
from natd.conntrack import CT_MARK
from shared.config import default
from shared.const import PCP_CLIENT_PORT, PCP_SERVER_PORT
from shared.wire import Binding

log = logging.getLogger("natd.nft")

PROTO_NAMES = {6: "tcp", 17: "udp"}
LAYOUTS = ("standalone", "fw4")
TAG = "igdpcp"  # rule comment prefix: how natd recognises its own rules

FwdKey = tuple[int, int]  # proto, wan port
FwdVal = tuple[str, int]  # lan ip, lan port
SnatKey = tuple[str, int, int]  # lan ip, proto, lan port
SnatVal = tuple[str, int]  # wan ip, wan port
_K = TypeVar("_K", FwdKey, SnatKey)


_MISSING: Any = object()
MAX_PACKED_ADDRS = 4096  # addresses a PairMap numbers (LAN hosts, the WAN address); values beyond stay tuples


class PairMap(MutableMapping[_K, tuple[str, int]]):
    """A map of tuple keys to (address, port) values, held as ``{key[:-1]: {key[-1]: value}}`` (a
    two-part key's first part alone) with the value packed, so that 10k forwards on a 128 MB router
    cost no key tuple and no value tuple per element (56-64 bytes each; 2.2 MiB for fwd4 and snat4).

    A value's address is numbered in a small table (the WAN address in snat4, the LAN hosts in
    fwd4); the element holds the port itself for the first address (the very int the binding
    holds: nothing new), ``n << 16 | port`` for the n-th. It takes and gives whole keys and
    (address, port) tuples, as the dict it replaces."""

    __slots__ = ("_d", "_n", "_addrs", "_addr_ids")

    def __init__(self) -> None:
        self._d: dict[Any, dict[int, Any]] = {}
        self._n = 0
        self._addrs: list[str] = []
        self._addr_ids: dict[str, int] = {}

    @staticmethod
    def _head(key: tuple) -> Any:
        return key[0] if len(key) == 2 else key[:-1]

    def _pack(self, value: tuple[str, int]) -> Any:
        addr, port = value
        if type(port) is not int or not 0 <= port <= 0xFFFF:
            return value  # (no such element in natd's maps; kept as it came)
        n = self._addr_ids.get(addr)
        if n is None:
            if len(self._addrs) >= MAX_PACKED_ADDRS:
                return value
            n = self._addr_ids[addr] = len(self._addrs)
            self._addrs.append(addr)
        return port if n == 0 else n << 16 | port

    def _unpack(self, held: Any) -> tuple[str, int]:
        if type(held) is int:
            return (self._addrs[held >> 16], held & 0xFFFF)
        return held

    def __getitem__(self, key: _K) -> tuple[str, int]:
        return self._unpack(self._d[self._head(key)][key[-1]])

    def get(self, key: _K, default: Any = None) -> Any:
        inner = self._d.get(self._head(key))
        if inner is None:
            return default
        held = inner.get(key[-1], _MISSING)
        return default if held is _MISSING else self._unpack(held)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) < 2:
            return False
        inner = self._d.get(self._head(key))
        return inner is not None and key[-1] in inner

    def __setitem__(self, key: _K, value: tuple[str, int]) -> None:
        head = self._head(key)
        inner = self._d.get(head)
        if inner is None:
            inner = self._d[head] = {}
        n = len(inner)
        inner[key[-1]] = self._pack(value)
        self._n += len(inner) - n

    def __delitem__(self, key: _K) -> None:
        self.pop(key)  # (one place keeps the count and drops an emptied inner dict)

    def pop(self, key: _K, default: Any = _MISSING) -> Any:
        """As dict.pop (the delta path's removal, with one lookup of the element)."""
        head = self._head(key)
        inner = self._d.get(head)
        held = _MISSING if inner is None else inner.pop(key[-1], _MISSING)
        if held is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        self._n -= 1
        if not inner:
            del self._d[head]
        return self._unpack(held)

    def __iter__(self) -> Iterator[_K]:
        for head in self._d:
            first: tuple = head if isinstance(head, tuple) else (head,)
            for tail in self._d[head]:
                key: Any = (*first, tail)
                yield key

    def __len__(self) -> int:
        return self._n

    def __eq__(self, other: object) -> bool:
        """Element by element: Mapping's own ``__eq__`` builds a dict of every item of both first, which
        for the healer's check of 10k forwards was a ~6 MiB peak whose arenas the allocator kept."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return len(self) == len(other) and all(other.get(k, _MISSING) == v for k, v in self.items())

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dict

    def __repr__(self) -> str:
        return f"PairMap({dict(self.items())!r})"


def _merge(have: MutableMapping[_K, tuple[str, int]], changes: Mapping[_K, tuple[str, int] | None]) -> None:
    """Apply a delta to the cached map: None removes the element."""
    for k, v in changes.items():
        if v is None:
            have.pop(k, None)
        else:
            have[k] = v


BULK_MIN = 64  # element changes from which a write goes as a netlink batch rather than nft text
_PROTO_PORT = struct.Struct("!B3xH2x")  # concatenation fields each fill a 4-byte register
_PORT = struct.Struct("!H2x")


def _fwd_key(k: FwdKey) -> bytes:
    return _PROTO_PORT.pack(k[0], k[1])


def _snat_key(k: SnatKey) -> bytes:
    return socket.inet_aton(k[0]) + _PROTO_PORT.pack(k[1], k[2])


def _addr_port(v: tuple[str, int]) -> bytes:
    return socket.inet_aton(v[0]) + _PORT.pack(v[1])


def _ip(packed: bytes) -> str:
    # interned: one LAN host's address is in thousands of elements, one string serves them all
    return sys.intern(socket.inet_ntoa(packed))


def _fwd_item(key: bytes, data: bytes) -> tuple[FwdKey, FwdVal]:
    """A fwd4 element from its netlink values (the inverse of _fwd_key / _addr_port)."""
    return (key[0], _PORT.unpack_from(key, 4)[0]), (_ip(data[:4]), _PORT.unpack_from(data, 4)[0])


def _snat_item(key: bytes, data: bytes) -> tuple[SnatKey, SnatVal]:
    """A snat4 element from its netlink values (the inverse of _snat_key / _addr_port)."""
    return ((_ip(key[:4]), key[4], _PORT.unpack_from(key, 8)[0]), (_ip(data[:4]), _PORT.unpack_from(data, 4)[0]))


# One element that changes: key, the element there now (None: absent), the one wanted (None: remove).
_Change = tuple[_K, tuple[str, int] | None, tuple[str, int] | None]


def _changes(delta: dict[_K, tuple[str, int] | None], current: Mapping[_K, tuple[str, int]]) -> list[_Change[_K]]:
    """The keys of ``delta`` whose element really changes, with what is there now and what is wanted."""
    return [(k, current.get(k), v) for k, v in delta.items() if current.get(k) != v]


def _delta_ops(changes: list[_Change[_K]], key: Callable[[_K], bytes]) -> list[netlink.ElemOp]:
    """One map's changes for a netlink batch: replaced and removed elements out, then the new ones in."""
    dels: list[netlink.ElemOp] = [(key(k), None) for k, old, _ in changes if old is not None]
    return dels + [(key(k), _addr_port(new)) for k, _, new in changes if new is not None]


def _map_diff(w: Mapping[_K, tuple[str, int]], h: Mapping[_K, tuple[str, int]]) -> tuple[list[_K], list[_K]]:
    """The keys whose element in ``h`` must go, and those whose element in ``w`` must be added."""
    return list(_new_keys(h, w)), list(_new_keys(w, h))


def _new_keys(w: Mapping[_K, tuple[str, int]], h: Mapping[_K, tuple[str, int]]) -> Iterator[_K]:
    """The keys whose element in ``w`` is not in ``h`` as it is (absent or other), one at a time;
    with the two maps swapped, the keys whose element in ``h`` must go."""
    return (k for k in w if h.get(k) != w[k])


def _bulk_ops(gone: list[_K], w: Mapping[_K, tuple[str, int]], h: Mapping[_K, tuple[str, int]],
              key: Callable[[_K], bytes]) -> Iterator[netlink.ElemOp]:
    """A whole-map diff as a netlink batch's ops, made while the batch is written (a restore of 10k
    forwards held ~6 MiB of keys and ops at once, and the allocator kept what they had filled):
    ``gone``'s elements out (a changed key is among them), then every new element in."""
    for k in gone:
        yield key(k), None
    for k in _new_keys(w, h):
        yield key(k), _addr_port(w[k])


def _dump_matches(dump: Iterable[netlink.ElemVal], item: Callable[[bytes, bytes], tuple[_K, tuple[str, int]]],
                  want: Mapping[_K, tuple[str, int]]) -> bool:
    """Every element of a map's ``dump`` is in ``want`` as it is there, and they are as many."""
    n = 0
    for k, v in dump:
        if v is None:
            continue
        key, val = item(k, v)
        if want.get(key, _MISSING) != val:
            return False
        n += 1
    return n == len(want)


def _fwd_elem(k: FwdKey) -> str:
    return f"{PROTO_NAMES[k[0]]} . {k[1]}"


def _snat_elem(k: SnatKey) -> str:
    return f"{k[0]} . {PROTO_NAMES[k[1]]} . {k[2]}"


LAN_PCP_CHAIN = "lanpcp"  # split layout: LAN PCP steered to controld (steer_lan_pcp)


class NftError(RuntimeError):
    """libnftables refused a command; the message is nft's own."""


@dataclass(frozen=True)
class Layout:
    """Where natd's objects live; the only difference between standalone and fw4."""

    name: str
    family: str
    table: str
    prefix: str

    @classmethod
    def make(cls, name: str, table: str = default("table")) -> Layout:
        """``standalone`` (own table ``ip <table>``) or ``fw4`` (inside ``inet fw4``)."""
        if name == "standalone":
            return cls("standalone", "ip", table, "")
        if name == "fw4":
            return cls("fw4", "inet", "fw4", "igdpcp_")
        raise ValueError(f"layout must be one of {LAYOUTS}")

    @property
    def own_table(self) -> bool:
        return self.name == "standalone"

    def obj(self, name: str) -> str:
        return self.prefix + name

    @property
    def where(self) -> str:
        return f"{self.family} {self.table}"

    def chains(self) -> dict[str, list[tuple[str, str]]]:
        """Our chains and their rules as (comment tag, rule text); order matters."""
        # family ip is IPv4 by itself (nft refuses nfproto there); inet needs the selector.
        p, v4 = self.prefix, ("meta nfproto ipv4" if self.family == "inet" else "ip version 4")
        # Mark, then translate; a flow no forward matches falls through to the "-miss" rule,
        # which takes the mark back (a map used as a set needs Linux 6.5, so no lookup first).
        mark, unmark = (f"ct mark set ct mark or {CT_MARK:#010x}",
                        f"ct mark set ct mark and {~CT_MARK & 0xFFFFFFFF:#010x}")
        to_wan = f"{v4} ip daddr @{p}wan4"
        to_lan = f"dnat ip to meta l4proto . th dport map @{p}fwd4"
        # Only WAN ingress (and LAN for hairpin): a guest-zone host's packet to WANaddr:port
        # stays addressed to the router, where the zone's input policy judges it.
        ingress = f"{v4} iifname @{p}inif ip daddr @{p}wan4"
        dnat = (f"{TAG} dnat", f"{ingress} {mark} {to_lan}")
        dnat_miss = (f"{TAG} dnat-miss", f"{ingress} {unmark}")
        hairpin = (f"{TAG} hairpin",  # LAN -> WAN address -> LAN: the server must answer via us
                   f"{v4} ct status dnat ip saddr @{p}lan4 ct original ip daddr @{p}wan4 masquerade")
        out = f"{v4} oifname @{p}wanif meta l4proto {{ tcp, udp }}"  # WAN egress only: not into a guest/VPN zone
        snat = (f"{TAG} snat", f"{out} {mark} snat ip to ip saddr . meta l4proto . th sport map @{p}snat4")
        snat_miss = (f"{TAG} snat-miss", f"{out} {unmark}")
        fwd = (f"{TAG} forward", f"{v4} iifname @{p}inif ct status dnat ct original ip daddr @{p}wan4 accept")
        if self.own_table:
            local = (f"{TAG} dnat local", f"{to_wan} {mark} {to_lan}")  # the router's own connections: no iif
            local_miss = (f"{TAG} dnat-local-miss", f"{to_wan} {unmark}")
            return {"prerouting": [dnat, dnat_miss], "output": [local, local_miss],
                    "postrouting": [hairpin, snat, snat_miss], "forward": [fwd]}
        announce = (f"{TAG} pcp announce", f"{v4} iifname @{p}wanif ip saddr @{p}pcp4 "
                                           f"udp sport {PCP_SERVER_PORT} udp dport {PCP_CLIENT_PORT} accept")
        return {f"{p}dstnat": [dnat, dnat_miss], f"{p}srcnat": [hairpin, snat, snat_miss], f"{p}forward": [fwd],
                f"{p}input": [announce]}

    def chain_decl(self, chain: str) -> str:
        """The ``add chain`` body: base chains with hooks (standalone) or plain chains (fw4)."""
        hooks = {
            "prerouting": "type nat hook prerouting priority dstnat; policy accept;",
            "output": "type nat hook output priority -100; policy accept;",
            # Before the host's own masquerade (srcnat) so the mapped source port wins.
            "postrouting": "type nat hook postrouting priority srcnat - 1; policy accept;",
            "forward": "type filter hook forward priority filter; policy accept;",
        }
        return f"{{ {hooks[chain]} }}" if self.own_table else ""

    def jumps(self) -> dict[str, str]:
        """fw4 only: fw4 base chain -> our chain (installed by the include files)."""
        if self.own_table:
            return {}
        return {b: f"{self.prefix}{b}" for b in ("dstnat", "srcnat", "forward", "input")}

    @staticmethod
    def include_position(base: str) -> str:
        """fw4 include directory for the jump in ``base``: chain-pre or chain-post."""
        # srcnat: before fw4's masquerade (a NAT verdict ends the chain); input: before the
        # zone jumps end in reject. dstnat/forward: after fw4's own redirects and rules.
        return "chain-pre" if base in ("srcnat", "input") else "chain-post"


@dataclass
class KernelState:
    """What natd believes its maps and sets hold; re-read from the kernel when in doubt."""

    fwd: MutableMapping[FwdKey, FwdVal] = field(default_factory=PairMap)
    snat: MutableMapping[SnatKey, SnatVal] = field(default_factory=PairMap)
    wan: set[str] = field(default_factory=set)
    lan: set[str] = field(default_factory=set)
    wanif: set[str] = field(default_factory=set)
    inif: set[str] = field(default_factory=set)
    pcp: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Change:
    """The outcome of one :meth:`Nft.apply`; ``gone_*`` name what conntrack should forget."""

    added: int = 0
    removed: int = 0
    gone_fwd: tuple[tuple[FwdKey, FwdVal], ...] = ()
    gone_snat: tuple[tuple[SnatKey, SnatVal], ...] = ()
    old_wan: tuple[str, ...] = ()


class FwNotReady(NftError):
    """fw4 layout: ``table inet fw4`` (or its base chains) is not loaded yet."""


class Nft:
    """natd's nftables objects; the only code that writes them."""

    def __init__(self, layout: Layout | None = None, wan_if: str | None = None, lan_if: str | None = None) -> None:
        self.layout = layout or Layout.make(default("layout"))
        self._nft = nftables.Nftables()
        self._nft.set_json_output(False)
        self.state = KernelState()
        self.wan_if, self.lan_if = wan_if, lan_if
        self.pcp_servers: set[str] = set()  # fw4: whose ANNOUNCE the input chain lets in

    def expected(self, bindings: Iterable[Binding], wan_ip: str | None, lan: Iterable[str] = ()) -> KernelState:
        """:func:`expected` plus the device sets and (fw4) the PCP servers."""
        st = expected(bindings, wan_ip, lan)
        st.wanif = {self.wan_if} if self.wan_if else set()
        st.inif = {d for d in (self.wan_if, self.lan_if) if d}
        st.pcp = set() if self.layout.own_table else set(self.pcp_servers)
        return st

    @property
    def table(self) -> str:
        return self.layout.table

    def run(self, script: str) -> str:
        """Run one batch of nft commands as a single transaction."""
        rc, out, err = self._nft.cmd(script)
        if rc != 0:
            raise NftError(err.strip() or f"nft failed ({rc})")
        return out

    def _list_json(self, what: str, terse: bool = False) -> list[dict]:
        """``list what`` as JSON; ``terse`` leaves every set's elements out."""
        self._nft.set_json_output(True)
        self._nft.set_terse_output(terse)
        try:
            rc, out, err = self._nft.cmd(f"list {what}")
        finally:
            self._nft.set_json_output(False)
            self._nft.set_terse_output(False)
        if rc != 0:
            raise NftError(err.strip())
        return json.loads(out).get("nftables", [])

    # --- structure -------------------------------------------------------------------

    def _structure(self) -> tuple[bool, KernelState, set[str]]:
        """(rules intact, the small sets, the names declared) from the table's JSON listing, without
        the maps' elements; NftError or OSError when it cannot be read.

        Intact means our chains hold exactly our rules and, in fw4, fw4's jumps to them exist.
        """
        lay, p = self.layout, self.layout.prefix
        items = self._listing(lay.where)
        declared: set[str] = {obj.get("name") for i in items for obj in (i.get("map") or i.get("set"),) if obj}
        for name in ("wan4", "lan4", "wanif", "inif", "pcp4"):
            if f"{p}{name}" in declared:
                items += self._list_json(f"set {lay.where} {p}{name}")
        rules: dict[str, list[str | None]] = {}
        jumps: set[tuple[str, str]] = set()
        for item in items:
            r = item.get("rule")
            if r is None:
                continue
            rules.setdefault(r["chain"], []).append(r.get("comment"))
            for e in r.get("expr", []):
                if "jump" in e:
                    jumps.add((r["chain"], e["jump"].get("target")))
        ok = all(rules.get(c) == [tag for tag, _ in rs] for c, rs in lay.chains().items())
        ok = ok and all(j in jumps for j in lay.jumps().items())
        return ok, self._elements(items), declared

    def _dump(self, name: str) -> Iterator[netlink.ElemVal]:
        """One of our maps' elements, as the kernel's dump arrives."""
        lay = self.layout
        return netlink.nft_dump_elements(netlink.FAMILIES[lay.family], lay.table, f"{lay.prefix}{name}")

    def snapshot(self) -> tuple[bool, KernelState]:
        """(structure intact, elements): the table without elements, each small set, and the two maps'
        elements as raw netlink values (their JSON listing costs ~7 KiB of Python objects per forward
        and left natd ~30 MiB larger after one look at 10k forwards), taken into the picture as the
        dump arrives (a list of the whole dump first was ~2.7 MiB more at 10k).

        Lists every element, so natd calls it only when the ruleset's generation changed (see
        natd.nftmon) and :meth:`holds` said no, never blindly every second.
        """
        p = self.layout.prefix
        try:
            ok, st, declared = self._structure()
            if f"{p}fwd4" in declared:
                st.fwd.update(_fwd_item(k, v) for k, v in self._dump("fwd4") if v is not None)
            if f"{p}snat4" in declared:
                st.snat.update(_snat_item(k, v) for k, v in self._dump("snat4") if v is not None)
        except (NftError, OSError):
            return False, KernelState()
        return ok, st

    def holds(self, want: KernelState) -> bool:
        """Structure intact and every set and map exactly ``want``, checked element by element as the
        dump arrives: the healer's usual case (a ruleset change that was not to our objects: an fw4
        reload, another table) builds no picture of the kernel's 10k forwards."""
        p = self.layout.prefix
        try:
            ok, st, declared = self._structure()
            return (ok and (st.wan, st.lan, st.wanif, st.inif, st.pcp) == (want.wan, want.lan, want.wanif,
                                                                          want.inif, want.pcp)
                    and {f"{p}fwd4", f"{p}snat4"} <= declared
                    and _dump_matches(self._dump("fwd4"), _fwd_item, want.fwd)
                    and _dump_matches(self._dump("snat4"), _snat_item, want.snat))
        except (NftError, OSError):
            return False

    def structure_ok(self) -> bool:
        """True when our objects and rules are all in place."""
        try:
            return self._structure()[0]
        except (NftError, OSError):
            return False

    def _listing(self, where: str) -> list[dict]:
        """Table ``where``'s ("family name") chains, rules and sets, without their elements, as JSON items.

        From a terse listing of the family's ruleset: libnftables fills its cache with every
        element of every set of a table it lists (a ``list table`` or ``list chain``, terse or
        not), ~3 KiB of C heap per element, and keeps that cache until its next command: 31 MiB
        at 10k forwards, at every check of the healer. A ``list set`` fills it with that set's."""
        family, table = where.split()
        return [i for i in self._list_json(f"ruleset {family}", terse=True)
                if any(isinstance(v, dict) and v.get("table") == table for v in i.values())]

    def _has_jump(self, base: str, target: str) -> bool:
        for item in self._listing(self.layout.where):
            rule = item.get("rule", {})
            if rule.get("chain") == base and any(e.get("jump", {}).get("target") == target
                                                 for e in rule.get("expr", [])):
                return True
        return False

    def setup(self) -> None:
        """Declare our objects and (re)write our rules, one transaction; adopt existing elements.

        Maps keep their elements (``add`` of an existing map is a no-op), so a restart
        adopts the forwards an earlier natd left and traffic never pauses.
        """
        lay, p = self.layout, self.layout.prefix
        if not lay.own_table:
            self._check_fw4()
        lines = [f"add table {lay.where}"] if lay.own_table else []
        lines += [
            f"add map {lay.where} {p}fwd4 {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}",
            f"add map {lay.where} {p}snat4 {{ type ipv4_addr . inet_proto . inet_service : "
            f"ipv4_addr . inet_service; }}",
            f"add set {lay.where} {p}wan4 {{ type ipv4_addr; }}",
            f"add set {lay.where} {p}lan4 {{ type ipv4_addr; flags interval; }}",
            f"add set {lay.where} {p}wanif {{ type ifname; }}",
            f"add set {lay.where} {p}inif {{ type ifname; }}",
        ]
        if not lay.own_table:
            lines.append(f"add set {lay.where} {p}pcp4 {{ type ipv4_addr; }}")
        for chain, rules in lay.chains().items():
            lines.append(f"add chain {lay.where} {chain} {lay.chain_decl(chain)}")
            lines.append(f"flush chain {lay.where} {chain}")
            lines += [f'add rule {lay.where} {chain} {text} comment "{tag}"' for tag, text in rules]
        for base, target in lay.jumps().items():
            if not self._has_jump(base, target):
                # The include files should have put it there; fall back so forwards still work.
                log.warning("fw4 chain %s lacks 'jump %s' (packaging/fw4 include files missing?); inserting it",
                            base, target)
                lines.append(f'insert rule {lay.where} {base} jump {target} comment "{TAG} jump"')
        self.run("\n".join(lines))
        self.state = self.read()
        log.info("nft %s layout in %s ready, adopted %d forwards", lay.name, lay.where, len(self.state.fwd))

    def _check_fw4(self) -> None:
        try:
            names = {i["chain"]["name"] for i in self._list_json("chains inet") if "chain" in i
                     and i["chain"].get("table") == "fw4"}
        except NftError as exc:
            raise FwNotReady(f"cannot list fw4 chains: {exc}") from None
        missing = set(self.layout.jumps()) - names
        if missing:
            raise FwNotReady(f"table inet fw4 is not loaded (missing chains {sorted(missing)})")

    # --- elements --------------------------------------------------------------------

    def read(self) -> KernelState:
        """Read our maps and sets back from the kernel."""
        return self.snapshot()[1]

    def _elements(self, items: list[dict]) -> KernelState:
        """The small sets from a JSON listing (the maps' elements come as netlink values, see snapshot)."""
        st = KernelState()
        p = self.layout.prefix
        for item in items:
            obj = item.get("map") or item.get("set")
            if not obj or not obj.get("name", "").startswith(p):
                continue
            name = obj["name"][len(p):]
            plain = {"wan4": st.wan, "wanif": st.wanif, "inif": st.inif, "pcp4": st.pcp}
            for elem in obj.get("elem", []):
                if name in plain:
                    plain[name].add(elem if isinstance(elem, str) else elem.get("elem", {}).get("val", ""))
                elif name == "lan4":
                    st.lan.add(_prefix(elem))
        return st

    def apply(self, bindings: Iterable[Binding], wan_ip: str | None, lan: Iterable[str] = ()) -> Change:
        """Make the kernel hold exactly ``bindings`` on ``wan_ip``; only the difference is written.

        If our picture of the kernel was wrong (someone else changed it), re-read and
        try once more.
        """
        bindings = list(bindings)
        want = self.expected(bindings, wan_ip, lan)
        for attempt in (1, 2):
            try:
                bulk = self._write_bulk(want)
                if bulk is not None:
                    self.state = want
                    return bulk
                script, change = self._diff(want)
                if not script:
                    self.state = want  # the same; a picture read from the kernel holds its own ints
                    return change
                self.run(script)
                self.state = want
                return change
            except NftError as exc:
                if attempt == 2 or isinstance(exc, FwNotReady):
                    raise
                log.warning("nft state drifted (%s); re-reading and retrying", exc)
                if not self.structure_ok():
                    self.setup()
                self.state = self.read()
        raise AssertionError("unreachable")

    def apply_delta(self, fwd: dict[FwdKey, FwdVal | None], snat: dict[SnatKey, SnatVal | None]) -> Change:
        """Write only the named keys (None: absent): O(changed), whatever N is (Bind/Unbind).

        The elements go as one nf_tables batch on natd's netlink socket (tens of microseconds);
        the same change as nft text when the kernel refused that (nothing of it applied) or the
        state drifted, so the text path's re-read and retry decide."""
        for attempt in (1, 2):
            have = self.state
            fc, sc = _changes(fwd, have.fwd), _changes(snat, have.snat)
            change = Change(sum(1 for _, _, new in fc if new is not None), sum(1 for _, _, new in fc if new is None),
                            tuple((k, old) for k, old, _ in fc if old is not None),
                            tuple((k, old) for k, old, _ in sc if old is not None), tuple(sorted(have.wan)))
            if not fc and not sc:
                return change
            if attempt == 1 and self._write_delta(fc, sc):
                _merge(self.state.fwd, fwd)
                _merge(self.state.snat, snat)
                return change
            try:
                self.run("\n".join([*self._delta_lines("fwd4", fc, _fwd_elem),
                                     *self._delta_lines("snat4", sc, _snat_elem)]))
            except NftError as exc:
                if attempt == 2:
                    raise
                log.warning("nft state drifted (%s); re-reading and retrying", exc)
                if not self.structure_ok():
                    self.setup()
                self.state = self.read()
                continue
            _merge(self.state.fwd, fwd)
            _merge(self.state.snat, snat)
            return change
        raise AssertionError("unreachable")

    def _write_delta(self, fc: list[_Change[FwdKey]], sc: list[_Change[SnatKey]]) -> bool:
        """The changes as one netlink batch (per map: the replaced or removed elements, then the new);
        False when it was not applied (then nothing of it was)."""
        p = self.layout.prefix
        changes = [(f"{p}fwd4", _delta_ops(fc, _fwd_key)), (f"{p}snat4", _delta_ops(sc, _snat_key))]
        try:
            netlink.nft_batch(changes, netlink.FAMILIES[self.layout.family], self.layout.table)
        except OSError as exc:
            log.debug("netlink element batch not applied (%s); writing it as nft text", exc)
            return False
        return True

    def _delta_lines(self, name: str, changes: list[_Change[_K]], fmt: Callable[[_K], str]) -> list[str]:
        """The same changes as nft text (the fallback when the kernel refused the batch)."""
        lay, p = self.layout, self.layout.prefix
        lines: list[str] = []
        for k, old, new in changes:
            if old is not None:
                lines.append(f"delete element {lay.where} {p}{name} {{ {fmt(k)} }}")
            if new is not None:
                lines.append(f"add element {lay.where} {p}{name} {{ {fmt(k)} : {new[0]} . {new[1]} }}")
        return lines

    def _diff_lines(self, lines: list[str], name: str, w: Mapping[_K, tuple[str, int]], h: Mapping[_K, tuple[str, int]],
                    fmt: Callable[[_K], str]) -> list[_K]:
        """Append the nft lines that turn map `h` into `w`; return the keys whose element went away."""
        lay, p = self.layout, self.layout.prefix
        gone, new = _map_diff(w, h)
        if gone:
            lines.append(f"delete element {lay.where} {p}{name} {{ {', '.join(fmt(k) for k in gone)} }}")
        if new:
            elems = ", ".join(f"{fmt(k)} : {w[k][0]} . {w[k][1]}" for k in new)
            lines.append(f"add element {lay.where} {p}{name} {{ {elems} }}")
        return gone

    def _write_bulk(self, want: KernelState) -> Change | None:
        """Write the map elements that differ from ``want`` as one netlink batch when they are many;
        None when the nft text is to be run instead (few changes, or the batch failed: nothing of it
        applied, so the text transaction starts clean)."""
        have = self.state
        fwd_gone, snat_gone = list(_new_keys(have.fwd, want.fwd)), list(_new_keys(have.snat, want.snat))
        fwd_new = sum(1 for _ in _new_keys(want.fwd, have.fwd))  # counted here, made in the batch
        if len(fwd_gone) + fwd_new + len(snat_gone) + sum(1 for _ in _new_keys(want.snat, have.snat)) < BULK_MIN:
            return None
        old_wan = tuple(sorted(have.wan))
        if (have.wan, have.lan, have.wanif, have.inif, have.pcp) != (want.wan, want.lan, want.wanif, want.inif,
                                                                      want.pcp):
            # The sets first, as nft text (a few elements), then the maps' batch: two transactions,
            # met only when the forwards are rebuilt anyway (the table restored after a flush or at
            # start, a new WAN address); libnftables would peak at ~4 KiB per element parsed.
            sets = KernelState(have.fwd, have.snat, want.wan, want.lan, want.wanif, want.inif, want.pcp)
            script, _ = self._diff(sets)
            self.run(script)
            self.state = have = sets
        p = self.layout.prefix
        changes = [(f"{p}fwd4", _bulk_ops(fwd_gone, want.fwd, have.fwd, _fwd_key)),
                   (f"{p}snat4", _bulk_ops(snat_gone, want.snat, have.snat, _snat_key))]
        try:
            netlink.nft_batch(changes, netlink.FAMILIES[self.layout.family], self.layout.table)
        except OSError as exc:  # refused or not possible here: the same change as nft text
            log.debug("netlink element batch not applied (%s); writing it as nft text", exc)
            return None
        return Change(added=fwd_new, removed=sum(1 for k in fwd_gone if k not in want.fwd),
                      gone_fwd=tuple((k, have.fwd[k]) for k in fwd_gone),
                      gone_snat=tuple((k, have.snat[k]) for k in snat_gone), old_wan=old_wan)

    def _diff(self, want: KernelState) -> tuple[str, Change]:
        have, lay, p = self.state, self.layout, self.layout.prefix
        lines: list[str] = []

        gone_fwd = self._diff_lines(lines, "fwd4", want.fwd, have.fwd, _fwd_elem)
        gone_snat = self._diff_lines(lines, "snat4", want.snat, have.snat, _snat_elem)
        q = '"{}"'.format  # device names are strings in nft syntax
        for name, w_set, h_set, fmt in (("wan4", want.wan, have.wan, str), ("lan4", want.lan, have.lan, str),
                                        ("wanif", want.wanif, have.wanif, q), ("inif", want.inif, have.inif, q),
                                        ("pcp4", want.pcp, have.pcp, str)):
            if w_set != h_set:
                if h_set - w_set:
                    lines.append(f"delete element {lay.where} {p}{name} "
                                 f"{{ {', '.join(fmt(e) for e in sorted(h_set - w_set))} }}")
                if w_set - h_set:
                    lines.append(f"add element {lay.where} {p}{name} "
                                 f"{{ {', '.join(fmt(e) for e in sorted(w_set - h_set))} }}")
        change = Change(
            added=sum(1 for k in want.fwd if have.fwd.get(k) != want.fwd[k]),
            removed=sum(1 for k in have.fwd if k not in want.fwd),
            gone_fwd=tuple((k, have.fwd[k]) for k in gone_fwd),
            gone_snat=tuple((k, have.snat[k]) for k in gone_snat),
            old_wan=tuple(sorted(have.wan)),
        )
        return "\n".join(lines), change

    # --- LAN PCP steering (split layout; docs/lan-pcp.md) --------------------------------

    def steer_lan_pcp(self, target: str) -> None:
        """DNAT LAN hosts' PCP/NAT-PMP (udp 5351 to any of the router's own addresses) to
        controld at ``target`` in its own namespace. The client's source stays as it is, so
        ownership and ADDRESS_MISMATCH (RFC 6887 §8.2) still see the host; conntrack turns
        the answer's source back into the gateway's. Standalone layout only."""
        lay = self.layout
        if not lay.own_table:
            log.warning("fw4 layout: LAN PCP steering to %s is not installed (use a dstnat redirect in fw4)", target)
            return
        try:
            ipaddress.IPv4Address(target)  # nothing but an address reaches nft
        except ValueError:
            raise NftError(f"pcp-steer-to {target!r} is not an IPv4 address") from None
        lan = f'iifname "{self.lan_if}" ' if self.lan_if else ""
        self.run("\n".join([
            f"add chain {lay.where} {LAN_PCP_CHAIN} {{ type nat hook prerouting priority dstnat - 1; policy accept; }}",
            f"flush chain {lay.where} {LAN_PCP_CHAIN}",
            f"add rule {lay.where} {LAN_PCP_CHAIN} ip version 4 {lan}fib daddr type local ip daddr != {target} "
            f'udp dport {PCP_SERVER_PORT} dnat ip to {target} comment "{TAG} lan-pcp"',
        ]))
        log.info("LAN PCP/NAT-PMP (udp %d to the router) steered to controld at %s", PCP_SERVER_PORT, target)

    def teardown(self) -> None:
        """Remove natd's objects (explicit uninstall only, never on restart)."""
        lay = self.layout
        if lay.own_table:
            self.run(f"delete table {lay.where}")
            return
        lines = [f"flush chain {lay.where} {c}" for c in lay.chains()]
        self.run("\n".join(lines))


def expected(bindings: Iterable[Binding], wan_ip: str | None, lan: Iterable[str] = ()) -> KernelState:
    """The kernel state that ``bindings`` on ``wan_ip`` call for (the one place this is decided)."""
    fwd: PairMap[FwdKey] = PairMap()
    snat: PairMap[SnatKey] = PairMap()
    # One SNAT per LAN tuple: the oldest mapping (lowest mid) owns the source port.
    for b in sorted(bindings, key=lambda b: b.mid):
        fwd[(b.proto, b.wan_port)] = (b.lan_ip, b.lan_port)
        if wan_ip:
            snat.setdefault((b.lan_ip, b.proto, b.lan_port), (wan_ip, b.wan_port))
    # lan4 is an interval set: overlapping subnets (an alias /32 inside the /24) must be merged.
    merged = ipaddress.collapse_addresses(ipaddress.IPv4Network(n, strict=False) for n in lan)
    return KernelState(fwd, snat, {wan_ip} if wan_ip else set(), {str(n) for n in merged})


def _prefix(elem: object) -> str:
    """An interval-set element from nft JSON as ``a.b.c.d/len``."""
    if isinstance(elem, str):
        return elem if "/" in elem else f"{elem}/32"
    if isinstance(elem, dict):
        if "prefix" in elem:
            return f"{elem['prefix']['addr']}/{elem['prefix']['len']}"
        if "elem" in elem:
            return _prefix(elem["elem"].get("val"))
        if "range" in elem:
            return f"{elem['range'][0]}-{elem['range'][1]}"
    return str(elem)


FW4_INCLUDE_ORDER = "30"  # after miniupnpd's 20- files (openwrt.md §4.5 item 1)


def fw4_includes() -> dict[str, str]:
    """The /usr/share/nftables.d/ include files the fw4 layout expects, by relative path.

    Generated from :class:`Layout` so the rules natd verifies and the rules fw4 loads
    are the same text; packaging/fw4/ holds this output (tests/unit/test_natd_units.py checks).
    Declaring rules here too means a fw4 reload brings them back at once; natd only
    re-adds map elements (fw4 includes nftables.d files inside ``table inet fw4``).
    """
    lay = Layout.make("fw4")
    p = lay.prefix
    name = f"{FW4_INCLUDE_ORDER}-igdpcp.nft"
    head = "# igdpcp natd, fw4 layout (igdpcp-natd --layout fw4). Installs as /usr/share/nftables.d/{}\n"
    body = [
        f"map {p}fwd4 {{\n\ttype inet_proto . inet_service : ipv4_addr . inet_service\n}}",
        f"map {p}snat4 {{\n\ttype ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service\n}}",
        f"set {p}wan4 {{\n\ttype ipv4_addr\n}}",
        f"set {p}lan4 {{\n\ttype ipv4_addr\n\tflags interval\n}}",
        f"set {p}wanif {{\n\ttype ifname\n}}",
        f"set {p}inif {{\n\ttype ifname\n}}",
        f"set {p}pcp4 {{\n\ttype ipv4_addr\n}}",
    ]
    for chain, rules in lay.chains().items():
        lines = "".join(f'\t{text} comment "{tag}"\n' for tag, text in rules)
        body.append(f"chain {chain} {{\n{lines}}}")
    files = {f"table-post/{name}": head.format(f"table-post/{name}") + "\n\n".join(body) + "\n"}
    for base, target in lay.jumps().items():
        path = f"{lay.include_position(base)}/{base}/{name}"
        files[path] = head.format(path) + f'jump {target} comment "{TAG} jump"\n'
    files.update(pinhole_fw4_includes())
    return files


# --- IPv6 pinholes (docs/pinholes.md) ----------------------------------------------------
#
# A pinhole is a set element, not a rule: ``ip6 daddr . meta l4proto . th dport`` (any remote
# host) or ``ip6 saddr . ip6 daddr . meta l4proto . th dport`` (one remote host), looked up by
# two fixed rules, so a packet costs one hash lookup per set and a change one element. Each
# element carries a timeout (lease + grace): controld deletes a pinhole at its lease's end,
# the kernel closes it anyway if controld is gone. Sets carry per-element counters
# (GetPinholePackets). The place is one of three (PinholePlace.make): inside fw4's forward
# path, natd's own ``table ip6`` with the inbound default drop, or the admin's named chain.

PinKey = tuple[str, int, int, "str | None"]  # lan ip, proto, lan port, remote host (None: any)
IPV6_FIREWALL_MODES = ("auto", "own", "off", "table:FAMILY:TABLE:CHAIN")
# RFC 4890 §4.3.1: ICMPv6 errors (and echo, §4.3.1 too) must cross the firewall, or PMTU
# discovery and error reporting break for the LAN; conntrack's "related" covers most, not all.
ICMPV6_ESSENTIAL = ("destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem",
                    "echo-request", "echo-reply")


@dataclass(frozen=True)
class PinholePlace:
    """Where the pinhole sets and rules live (``--ipv6-firewall``)."""

    mode: str  # fw4, own or table
    family: str
    table: str
    chain: str
    prefix: str

    @classmethod
    def make(cls, setting: str, layout: Layout) -> PinholePlace | None:
        """The place ``--ipv6-firewall`` names for ``layout``; None for off (standalone auto: off)."""
        if setting == "off" or (setting == "auto" and layout.own_table):
            return None
        if setting == "auto":  # fw4 layout: inside fw4, so its forward policy stays the default drop
            return cls("fw4", "inet", "fw4", "igdpcp_pinholes", "igdpcp_")
        if setting == "own":
            if not layout.own_table:
                raise ValueError("--ipv6-firewall own needs the standalone layout (fw4 owns the drop)")
            return cls("own", "ip6", layout.table, "forward", "")
        parts = setting.split(":")
        if len(parts) == 4 and parts[0] == "table" and parts[1] in ("inet", "ip6") and all(parts[2:]):
            return cls("table", parts[1], parts[2], parts[3], "igdpcp_")
        raise ValueError(f"--ipv6-firewall must be one of {IPV6_FIREWALL_MODES}, not {setting!r}")

    @property
    def where(self) -> str:
        return f"{self.family} {self.table}"

    def obj(self, name: str) -> str:
        return self.prefix + name

    def rules(self) -> list[tuple[str, str]]:
        """Our chain's rules as (comment tag, text); in own mode with the inbound default drop."""
        p = self.prefix
        v6 = "meta nfproto ipv6 " if self.family == "inet" else ""  # ip6 is IPv6 by itself
        wan = f"{v6}iifname @{p}pinif"
        # Marked like the IPv4 forwards' flows: closing a pinhole forgets its flows (natd.main).
        ok = f"ct mark set ct mark or {CT_MARK:#010x} accept"
        pins = [(f"{TAG} pinhole", f"{wan} ip6 daddr . meta l4proto . th dport @{p}pin6 {ok}"),
                (f"{TAG} pinhole remote", f"{wan} ip6 saddr . ip6 daddr . meta l4proto . th dport @{p}pin6r {ok}")]
        if self.mode != "own":
            return pins
        return [(f"{TAG} v6 established", "ct state established,related accept"),
                (f"{TAG} v6 invalid", "ct state invalid drop"),
                (f"{TAG} v6 icmp", f"icmpv6 type {{ {', '.join(ICMPV6_ESSENTIAL)} }} accept"),
                *pins,
                (f"{TAG} v6 inbound drop", f"{wan} drop")]

    def chain_decl(self) -> str:
        """own: natd's base forward chain (policy accept: it only judges WAN ingress); else a plain chain."""
        return "{ type filter hook forward priority filter; policy accept; }" if self.mode == "own" else ""

    def jump(self) -> tuple[str, str] | None:
        """fw4: (fw4 base chain, our chain) the include file's jump links."""
        return ("forward", self.chain) if self.mode == "fw4" else None

    def declarations(self) -> list[tuple[str, str, str]]:
        """(kind, name, body) of our sets, one place for both nft commands and fw4's include file."""
        p = self.prefix
        return [("set", f"{p}pin6", "type ipv6_addr . inet_proto . inet_service; flags timeout; counter;"),
                ("set", f"{p}pin6r", "type ipv6_addr . ipv6_addr . inet_proto . inet_service; flags timeout; "
                                     "counter;"),
                ("set", f"{p}pinif", "type ifname;")]


_PIN_PROTO_PORT = struct.Struct("!B3xH2x")  # each concatenated field fills a 4-byte register
PACKETS_LOOKUPS = 16  # pinholes whose counters are read by a lookup each; for more, the sets are dumped


def pin_key_bytes(key: PinKey) -> bytes:
    """A pinhole key as the kernel holds it: [remote .] LAN address . protocol . port."""
    lan_ip, proto, port, remote = key
    head = socket.inet_pton(socket.AF_INET6, remote) if remote is not None else b""
    return head + socket.inet_pton(socket.AF_INET6, lan_ip) + _PIN_PROTO_PORT.pack(proto, port)


def pin_key_of(raw: bytes, remote: bool) -> PinKey | None:
    """The pinhole key a set element's raw key holds (the inverse of :func:`pin_key_bytes`); None
    for a key of another length."""
    head = 16 if remote else 0
    if len(raw) != head + 16 + _PIN_PROTO_PORT.size:
        return None
    proto, port = _PIN_PROTO_PORT.unpack_from(raw, head + 16)
    return (socket.inet_ntop(socket.AF_INET6, raw[head:head + 16]), proto, port,
            socket.inet_ntop(socket.AF_INET6, raw[:16]) if remote else None)


def pin_set(key: PinKey) -> str:
    """The set (name without prefix) a pinhole key lives in: any remote host, or one."""
    return "pin6" if key[3] is None else "pin6r"


def pin_elem(key: PinKey) -> tuple[str, str]:
    """(set name without prefix, element text) of a pinhole key."""
    lan_ip, proto, port, remote = key
    if remote is None:
        return pin_set(key), f"{lan_ip} . {PROTO_NAMES[proto]} . {port}"
    return pin_set(key), f"{remote} . {lan_ip} . {PROTO_NAMES[proto]} . {port}"


class PinholeNft:
    """natd's pinhole sets and rules; the only code that writes them (through :meth:`Nft.run`)."""

    def __init__(self, nft: Nft, place: PinholePlace, wan_if: str | None) -> None:
        self.nft, self.place, self.wan_if = nft, place, wan_if
        self.have: set[PinKey] = set()
        self.expires: dict[PinKey, int] = {}  # seconds left of each element, as of the last snapshot

    def setup(self) -> None:
        """Declare sets and chain, (re)write our rules; one transaction; existing elements kept."""
        pl, where = self.place, self.place.where
        if pl.mode == "fw4":
            self.nft._check_fw4()
        lines = [] if pl.mode == "fw4" else [f"add table {where}"]
        lines += [f"add {kind} {where} {name} {{ {body} }}" for kind, name, body in pl.declarations()]
        lines += [f"add chain {where} {pl.chain} {pl.chain_decl()}", f"flush chain {where} {pl.chain}"]
        lines += [f'add rule {where} {pl.chain} {text} comment "{tag}"' for tag, text in pl.rules()]
        j = pl.jump()
        if j and not self.nft._has_jump(*j):
            log.warning("fw4 chain %s lacks 'jump %s' (packaging/fw4 include files missing?); inserting it", *j)
            # At the start: appended, it would sit behind fw4's final 'jump handle_reject'.
            lines.append(f'insert rule {where} {j[0]} jump {j[1]} comment "{TAG} pinholes jump"')
        pinif = {self.wan_if} if self.wan_if else set()
        lines.append(f"flush set {where} {pl.obj('pinif')}")
        if pinif:
            devs = ", ".join(f'"{d}"' for d in sorted(pinif))
            lines.append(f"add element {where} {pl.obj('pinif')} {{ {devs} }}")
        self.nft.run("\n".join(lines))
        self.have = set(self.snapshot()[1])
        log.info("pinholes in %s chain %s (%s) ready, %d in place", where, pl.chain, pl.mode, len(self.have))

    def snapshot(self) -> tuple[bool, dict[PinKey, int]]:
        """(rules intact, {key: packets}): the rules and sets from the table's listing without elements,
        the WAN device set's from its own listing, the pinholes from a netlink dump of each set (their
        JSON listing, counters and all, took ~150 ms and 13 MiB at 4096 pinholes)."""
        pl = self.place
        try:
            items = self.nft._listing(pl.where)
            declared = {s.get("name") for i in items for s in (i.get("set"),) if s}
            if pl.obj("pinif") in declared:
                items += self.nft._list_json(f"set {pl.where} {pl.obj('pinif')}")
            elems, expires = self._dump_counted([n for n in ("pin6", "pin6r") if pl.obj(n) in declared])
        except (NftError, OSError):
            return False, {}
        self.expires = expires
        tags: list[str | None] = []
        jumped = pl.jump() is None
        wan_ok = False  # the WAN device set is part of the structure (a fw4 reload empties it)
        for item in items:
            r = item.get("rule")
            if r is not None:
                if r["chain"] == pl.chain:
                    tags.append(r.get("comment"))
                j = pl.jump()
                if j and r["chain"] == j[0] and any(e.get("jump", {}).get("target") == j[1]
                                                    for e in r.get("expr", [])):
                    jumped = True
                continue
            s = item.get("set")
            if s and s.get("name") == pl.obj("pinif"):  # its own listing comes last: that one decides
                wan_ok = {e if isinstance(e, str) else "" for e in s.get("elem", [])} == ({self.wan_if} - {None})
        have_sets = declared & {pl.obj("pin6"), pl.obj("pin6r"), pl.obj("pinif")}
        ok = jumped and wan_ok and len(have_sets) == 3 and tags == [t for t, _ in pl.rules()]
        return ok, elems

    def packets(self, keys: list[PinKey]) -> dict[PinKey, int]:
        """The packets each of ``keys`` admitted, for those the kernel holds: a lookup per key for a few
        (GetPinholePackets asks for one), one dump of each set for many."""
        if len(keys) > PACKETS_LOOKUPS:
            try:
                return self._dump_counted(["pin6", "pin6r"])[0]
            except OSError:
                return {}  # as the snapshot answers a table it cannot read: no counts
        out: dict[PinKey, int] = {}
        try:
            for key in keys:
                got = netlink.nft_get_counted(*self._set_of(pin_set(key)), pin_key_bytes(key))
                if got is not None:
                    out[key] = got[1]
        except OSError as exc:
            raise NftError(f"reading pinhole counters: {exc}") from None
        return out

    def _dump_counted(self, names: list[str]) -> tuple[dict[PinKey, int], dict[PinKey, int]]:
        """({key: packets}, {key: seconds left}) of our sets ``names`` (without prefix), by netlink dumps;
        OSError when one cannot be read."""
        elems: dict[PinKey, int] = {}
        expires: dict[PinKey, int] = {}
        for name in names:
            for raw, packets, left_ms in netlink.nft_dump_counted(*self._set_of(name)):
                key = pin_key_of(raw, remote=name == "pin6r")
                if key is not None:
                    elems[key], expires[key] = packets, left_ms // 1000
        return elems, expires

    def _set_of(self, name: str) -> tuple[int, str, str]:
        """(family number, table, set) of our set ``name`` (without prefix), as netlink names them."""
        return netlink.FAMILIES[self.place.family], self.place.table, self.place.obj(name)

    def apply(self, want: dict[PinKey, int], refresh: bool = False) -> tuple[int, int]:
        """Make the kernel hold exactly ``want`` ({key: timeout s}); ``refresh`` resets the
        timeout of keys already present too (a sync's leases count from now). Returns (+, -)."""
        delta: dict[PinKey, int | None] = {k: None for k in self.have if k not in want}
        delta.update((k, t) for k, t in want.items() if refresh or k not in self.have)
        return self.apply_delta(delta)

    def apply_delta(self, delta: dict[PinKey, int | None]) -> tuple[int, int]:
        """Write only the named keys ({key: timeout s, or None: absent}), one transaction;
        a present key is deleted and re-added (its timeout restarts). Returns (+, -)."""
        for attempt in (1, 2):
            if not any(t is not None or k in self.have for k, t in delta.items()):
                return 0, 0
            try:
                if attempt == 2 or not self._write_delta(delta):  # the text, when netlink did not apply it
                    self.nft.run(self._delta_text(delta))
            except NftError as exc:
                if attempt == 2 or isinstance(exc, FwNotReady):
                    raise
                log.warning("pinhole sets drifted (%s); re-reading and retrying", exc)
                intact, have = self.snapshot()
                if not intact:
                    self.setup()
                else:
                    self.have = set(have)
                continue
            added = sum(1 for k, t in delta.items() if t is not None and k not in self.have)
            removed = sum(1 for k, t in delta.items() if t is None and k in self.have)
            for k, t in delta.items():
                self.have.discard(k) if t is None else self.have.add(k)
            return added, removed
        raise AssertionError("unreachable")

    def _delta_text(self, delta: dict[PinKey, int | None]) -> str:
        """The same delta as nft text: one command per set and kind, so a sync or restore of 10k
        parses as two lines, not 10k."""
        dels: dict[str, list[str]] = {}
        adds: dict[str, list[str]] = {}
        for k, t in delta.items():
            name, text = pin_elem(k)
            if k in self.have:
                dels.setdefault(name, []).append(text)
            if t is not None:
                adds.setdefault(name, []).append(f"{text} timeout {t}s")
        return "\n".join(f"{verb} element {self.place.where} {self.place.obj(n)} {{ {', '.join(e)} }}"
                         for verb, per_set in (("delete", dels), ("add", adds)) for n, e in per_set.items())

    def _write_delta(self, delta: dict[PinKey, int | None]) -> bool:
        """The delta as one netlink batch (per set: the present keys out, then the new ones in with
        their timeouts); False when it was not applied (then nothing of it was)."""
        per_set: dict[str, tuple[list[netlink.ElemOp], list[netlink.ElemOp]]] = {}  # set: (deletes, adds)
        for k, t in delta.items():
            dels, adds = per_set.setdefault(self.place.obj(pin_set(k)), ([], []))
            raw = pin_key_bytes(k)
            if k in self.have:
                dels.append((raw, None))
            if t is not None:
                adds.append((raw, b"", t * 1000))
        try:
            netlink.nft_batch([(name, dels + adds) for name, (dels, adds) in per_set.items()],
                              netlink.FAMILIES[self.place.family], self.place.table)
        except OSError as exc:
            log.debug("netlink pinhole batch not applied (%s); writing it as nft text", exc)
            return False
        return True


def pinhole_fw4_includes() -> dict[str, str]:
    """fw4 include files for the pinholes: sets and chain (table-post), the jump (chain-post/forward).

    chain-post/forward puts the jump before forward's final ``jump handle_reject``: traffic
    from the WAN to the LAN falls through fw4's zone chains to it, so fw4's policy stays
    the default drop for everything but the pinholes.
    """
    pl = PinholePlace.make("auto", Layout.make("fw4"))
    assert pl is not None
    name = f"{FW4_INCLUDE_ORDER}-igdpcp-pinholes.nft"
    head = "# igdpcp natd IPv6 pinholes, fw4 layout. Installs as /usr/share/nftables.d/{}\n"
    body = []
    for kind, obj, decl in pl.declarations():
        inner = "".join(f"\t{d.strip()}\n" for d in decl.split(";") if d.strip())
        body.append(f"{kind} {obj} {{\n{inner}}}")
    rules = "".join(f'\t{text} comment "{tag}"\n' for tag, text in pl.rules())
    body.append(f"chain {pl.chain} {{\n{rules}}}")
    base, target = pl.jump()  # type: ignore[misc]
    table = f"table-post/{name}"
    jump = f"{Layout.include_position(base)}/{base}/{name}"
    return {table: head.format(table) + "\n\n".join(body) + "\n",
            jump: head.format(jump) + f'jump {target} comment "{TAG} pinholes jump"\n'}
