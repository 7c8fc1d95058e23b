"""PCP (RFC 6887) wire codec: bytes in, typed messages out, and back.

Pure functions, no sockets and no clocks. Byte layouts follow RFC 6887 §7 (common
header), §11.1 (MAP), §13 (options) and RFC 7220 (DESCRIPTION). Decoding never trusts
its input: anything malformed raises :class:`PcpDecodeError` carrying the result code a server would
answer with (RFC 6887 §8.2, §7.3).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from shared.const import ALL_HOSTS, PCP_CLIENT_PORT, PCP_MAX_PACKET, PCP_SERVER_PORT, TCP, UDP

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

VERSION = 2
# The codec's names for facts stated in shared/const.py.
SERVER_PORT = PCP_SERVER_PORT
ANNOUNCE_PORT = PCP_CLIENT_PORT
ANNOUNCE_GROUP_V4 = ALL_HOSTS
MAX_SIZE = PCP_MAX_PACKET
HEADER_SIZE = 24
MAP_SIZE = 36
PROTO_TCP = TCP
PROTO_UDP = UDP
MAX_DESCRIPTION = 1016  # RFC 7220 §3: the room left in a PEER request
MAX_LIFETIME = 0xFFFFFFFF  # the largest encodable lifetime (RFC 6970 §4.1: an infinite IGD:1 lease)

_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"
_HDR_REQ = struct.Struct("!BBHI16s")
_HDR_RESP = struct.Struct("!BBBBII12s")
_MAP = struct.Struct("!12sB3xHH16s")
_OPT = struct.Struct("!BBH")


class Opcode(IntEnum):
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class Result(IntEnum):
    """Result codes, RFC 6887 §7.4 ."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


class OptionCode(IntEnum):
    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3
    DESCRIPTION = 128  # RFC 7220


_SINGLE = frozenset({1, 2, 128})  # THIRD_PARTY, PREFER_FAILURE, DESCRIPTION: at most once each


class PcpDecodeError(ValueError):
    """A packet that cannot be accepted; ``result`` is what a server answers."""

    def __init__(self, result: Result, message: str) -> None:
        super().__init__(message)
        self.result = result


def pack_address(addr: IPAddress) -> bytes:
    """16-octet PCP address field; IPv4 as IPv4-mapped IPv6 (RFC 6887 §5)."""
    if addr.version == 4:
        return _V4_PREFIX + addr.packed
    return addr.packed


def unpack_address(raw: bytes) -> IPAddress:
    """Inverse of :func:`pack_address`; checks all of the first 96 bits (RFC 6887 §5)."""
    if raw[:12] == _V4_PREFIX:
        return ipaddress.IPv4Address(raw[12:16])
    return ipaddress.IPv6Address(raw)


def any_address(version: int = 4) -> IPAddress:
    """The all-zeros address of a family: 'no preference' (RFC 6887 §5, erratum 3621)."""
    return ipaddress.IPv4Address(0) if version == 4 else ipaddress.IPv6Address(0)


@dataclass(frozen=True)
class Filter:
    """FILTER option (RFC 6887 §13.3); prefix_len counts the 128-bit field."""

    prefix_len: int
    peer_port: int
    peer_ip: IPAddress


@dataclass(frozen=True)
class Options:
    """The options PCP defines for MAP, plus any others carried through untouched."""

    third_party: IPAddress | None = None
    prefer_failure: bool = False
    filters: tuple[Filter, ...] = ()
    description: str | None = None
    unknown: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True)
class MapData:
    """MAP opcode data (RFC 6887 §11.1): suggested values in requests, assigned in responses."""

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_ip: IPAddress = field(default_factory=any_address)


@dataclass(frozen=True)
class Request:
    opcode: int
    lifetime: int
    client_ip: IPAddress
    map: MapData | None = None
    options: Options = Options()
    version: int = VERSION


@dataclass(frozen=True)
class Response:
    opcode: int
    result: int
    lifetime: int
    epoch: int
    map: MapData | None = None
    options: Options = Options()
    version: int = VERSION


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def description_bytes(text: str) -> bytes:
    """DESCRIPTION contents: UTF-8, at most 1016 octets cut on a character boundary (RFC 7220 §3)."""
    raw = text.encode("utf-8")
    if len(raw) > MAX_DESCRIPTION:
        raw = raw[:MAX_DESCRIPTION].decode("utf-8", errors="ignore").encode("utf-8")
    return raw


def _encode_options(opts: Options) -> bytes:
    out = bytearray()

    def put(code: int, data: bytes) -> None:
        out.extend(_OPT.pack(code, 0, len(data)))
        out.extend(data + b"\x00" * (_pad4(len(data)) - len(data)))

    if opts.third_party is not None:
        put(OptionCode.THIRD_PARTY, pack_address(opts.third_party))
    if opts.prefer_failure:
        put(OptionCode.PREFER_FAILURE, b"")
    for f in opts.filters:
        put(OptionCode.FILTER, struct.pack("!xBH16s", f.prefix_len, f.peer_port, pack_address(f.peer_ip)))
    if opts.description is not None:
        put(OptionCode.DESCRIPTION, description_bytes(opts.description))
    for code, data in opts.unknown:
        put(code, data)
    return bytes(out)


def _decode_filter(body: bytes) -> Filter:
    """One FILTER option's body (RFC 6887 §13.3)."""
    if len(body) != 20:
        raise PcpDecodeError(Result.MALFORMED_OPTION, "FILTER length != 20")
    prefix, port = struct.unpack_from("!xBH", body)
    peer = unpack_address(body[4:20])
    # §13.3: 96-128 for IPv4 (mapped), 0-128 for IPv6; 0 alone clears the filters.
    if prefix > 128 or (prefix and peer.version == 4 and prefix < 96):
        raise PcpDecodeError(Result.MALFORMED_OPTION, f"FILTER prefix length {prefix} out of range")
    return Filter(prefix, port, peer)


def _decode_options(data: bytes, opcode: int) -> Options:
    """Parse the option TLVs; RFC 6887 §7.3 decides which faults are which."""
    third_party: IPAddress | None = None
    prefer_failure = False
    filters: list[Filter] = []
    description: str | None = None
    unknown: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    off = 0
    while off < len(data):
        if len(data) - off < 4:
            raise PcpDecodeError(Result.MALFORMED_OPTION, "truncated option header")
        code, _, length = _OPT.unpack_from(data, off)
        body = data[off + 4 : off + 4 + length]
        if len(body) != length:
            raise PcpDecodeError(Result.MALFORMED_OPTION, f"option {code} runs past the packet")
        off += 4 + _pad4(length)
        if code in seen and code in _SINGLE:  # only options understood to be single (RFC 6887 §7.3)
            raise PcpDecodeError(Result.MALFORMED_OPTION, f"option {code} repeated")
        seen.add(code)
        if opcode == Opcode.PEER and code == OptionCode.PREFER_FAILURE:
            raise PcpDecodeError(Result.MALFORMED_REQUEST, "PREFER_FAILURE in a PEER request (§13.2)")
        if opcode in (Opcode.MAP, Opcode.PEER) and code == OptionCode.THIRD_PARTY:
            if length != 16:
                raise PcpDecodeError(Result.MALFORMED_OPTION, "THIRD_PARTY length != 16")
            third_party = unpack_address(body)
        elif opcode == Opcode.MAP and code == OptionCode.PREFER_FAILURE:
            if length != 0:
                raise PcpDecodeError(Result.MALFORMED_OPTION, "PREFER_FAILURE length != 0")
            prefer_failure = True
        elif opcode == Opcode.MAP and code == OptionCode.FILTER:
            filters.append(_decode_filter(body))
        elif code == OptionCode.DESCRIPTION:
            try:
                description = body.decode("utf-8")
            except UnicodeDecodeError:
                description = None  # RFC 7220 §4: invalid text is ignored, not fatal
        else:
            if code < 128:
                raise PcpDecodeError(Result.UNSUPP_OPTION, f"unsupported mandatory option {code}")
            unknown.append((code, bytes(body)))
    return Options(third_party, prefer_failure, tuple(filters), description, tuple(unknown))


def _encode_map(m: MapData) -> bytes:
    return _MAP.pack(m.nonce, m.protocol, m.internal_port, m.external_port, pack_address(m.external_ip))


def _decode_map(data: bytes) -> MapData:
    nonce, proto, iport, eport, eip = _MAP.unpack_from(data, HEADER_SIZE)
    return MapData(nonce, proto, iport, eport, unpack_address(eip))


def encode_request(req: Request) -> bytes:
    """Serialise a request (RFC 6887 §7.1)."""
    if req.opcode == Opcode.MAP and req.map is None:
        raise ValueError("MAP request without MAP data")
    if len(req.map.nonce if req.map else b"\x00" * 12) != 12:
        raise ValueError("nonce must be 12 octets")
    out = _HDR_REQ.pack(req.version, req.opcode & 0x7F, 0, req.lifetime, pack_address(req.client_ip))
    if req.map is not None:
        out += _encode_map(req.map)
    out += _encode_options(req.options)
    if len(out) > MAX_SIZE:
        raise ValueError(f"request larger than {MAX_SIZE} octets")
    return out


def encode_response(resp: Response) -> bytes:
    """Serialise a response (RFC 6887 §7.2)."""
    out = _HDR_RESP.pack(resp.version, 0x80 | resp.opcode, 0, resp.result, resp.lifetime, resp.epoch, b"\x00" * 12)
    if resp.map is not None:
        out += _encode_map(resp.map)
    return out + _encode_options(resp.options)


def _check_frame(data: bytes) -> None:
    if len(data) < HEADER_SIZE:
        raise PcpDecodeError(Result.MALFORMED_REQUEST, "shorter than the 24-octet header")
    if len(data) > MAX_SIZE or len(data) % 4:
        raise PcpDecodeError(Result.MALFORMED_REQUEST, f"length over {MAX_SIZE} or not a multiple of 4")


def _opcode_size(opcode: int) -> int:
    sizes: dict[int, int] = {Opcode.ANNOUNCE: 0, Opcode.MAP: MAP_SIZE, Opcode.PEER: 56}
    return sizes.get(opcode, -1)


def decode_request(data: bytes) -> Request:
    """Parse and check a request as a server does (RFC 6887 §8.2)."""
    if len(data) < 2:
        raise PcpDecodeError(Result.MALFORMED_REQUEST, "shorter than 2 octets")
    if data[1] & 0x80:
        raise PcpDecodeError(Result.MALFORMED_REQUEST, "R bit set in a request")
    if data[0] != VERSION:
        raise PcpDecodeError(Result.UNSUPP_VERSION, f"version {data[0]}")
    _check_frame(data)
    version, op, _, lifetime, client = _HDR_REQ.unpack_from(data)
    opcode = op & 0x7F
    size = _opcode_size(opcode)
    if size < 0:
        raise PcpDecodeError(Result.UNSUPP_OPCODE, f"opcode {opcode}")
    if len(data) < HEADER_SIZE + size:
        raise PcpDecodeError(Result.MALFORMED_REQUEST, "too short for its opcode")
    m = _decode_map(data) if opcode == Opcode.MAP else None
    opts = _decode_options(data[HEADER_SIZE + size :], opcode)
    if m is not None:
        if m.protocol == 0 and m.internal_port != 0:
            raise PcpDecodeError(Result.MALFORMED_REQUEST, "protocol 0 with a port")
        if opts.prefer_failure and (lifetime == 0 or m.external_port == 0):
            raise PcpDecodeError(Result.MALFORMED_OPTION, "PREFER_FAILURE with lifetime 0 or port 0")
        if opts.filters and lifetime == 0:
            raise PcpDecodeError(Result.MALFORMED_OPTION, "FILTER on a delete")
    if opcode == Opcode.ANNOUNCE and lifetime != 0:
        raise PcpDecodeError(Result.MALFORMED_REQUEST, "ANNOUNCE with non-zero lifetime")
    return Request(opcode, lifetime, unpack_address(client), m, opts, version)


def decode_response(data: bytes) -> Response:
    """Parse a response as a client checks it (RFC 6887 §8.3).

    UNSUPP_VERSION is reported before length checks so version negotiation works
    even against an 8-octet NAT-PMP reply.
    """
    if len(data) < 4:
        raise PcpDecodeError(Result.MALFORMED_REQUEST, "shorter than 4 octets")
    if not data[1] & 0x80:
        raise PcpDecodeError(Result.MALFORMED_REQUEST, "R bit clear")
    if data[3] == Result.UNSUPP_VERSION:
        lifetime, epoch = struct.unpack_from("!II", data.ljust(12, b"\x00"), 4)
        copied = None  # a version 2 server copies the request's MAP data (§8.2): it can be matched (§8.4)
        if data[0] == VERSION and len(data) > HEADER_SIZE:
            try:
                copied = decode_response(data[:3] + b"\x00" + data[4:]).map
            except PcpDecodeError:
                copied = None
        return Response(data[1] & 0x7F, Result.UNSUPP_VERSION, lifetime, epoch, copied, version=data[0])
    if data[0] != VERSION:
        raise PcpDecodeError(Result.UNSUPP_VERSION, f"version {data[0]}")
    _check_frame(data)
    version, op, _, result, lifetime, epoch, _ = _HDR_RESP.unpack_from(data)
    opcode = op & 0x7F
    size = _opcode_size(opcode)
    if size < 0 or len(data) < HEADER_SIZE + size:
        raise PcpDecodeError(Result.MALFORMED_REQUEST, "unknown opcode or too short")
    m = _decode_map(data) if opcode == Opcode.MAP else None
    try:
        opts = _decode_options(data[HEADER_SIZE + size :], opcode)
    except PcpDecodeError as exc:
        if exc.result != Result.UNSUPP_OPTION:
            raise
        opts = Options()  # RFC 6887 §7.3: a client ignores options it does not understand
    return Response(opcode, result, lifetime, epoch, m, opts, version)


_CLIENT_IP = slice(8, 24)  # RFC 6887 §7.1: the request header's client address
_INTERNAL_PORT = HEADER_SIZE + 16  # RFC 6887 §11.1: a MAP's internal port, after nonce, protocol, reserved


def rewrite_request(data: bytes, client_ip: IPAddress, internal_port: int | None) -> bytes:
    """Rewrite the client address (and a MAP's internal port) as a PCP proxy does (RFC 7648 §5.3.1).

    In place at the fields' fixed offsets, no second decode or encode: ``data`` must be a
    request :func:`decode_request` accepted.
    """
    out = bytearray(data)
    out[_CLIENT_IP] = pack_address(client_ip)
    if internal_port is not None and out[1] & 0x7F == Opcode.MAP and len(out) >= HEADER_SIZE + MAP_SIZE:
        struct.pack_into("!H", out, _INTERNAL_PORT, internal_port)
    return bytes(out)


def rewrite_response_port(data: bytes, internal_port: int) -> bytes:
    """Restore a MAP response's internal port to the LAN value (RFC 6970 §5.5, docs/requirements.md IWF-37).

    In place, no second decode or encode: ``data`` must be a response :func:`decode_response` accepted.
    """
    if len(data) < HEADER_SIZE + MAP_SIZE or data[1] & 0x7F != Opcode.MAP:
        return data
    out = bytearray(data)
    struct.pack_into("!H", out, _INTERNAL_PORT, internal_port)
    return bytes(out)
