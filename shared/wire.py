"""The controld <-> natd message schema: the one definition both daemons use.

Transport: ZeroMQ. Requests go DEALER (controld) -> ROUTER (natd), one frame of
msgpack each way; events go PUB (natd) -> SUB (controld), two frames: topic, msgpack.
Every message is a msgpack map with ``v`` (schema version), ``op``, optionally ``id``
(request id, echoed in the reply) and ``dl`` (deadline, Unix time in ms: natd does not
act on a request it reads after that), and the fields of the dataclass registered for
that op.

Versioning: ``SCHEMA_VERSION`` is what this side writes; ``ACCEPTED_VERSIONS`` what it
reads. Version 2 added the ``dl`` envelope field, the positive ``mid`` rule and the
``restored`` event; a v1 peer's requests are still served. Any other version is
refused with a ``version`` error reply, and an ``error`` reply of any version is
readable, so a mismatch is always a clear error on both sides, never a crash. A ``sync``
carries its bindings packed (:class:`PackedBindings`); the list of maps written before
that is still read, and a reader from before answers the packed form with ``bad-field``.
:func:`decode` checks version, size, op and the type and range of every field before
anything else sees the message, so a hostile or
mistaken peer gets a :class:`WireError` (and a typed error reply), never a crash.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

import msgpack

from shared.const import PCP_MAX_PACKET

SCHEMA_VERSION = 2
ACCEPTED_VERSIONS = (1, 2)
MAX_MESSAGE = 8 * 1024 * 1024  # a full sync of 65k bindings fits; anything bigger is refused
MAX_LIST = 70_000
MAX_STR = 4096
MAX_BYTES = PCP_MAX_PACKET  # the largest PCP packet (RFC 6887 §7)
_RECORD = struct.Struct("!QB4sHH")  # one packed binding (17 bytes): mid, proto, LAN address, LAN port, WAN port
MAX_PACKED = _RECORD.size * MAX_LIST  # a sync's packed bindings (PackedBindings); any other bytes field: MAX_BYTES
MAX_WAIT_MS = 1_100_000  # one PCP transmission's wait: at most MRT (RFC 6887 §8.1.1) plus its jitter

PROTOCOLS = (6, 17)  # TCP, UDP: all UPnP IGD can express


class WireError(ValueError):
    """A message that does not fit the schema; ``code`` is sent back in the error reply.

    ``rid`` is the request id when it could still be read, so the reply can carry it.
    """

    def __init__(self, code: str, message: str, rid: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.rid = rid


def _ipv4(value: str) -> None:
    if not _is_ipv4(value):
        raise WireError("bad-field", f"not an IPv4 address: {value!r}")


@functools.lru_cache(maxsize=1024)  # a sync names the same few LAN hosts thousands of times
def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _port(value: int, zero_ok: bool = False) -> None:
    if not (0 if zero_ok else 1) <= value <= 65535:
        raise WireError("bad-field", f"port out of range: {value}")


def _mid(value: int | None) -> None:
    # controld's row ids are SQLite rowids (>= 1); natd uses negative ids for adopted forwards.
    if value is not None and not 1 <= value < 2**63:
        raise WireError("bad-field", f"mapping id out of range: {value}")


def _proto(value: int) -> None:
    if value not in PROTOCOLS:
        raise WireError("bad-field", f"protocol must be TCP (6) or UDP (17): {value}")


# --- shared pieces ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # slots: natd holds one per forward (tens of thousands)
class Binding:
    """One NAT1 forward: WAN ``proto/wan_port`` -> ``lan_ip:lan_port``; ``mid`` is controld's row id."""

    mid: int
    proto: int
    lan_ip: str
    lan_port: int
    wan_port: int

    def check(self) -> None:
        _ipv4(self.lan_ip)
        _check_record(self.mid, self.proto, self.lan_port, self.wan_port)


BindingFields = tuple[int, int, str, int, int]  # a Binding's fields, in order (no object per row)


class PackedBindings(Sequence[Binding]):
    """A Sync's bindings as one bytes object of fixed records, read one binding at a time.

    Why not a list of maps: decoding 10,000 of them built 10,000 dicts and Bindings at once,
    and the allocator kept the arenas they had filled: natd grew ~4 MiB at every controld
    restart with 10,000 mappings, for good. Here both ends handle one record at a time.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    @classmethod
    def pack(cls, bindings: Iterable[Binding | BindingFields]) -> PackedBindings:
        """Pack Bindings, or their field tuples, each checked as a Binding is."""
        out = bytearray()
        for item in bindings:
            mid, proto, lan_ip, lan_port, wan_port = (
                (item.mid, item.proto, item.lan_ip, item.lan_port, item.wan_port) if isinstance(item, Binding)
                else item)
            _ipv4(lan_ip)
            _check_record(mid, proto, lan_port, wan_port)
            out += _RECORD.pack(mid, proto, socket.inet_aton(lan_ip), lan_port, wan_port)
        if len(out) > MAX_PACKED:
            raise WireError("bad-field", f"a sync of more than {MAX_LIST} bindings")
        return cls(bytes(out))

    @classmethod
    def unpack(cls, data: bytes) -> PackedBindings:
        """Check a received ``data`` whole (size, every record's fields) before anyone reads it."""
        if len(data) % _RECORD.size or len(data) > MAX_PACKED:
            raise WireError("bad-field", f"packed bindings of {len(data)} bytes")
        for mid, proto, _, lan_port, wan_port in _RECORD.iter_unpack(data):
            _check_record(mid, proto, lan_port, wan_port)  # (any 4 bytes are an IPv4 address)
        return cls(data)

    def __len__(self) -> int:
        return len(self.data) // _RECORD.size

    @typing.overload
    def __getitem__(self, index: int) -> Binding: ...
    @typing.overload
    def __getitem__(self, index: slice) -> list[Binding]: ...
    def __getitem__(self, index: int | slice) -> Binding | list[Binding]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        mid, proto, raw, lan_port, wan_port = _RECORD.unpack_from(self.data, (index % len(self)) * _RECORD.size)
        return Binding(mid, proto, sys.intern(socket.inet_ntoa(raw)), lan_port, wan_port)

    def __iter__(self) -> Iterator[Binding]:
        names: dict[bytes, str] = {}  # one string per LAN host, as the list decoder interns it
        for mid, proto, raw, lan_port, wan_port in _RECORD.iter_unpack(self.data):
            lan_ip = names.get(raw)
            if lan_ip is None:
                lan_ip = names[raw] = sys.intern(socket.inet_ntoa(raw))
            yield Binding(mid, proto, lan_ip, lan_port, wan_port)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedBindings):
            return self.data == other.data
        return isinstance(other, Sequence) and list(self) == list(other)

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"PackedBindings(<{len(self)} bindings>)"


def _check_record(mid: int, proto: int, lan_port: int, wan_port: int) -> None:
    """A binding's number fields (its address aside: a packed one holds 4 bytes, any of them valid)."""
    if type(mid) is not int or type(proto) is not int or type(lan_port) is not int or type(wan_port) is not int:
        raise WireError("bad-field", "a binding's numbers must be integers")
    _mid(mid)
    _proto(proto)
    _port(lan_port)
    _port(wan_port)


# --- requests (controld -> natd) and their replies -----------------------------


@dataclass(frozen=True)
class Message:
    OP: ClassVar[str] = ""

    def check(self) -> None:
        """Range checks beyond types; raise WireError."""


@dataclass(frozen=True)
class Hello(Message):
    OP: ClassVar[str] = "hello"


@dataclass(frozen=True)
class HelloReply(Message):
    OP: ClassVar[str] = "hello.reply"
    boot_id: str
    wan_ip: str | None
    gateway: str | None
    lan_ips: list[str]
    lan_subnets: list[str]


@dataclass(frozen=True)
class Bind(Message):
    """Ensure a NAT1 binding for ``mid``; ``want_port`` first, any free port unless ``exact``."""

    OP: ClassVar[str] = "bind"
    mid: int
    proto: int
    lan_ip: str
    lan_port: int
    want_port: int
    exact: bool = False

    def check(self) -> None:
        _mid(self.mid)
        _proto(self.proto)
        _ipv4(self.lan_ip)
        _port(self.lan_port)
        _port(self.want_port, zero_ok=True)


@dataclass(frozen=True)
class BindReply(Message):
    OP: ClassVar[str] = "bind.reply"
    wan_ip: str
    wan_port: int


@dataclass(frozen=True)
class Unbind(Message):
    OP: ClassVar[str] = "unbind"
    mid: int

    def check(self) -> None:
        _mid(self.mid)


@dataclass(frozen=True)
class PcpExchange(Message):
    """Relay one PCP request to ``server`` and wait up to ``wait_ms`` for its response.

    With ``mid`` natd rewrites the request to that NAT1 binding first. The reply is a
    :class:`PcpAnswer`: the matching response (RFC 6887 §8.3: same server, opcode and,
    for MAP, nonce), or none within ``wait_ms`` (0: do not wait). One request = one
    transmission; retransmission timing stays with controld's PCP client.
    """

    OP: ClassVar[str] = "pcp.exchange"
    server: str
    packet: bytes
    mid: int | None = None
    wait_ms: int = 0

    def check(self) -> None:
        _ipv4(self.server)
        _mid(self.mid)
        if not 0 <= self.wait_ms <= MAX_WAIT_MS:
            raise WireError("bad-field", f"wait_ms must be 0..{MAX_WAIT_MS}")


@dataclass(frozen=True)
class PcpAnswer(Message):
    """The response to a :class:`PcpExchange` (internal port mapped back), or None: no answer in time."""

    OP: ClassVar[str] = "pcp.answer"
    packet: bytes | None = None
    lan_ip: str | None = None

    def check(self) -> None:
        if self.lan_ip is not None:
            _ipv4(self.lan_ip)


@dataclass(frozen=True)
class Sync(Message):
    """The whole desired NAT1 set; natd applies only the difference. The bindings go packed
    (:class:`PackedBindings`, whatever sequence the caller gave); a list of maps, as a sender
    from before that writes it, is still read."""

    OP: ClassVar[str] = "sync"
    bindings: Sequence[Binding] = field(default_factory=PackedBindings)

    def __post_init__(self) -> None:
        if not isinstance(self.bindings, PackedBindings):
            object.__setattr__(self, "bindings", PackedBindings.pack(self.bindings))


@dataclass(frozen=True)
class SyncReply(Message):
    OP: ClassVar[str] = "sync.reply"
    added: int
    removed: int
    refused: list[int] = field(default_factory=list)  # mappings natd left out (not LAN, over a limit)


@dataclass(frozen=True)
class GetCounters(Message):
    """WAN interface counters (WANCommonInterfaceConfig GetTotal*)."""

    OP: ClassVar[str] = "counters"


@dataclass(frozen=True)
class CountersReply(Message):
    OP: ClassVar[str] = "counters.reply"
    bytes_sent: int
    bytes_received: int
    packets_sent: int
    packets_received: int


@dataclass(frozen=True)
class Ok(Message):
    OP: ClassVar[str] = "ok"


@dataclass(frozen=True)
class Error(Message):
    OP: ClassVar[str] = "error"
    code: str
    message: str


# --- events (natd PUB) -----------------------------------------------------------


@dataclass(frozen=True)
class PcpReceived(Message):
    """An unsolicited PCP packet (ANNOUNCE, Mapping Update, late answer), internal port mapped back."""

    OP: ClassVar[str] = "pcp.rx"
    server: str
    packet: bytes
    mid: int | None = None
    lan_ip: str | None = None


@dataclass(frozen=True)
class WanChanged(Message):
    OP: ClassVar[str] = "wan"
    wan_ip: str | None
    gateway: str | None


@dataclass(frozen=True)
class Heartbeat(Message):
    OP: ClassVar[str] = "heartbeat"
    boot_id: str
    bindings: int


@dataclass(frozen=True)
class Restored(Message):
    """natd found its kernel objects gone or changed (flush, fw4 reload) and re-applied them."""

    OP: ClassVar[str] = "restored"
    boot_id: str
    reason: str
    forwards: int


# --- IPv6 pinholes (docs/pinholes.md) -------------------------------------------------

MAX_PINHOLE_LEASE = 86400  # WANIPv6FirewallControl's LeaseTime bound; PCP lifetimes are clamped to it too


def _ipv6(value: str, what: str = "address") -> None:
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        raise WireError("bad-field", f"not an IPv6 {what}: {value!r}") from None


@dataclass(frozen=True)
class Pinhole:
    """One inbound IPv6 pinhole: from ``remote`` (None: any host) to ``lan_ip``'s ``proto/lan_port``.

    ``pid`` is controld's pinhole id (>= 1); ``lease`` seconds from now (1..MAX_PINHOLE_LEASE).
    """

    pid: int
    proto: int
    lan_ip: str
    lan_port: int
    lease: int
    remote: str | None = None

    def check(self) -> None:
        _mid(self.pid)
        _proto(self.proto)
        _ipv6(self.lan_ip)
        _port(self.lan_port)
        if not 1 <= self.lease <= MAX_PINHOLE_LEASE:
            raise WireError("bad-field", f"pinhole lease must be 1..{MAX_PINHOLE_LEASE} s: {self.lease}")
        if self.remote is not None:
            _ipv6(self.remote, "remote host")


@dataclass(frozen=True)
class PinholeAdd(Message):
    """Open (or, same ``pid``, replace and re-lease) one pinhole; a ``PinholeReply`` answers."""

    OP: ClassVar[str] = "pinhole.add"
    pinhole: Pinhole


@dataclass(frozen=True)
class PinholeReply(Message):
    OP: ClassVar[str] = "pinhole.reply"
    pid: int
    timeout: int  # the kernel element's timeout: lease + natd's grace


@dataclass(frozen=True)
class PinholeDelete(Message):
    """Close pinhole ``pid`` (Ok also when natd does not hold it: delete is idempotent)."""

    OP: ClassVar[str] = "pinhole.delete"
    pid: int

    def check(self) -> None:
        _mid(self.pid)


@dataclass(frozen=True)
class PinholeSync(Message):
    """The whole desired pinhole set (leases counted from now); natd applies only the difference."""

    OP: ClassVar[str] = "pinhole.sync"
    pinholes: list[Pinhole] = field(default_factory=list)


@dataclass(frozen=True)
class PinholeCounters(Message):
    """Packets each pinhole accepted (GetPinholePackets, CheckPinholeWorking); empty ``pids``: all."""

    OP: ClassVar[str] = "pinhole.counters"
    pids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PinholeCountersReply(Message):
    OP: ClassVar[str] = "pinhole.counters.reply"
    pids: list[int] = field(default_factory=list)
    packets: list[int] = field(default_factory=list)  # packets[i] belongs to pids[i] (msgpack maps: str keys)


@dataclass(frozen=True)
class PinholeStatus(Message):
    """Is the IPv6 firewall natd manages on, where, and which LAN prefixes may have pinholes."""

    OP: ClassVar[str] = "pinhole.status"


@dataclass(frozen=True)
class PinholeStatusReply(Message):
    OP: ClassVar[str] = "pinhole.status.reply"
    enabled: bool  # WANIPv6FirewallControl FirewallEnabled and InboundPinholeAllowed
    mode: str  # fw4, own, table or off
    lan_prefixes: list[str]
    pinholes: int
    max_total: int
    max_per_host: int


PINHOLE_MESSAGES: tuple[type[Message], ...] = (PinholeAdd, PinholeReply, PinholeDelete, PinholeSync,
                                               PinholeCounters, PinholeCountersReply, PinholeStatus,
                                               PinholeStatusReply)


# --- the router's neighbour table (secure mode for pinholes, docs/pinholes.md "Policy") ----------


def _ip(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise WireError("bad-field", f"not an IP address: {value!r}") from None


@dataclass(frozen=True)
class SameHost(Message):
    """Are ``a`` and ``b`` (IPv4 or IPv6) one LAN host: one link-layer address in the neighbour table?"""

    OP: ClassVar[str] = "neigh.same_host"
    a: str
    b: str

    def check(self) -> None:
        _ip(self.a)
        _ip(self.b)


@dataclass(frozen=True)
class SameHostReply(Message):
    OP: ClassVar[str] = "neigh.same_host.reply"
    same: bool


# --- STUN (natd PUB): the external address seen from the Internet (docs/stun.md) -----


@dataclass(frozen=True)
class StunResult(Message):
    """natd's latest STUN Binding answer (RFC 8489): what a server saw as the source of a
    datagram from ``wan_ip``. ``external_ip`` is None when no answer came (``error`` says
    why); published on each probe and repeated so a late subscriber learns it too."""

    OP: ClassVar[str] = "stun"
    server: str
    wan_ip: str | None
    external_ip: str | None
    external_port: int = 0
    local_port: int = 0
    error: str = ""

    def check(self) -> None:
        for ip in (self.wan_ip, self.external_ip):
            if ip is not None:
                _ipv4(ip)
        _port(self.external_port, zero_ok=True)
        _port(self.local_port, zero_ok=True)


MESSAGES: dict[str, type[Message]] = {
    cls.OP: cls
    for cls in (Hello, HelloReply, Bind, BindReply, Unbind, PcpExchange, PcpAnswer, Sync, SyncReply, GetCounters,
                CountersReply,
                Ok, Error,
                PcpReceived, WanChanged, Heartbeat, Restored)
}
MESSAGES.update({cls.OP: cls for cls in PINHOLE_MESSAGES})
MESSAGES.update({cls.OP: cls for cls in (SameHost, SameHostReply, StunResult)})


# --- codec -----------------------------------------------------------------------


class _Encoder:
    """One msgpack Packer for every message. ``msgpack.packb`` makes a Packer per call, and each
    Packer allocates a 256 KiB buffer: per request, in both daemons, a block above glibc's mmap
    threshold (an mmap and an munmap each time unless glibc raised the threshold past it, which
    lets bulk buffers fragment the heap; shared/daemon.py hold_mmap_threshold). A message bigger
    than KEEP_BYTES (a sync) gets the next message a fresh Packer, so the pages it wrote go with it."""

    KEEP_BYTES = 64 * 1024

    def __init__(self) -> None:
        self._packer = self._new()

    @staticmethod
    def _new() -> msgpack.Packer:
        return msgpack.Packer(use_bin_type=True, default=_packable)

    def pack(self, body: dict[str, Any]) -> bytes:
        """``body`` as msgpack bytes (the Packer starts empty again after a failure too)."""
        data: bytes = self._packer.pack(body)
        if len(data) > self.KEEP_BYTES:
            self._packer = self._new()
        return data


def encode(msg: Message, rid: int | None = None, deadline_ms: int | None = None) -> bytes:
    """Serialise a message (with request id ``rid`` and, for requests, a deadline)."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "op": msg.OP, **_as_map(msg)}
    if rid is not None:
        body["id"] = rid
    if deadline_ms is not None:
        body["dl"] = deadline_ms
    return _ENCODER.pack(body)


def _packable(obj: Any) -> Any:
    """What msgpack writes for a value it has no type for: a nested dataclass, packed bindings."""
    return obj.data if isinstance(obj, PackedBindings) else _as_map(obj)


_ENCODER = _Encoder()


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _as_map(obj: Any) -> dict[str, Any]:
    """A dataclass as its field map, shallow: msgpack calls this for nested ones (the Bindings of
    a Sync) itself, in C, which makes a 10k-binding Sync ~5x faster to encode than asdict()."""
    if not is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"cannot serialise {type(obj).__name__}")
    return {name: getattr(obj, name) for name in _field_names(type(obj))}


Check = Callable[[Any, str, str], Any]  # (value, message, field) -> the value, or WireError


@functools.cache
def _checker(tp: Any) -> Check:
    """The check of one annotation, built once per type (a message's fields are checked on
    every message: the annotation is not taken apart again each time)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        optional = type(None) in args
        inner = _checker([a for a in args if a is not type(None)][0])

        def union(value: Any, where: str, name: str) -> Any:
            return None if value is None and optional else inner(value, where, name)
        return union
    if origin is list:
        (item,) = typing.get_args(tp)
        each = _checker(item)

        def listed(value: Any, where: str, name: str) -> Any:
            if not isinstance(value, list) or len(value) > MAX_LIST:
                raise WireError("bad-field", f"{where}.{name}: expected a list of at most {MAX_LIST}")
            return [each(v, where, name) for v in value]
        return listed
    simple = _SIMPLE.get(tp)
    if simple is None:
        raise TypeError(f"wire schema: unsupported type {tp!r}")  # a schema bug, found at first use
    return simple


def _bool(value: Any, where: str, name: str) -> Any:
    if not isinstance(value, bool):
        raise WireError("bad-field", f"{where}.{name}: expected a boolean")
    return value


def _int(value: Any, where: str, name: str) -> Any:
    if type(value) is not int or not -(2**63) <= value < 2**63:  # (bool is no int here)
        raise WireError("bad-field", f"{where}.{name}: expected an integer")
    return value


def _str(value: Any, where: str, name: str) -> Any:
    if not isinstance(value, str) or len(value) > MAX_STR:
        raise WireError("bad-field", f"{where}.{name}: expected a string of at most {MAX_STR}")
    return sys.intern(value)  # LAN addresses repeat in every binding natd keeps


def _bytes(value: Any, where: str, name: str) -> Any:
    if not isinstance(value, bytes) or len(value) > MAX_BYTES:
        raise WireError("bad-field", f"{where}.{name}: expected at most {MAX_BYTES} bytes")
    return value


_BINDING_KEYS = frozenset(("mid", "proto", "lan_ip", "lan_port", "wan_port"))


def _binding_fields(value: Any, where: str, name: str) -> BindingFields:
    """One map of a Sync's list form (a sender from before bindings were packed); pack checks it."""
    if not isinstance(value, dict) or value.keys() != _BINDING_KEYS:
        raise WireError("bad-field", f"{where}.{name}: expected a map with exactly {sorted(_BINDING_KEYS)}")
    lan_ip = value["lan_ip"]
    if type(lan_ip) is not str or len(lan_ip) > 15:
        raise WireError("bad-field", f"{where}.{name}: wrong field types")
    return value["mid"], value["proto"], lan_ip, value["lan_port"], value["wan_port"]


def _pinhole(value: Any, where: str, name: str) -> Pinhole:
    if not isinstance(value, dict):
        raise WireError("bad-field", f"{where}.{name}: expected a pinhole map")
    return _build(Pinhole, value, f"{where}.{name}")


def _bindings(value: Any, where: str, name: str) -> PackedBindings:
    """A Sync's bindings: packed records, or a list of maps (a sender from before they were packed)."""
    if isinstance(value, bytes):
        return PackedBindings.unpack(value)
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise WireError("bad-field", f"{where}.{name}: expected packed bindings or a list of at most {MAX_LIST}")
    return PackedBindings.pack(_binding_fields(v, where, name) for v in value)


_SIMPLE: dict[Any, Check] = {bool: _bool, int: _int, str: _str, bytes: _bytes, Pinhole: _pinhole,
                             Sequence[Binding]: _bindings}


@functools.cache
def _schema(cls: type) -> tuple[tuple[tuple[str, Check], ...], frozenset[str]]:
    """A dataclass's (field, check) pairs and allowed keys, resolved once (a 65k sync builds 65k)."""
    hints = typing.get_type_hints(cls)
    pairs = tuple((f.name, _checker(hints[f.name])) for f in fields(cls))
    return pairs, frozenset(name for name, _ in pairs) | ENVELOPE


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    pairs, allowed = _schema(cls)
    if not allowed.issuperset(raw):
        extra = set(raw) - allowed
        raise WireError("bad-field", f"{where}: unknown fields {sorted(map(str, extra))[:8]}")
    kwargs: dict[str, Any] = {}
    for name, check in pairs:
        if name in raw:
            kwargs[name] = check(raw[name], where, name)
    try:
        obj = cls(**kwargs)
    except TypeError:
        raise WireError("bad-field", f"{where}: missing fields") from None
    obj.check()
    return obj


ENVELOPE = frozenset({"v", "op", "id", "dl"})


@dataclass(frozen=True)
class Envelope:
    """A decoded message with its request id and deadline (Unix ms), either may be None."""

    msg: Message
    rid: int | None
    deadline_ms: int | None


def _int_field(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise WireError("bad-field", f"{key} must be a non-negative integer")
    return value


def decode(data: bytes) -> tuple[Message, int | None]:
    """Parse and validate one message; returns it with its request id (or None)."""
    env = decode_envelope(data)
    return env.msg, env.rid


def decode_envelope(data: bytes) -> Envelope:
    """Parse and validate one message with its envelope (id, deadline)."""
    if len(data) > MAX_MESSAGE:
        raise WireError("too-big", f"message of {len(data)} bytes")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_PACKED,
                              max_str_len=MAX_STR, max_array_len=MAX_LIST, max_map_len=64)
    except Exception as exc:  # msgpack raises many types on garbage
        raise WireError("bad-msgpack", f"undecodable message: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise WireError("bad-msgpack", "message is not a map")
    try:
        rid = _int_field(raw, "id")
    except WireError:
        raise WireError("bad-field", "id must be a non-negative integer") from None
    try:
        deadline = _int_field(raw, "dl")
        version = raw.get("v")
        # An error reply is readable whatever its version: that is how a mismatch is reported.
        if version not in ACCEPTED_VERSIONS and not (raw.get("op") == Error.OP and isinstance(version, int)):
            raise WireError("version", f"schema version {str(version)[:20]!r} not understood; this side reads "
                            f"{'/'.join(map(str, ACCEPTED_VERSIONS))} and writes {SCHEMA_VERSION}")
        op = raw.get("op")
        cls = MESSAGES.get(op) if isinstance(op, str) else None
        if cls is None:
            raise WireError("bad-op", f"unknown op {str(op)[:40]!r}")
        return Envelope(_build(cls, raw, cls.OP), rid, deadline)
    except WireError as exc:
        exc.rid = rid
        raise
