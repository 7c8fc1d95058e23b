"""NAT-PMP (RFC 6886) wire codec: bytes in, typed messages out, and back.

Pure functions, no sockets and no clocks. Layouts: RFC 6886 §3.2 (public address),
§3.3 (map), §3.5 (result codes, unsupported version and opcode answers), §3.2.1
(address-change announcement = an unsolicited public address response). Decoding is
strict: anything that is not exactly a message of the layout raises
:class:`NatPmpDecodeError` whose ``fault`` says how a server treats it.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

from shared.const import TCP, UDP

VERSION = 0  # RFC 6886 §3.2
RESPONSE_BIT = 0x80  # RFC 6886 §3.2: response opcode = 128 + request opcode
PUBLIC_ADDRESS_REQUEST_SIZE = 2
MAP_REQUEST_SIZE = 12
PUBLIC_ADDRESS_RESPONSE_SIZE = 12
MAP_RESPONSE_SIZE = 16
UNSUPP_VERSION_SIZE = 8  # RFC 6886 §3.5: version, opcode, result, SSSoE
MAX_UINT32 = 0xFFFFFFFF

_MAP_REQ = struct.Struct("!BBHHHI")
_PUB_RESP = struct.Struct("!BBHI4s")
_MAP_RESP = struct.Struct("!BBHIHHI")
_HEAD_RESP = struct.Struct("!BBHI")


class Opcode(IntEnum):
    """Request opcodes, RFC 6886 §3.2 and §3.3."""

    PUBLIC_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class Result(IntEnum):
    """Result codes, RFC 6886 §3.5."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2  # "Not Authorized/Refused"
    NETWORK_FAILURE = 3
    NO_RESOURCES = 4  # "Out of resources"
    UNSUPP_OPCODE = 5


OPCODE_PROTOCOL: dict[int, int] = {Opcode.MAP_UDP: UDP, Opcode.MAP_TCP: TCP}
PROTOCOL_OPCODE: dict[int, int] = {v: k for k, v in OPCODE_PROTOCOL.items()}


class Fault(Enum):
    """Why a datagram is not a request, and so what a server does with it (RFC 6886 §3.5)."""

    TRUNCATED = "truncated"  # shorter than its opcode's layout: dropped
    TRAILING = "trailing"  # longer than its opcode's layout: dropped (strict)
    NOT_REQUEST = "not-request"  # opcode >= 128: silently ignored (§3.5)
    VERSION = "version"  # version != 0: "Unsupported Version" answer (§3.5)
    OPCODE = "opcode"  # unknown opcode < 128: echoed with result 5 (§3.5)


class NatPmpDecodeError(ValueError):
    """A datagram that is not a well-formed NAT-PMP message; ``fault`` classifies it."""

    def __init__(self, fault: Fault, message: str) -> None:
        super().__init__(message)
        self.fault = fault


@dataclass(frozen=True)
class PublicAddressRequest:
    """RFC 6886 §3.2: the two-octet 'what is my external address' query."""


@dataclass(frozen=True)
class MapRequest:
    """RFC 6886 §3.3; ``protocol`` is the IANA number (6 or 17) the opcode names."""

    protocol: int
    internal_port: int
    suggested_external_port: int
    lifetime: int


@dataclass(frozen=True)
class PublicAddressResponse:
    """RFC 6886 §3.2; also the address-change announcement of §3.2.1."""

    result: int
    epoch: int
    address: ipaddress.IPv4Address


@dataclass(frozen=True)
class MapResponse:
    """RFC 6886 §3.3."""

    protocol: int
    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


@dataclass(frozen=True)
class ErrorResponse:
    """A short answer carrying only opcode, result and epoch (RFC 6886 §3.5)."""

    opcode: int
    result: int
    epoch: int


NatPmpRequest = PublicAddressRequest | MapRequest
NatPmpResponse = PublicAddressResponse | MapResponse | ErrorResponse


def _u32(value: int, what: str) -> int:
    if not 0 <= value <= MAX_UINT32:
        raise ValueError(f"{what} {value} does not fit 32 bits")
    return value


def encode_request(req: NatPmpRequest) -> bytes:
    """Serialise a request (RFC 6886 §3.2, §3.3)."""
    if isinstance(req, PublicAddressRequest):
        return bytes((VERSION, Opcode.PUBLIC_ADDRESS))
    opcode = PROTOCOL_OPCODE.get(req.protocol)
    if opcode is None:
        raise ValueError(f"NAT-PMP maps only TCP and UDP, not protocol {req.protocol}")
    return _MAP_REQ.pack(VERSION, opcode, 0, req.internal_port, req.suggested_external_port,
                         _u32(req.lifetime, "lifetime"))


def decode_request(data: bytes) -> NatPmpRequest:
    """Parse a request as a gateway does (RFC 6886 §3.5 decides what each fault means)."""
    if len(data) < 2:
        raise NatPmpDecodeError(Fault.TRUNCATED, "shorter than version and opcode")
    version, opcode = data[0], data[1]
    if version != VERSION:
        raise NatPmpDecodeError(Fault.VERSION, f"version {version}")
    if opcode & RESPONSE_BIT:
        raise NatPmpDecodeError(Fault.NOT_REQUEST, f"opcode {opcode} is a response")
    if opcode == Opcode.PUBLIC_ADDRESS:
        if len(data) != PUBLIC_ADDRESS_REQUEST_SIZE:
            raise NatPmpDecodeError(Fault.TRAILING, f"public address request of {len(data)} octets")
        return PublicAddressRequest()
    if opcode not in OPCODE_PROTOCOL:
        raise NatPmpDecodeError(Fault.OPCODE, f"opcode {opcode}")
    if len(data) != MAP_REQUEST_SIZE:
        fault = Fault.TRUNCATED if len(data) < MAP_REQUEST_SIZE else Fault.TRAILING
        raise NatPmpDecodeError(fault, f"map request of {len(data)} octets")
    _, _, _, iport, eport, lifetime = _MAP_REQ.unpack(data)  # reserved octets ignored (§3.3)
    return MapRequest(OPCODE_PROTOCOL[opcode], iport, eport, lifetime)


def encode_response(resp: NatPmpResponse) -> bytes:
    """Serialise a response (RFC 6886 §3.2, §3.3, §3.5)."""
    if isinstance(resp, PublicAddressResponse):
        return _PUB_RESP.pack(VERSION, RESPONSE_BIT | Opcode.PUBLIC_ADDRESS, resp.result,
                              _u32(resp.epoch, "epoch"), resp.address.packed)
    if isinstance(resp, MapResponse):
        opcode = PROTOCOL_OPCODE.get(resp.protocol)
        if opcode is None:
            raise ValueError(f"NAT-PMP maps only TCP and UDP, not protocol {resp.protocol}")
        return _MAP_RESP.pack(VERSION, RESPONSE_BIT | opcode, resp.result, _u32(resp.epoch, "epoch"),
                              resp.internal_port, resp.external_port, _u32(resp.lifetime, "lifetime"))
    return _HEAD_RESP.pack(VERSION, RESPONSE_BIT | (resp.opcode & 0x7F), resp.result, _u32(resp.epoch, "epoch"))


def decode_response(data: bytes) -> NatPmpResponse:
    """Parse a response as a client does; 8-octet answers (§3.5) come back as ErrorResponse."""
    if len(data) < UNSUPP_VERSION_SIZE:
        raise NatPmpDecodeError(Fault.TRUNCATED, "shorter than 8 octets")
    version, op, result, epoch = _HEAD_RESP.unpack_from(data)
    if version != VERSION:
        raise NatPmpDecodeError(Fault.VERSION, f"version {version}")
    if result == Result.UNSUPP_VERSION and len(data) == UNSUPP_VERSION_SIZE:
        return ErrorResponse(op & 0x7F, result, epoch)  # op 0 or 128: RFC 6886 erratum 3618
    if not op & RESPONSE_BIT:
        raise NatPmpDecodeError(Fault.NOT_REQUEST, f"opcode {op} is not a response")
    opcode = op & 0x7F
    if opcode == Opcode.PUBLIC_ADDRESS:
        if len(data) != PUBLIC_ADDRESS_RESPONSE_SIZE:
            raise NatPmpDecodeError(Fault.TRAILING, f"public address response of {len(data)} octets")
        return PublicAddressResponse(result, epoch, ipaddress.IPv4Address(data[8:12]))
    if opcode not in OPCODE_PROTOCOL:
        raise NatPmpDecodeError(Fault.OPCODE, f"opcode {opcode}")
    if len(data) == UNSUPP_VERSION_SIZE and result != Result.SUCCESS:
        return ErrorResponse(opcode, result, epoch)
    if len(data) != MAP_RESPONSE_SIZE:
        raise NatPmpDecodeError(Fault.TRAILING, f"map response of {len(data)} octets")
    _, _, _, _, iport, eport, lifetime = _MAP_RESP.unpack(data)
    return MapResponse(OPCODE_PROTOCOL[opcode], result, epoch, iport, eport, lifetime)


def unsupported_version(epoch: int) -> bytes:
    """The 'Unsupported Version' answer: 0, 128, 1, SSSoE (RFC 6886 §3.5 with erratum 3618)."""
    return encode_response(ErrorResponse(Opcode.PUBLIC_ADDRESS, Result.UNSUPP_VERSION, epoch))


def unsupported_opcode(request: bytes, limit: int) -> bytes:
    """The whole request returned with the opcode's top bit set and result 5 (RFC 6886 §3.5).

    Cut to ``limit`` octets and grown to the 4 octets the result code needs.
    """
    out = bytearray(request[:limit].ljust(4, b"\x00"))
    out[1] |= RESPONSE_BIT
    out[2:4] = Result.UNSUPP_OPCODE.to_bytes(2, "big")
    return bytes(out)


def address_announcement(epoch: int, address: ipaddress.IPv4Address) -> bytes:
    """The gratuitous public address response of RFC 6886 §3.2.1."""
    return encode_response(PublicAddressResponse(Result.SUCCESS, epoch, address))
