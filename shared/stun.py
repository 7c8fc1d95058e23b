"""STUN Binding (RFC 8489), sans-I/O: learn the address a NAT gives us from a STUN server.

Only what a client needs to ask "what is my public address": the Binding request
(§5, §6.1), the success and error responses, XOR-MAPPED-ADDRESS (§14.2) with the
older MAPPED-ADDRESS (§14.1) as a fallback for RFC 3489 servers, FINGERPRINT (§14.7;
checked when present, optional when sending), ERROR-CODE (§14.8), and the UDP
retransmission schedule (§6.2.1) as a pure state machine (:class:`BindingTransaction`):
bytes and times in, bytes and results out. The socket edge is natd/stun.py.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass

MAGIC_COOKIE = 0x2112A442  # RFC 8489 §5
HEADER = struct.Struct("!HHI12s")  # type, length, cookie, transaction id
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E  # RFC 8489 §14.7
FAMILY_V4, FAMILY_V6 = 0x01, 0x02

DEFAULT_PORT = 3478  # RFC 8489 §18.6
MAX_MESSAGE = 1280  # anything a Binding answer needs; bigger datagrams are refused
# RFC 8489 §6.2.1: RTO 500 ms, doubling, Rc = 7 sends, a last wait of Rm = 16 RTOs.
RTO, RC, RM = 0.5, 7, 16


class StunError(ValueError):
    """A datagram that is not a well-formed STUN message for us; the message says why."""


@dataclass(frozen=True)
class BindingResponse:
    """What a Binding answer says: the mapped (public) endpoint, or the server's error."""

    transaction_id: bytes
    mapped: tuple[str, int] | None
    error: tuple[int, str] | None = None
    software: str | None = None


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def _attr(atype: int, value: bytes) -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + b"\0" * _pad(len(value))


def fingerprint(message_so_far: bytes) -> int:
    """CRC-32 of the message up to the FINGERPRINT attribute, XOR 0x5354554e (§14.7)."""
    return (zlib.crc32(message_so_far) & 0xFFFFFFFF) ^ FINGERPRINT_XOR


def binding_request(transaction_id: bytes | None = None, with_fingerprint: bool = True,
                    software: str | None = None) -> tuple[bytes, bytes]:
    """A Binding request (§6.1) and its transaction id (96 random bits unless given)."""
    txid = os.urandom(12) if transaction_id is None else transaction_id
    if len(txid) != 12:
        raise ValueError("a STUN transaction id is 12 bytes")
    body = _attr(ATTR_SOFTWARE, software.encode()[:763]) if software else b""
    if not with_fingerprint:
        return HEADER.pack(BINDING_REQUEST, len(body), MAGIC_COOKIE, txid) + body, txid
    head = HEADER.pack(BINDING_REQUEST, len(body) + 8, MAGIC_COOKIE, txid)
    crc = fingerprint(head + body)
    return head + body + _attr(ATTR_FINGERPRINT, struct.pack("!I", crc)), txid


def _address(value: bytes, xor: bool, txid: bytes) -> tuple[str, int]:
    if len(value) < 4:
        raise StunError("address attribute shorter than 4 bytes")
    family, port = value[1], struct.unpack("!H", value[2:4])[0]
    raw = value[4:]
    if family == FAMILY_V4 and len(raw) == 4:
        key = struct.pack("!I", MAGIC_COOKIE)
    elif family == FAMILY_V6 and len(raw) == 16:
        key = struct.pack("!I", MAGIC_COOKIE) + txid
    else:
        raise StunError(f"address family {family} with {len(raw)} address bytes")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, key, strict=True))
    return str(ipaddress.ip_address(raw)), port


def parse_message(data: bytes) -> tuple[int, bytes, list[tuple[int, bytes, int]]]:
    """Header and attributes of any STUN message: (type, transaction id, [(type, value,
    offset of the attribute)]). Checks the framing (§5, §14) and FINGERPRINT when present."""
    if len(data) < HEADER.size or len(data) > MAX_MESSAGE:
        raise StunError(f"{len(data)} bytes is no STUN message")
    mtype, length, cookie, txid = HEADER.unpack_from(data)
    if mtype & 0xC000 or cookie != MAGIC_COOKIE:
        raise StunError("not a STUN message (top bits or magic cookie)")
    if length % 4 or HEADER.size + length != len(data):
        raise StunError(f"length field {length} does not match the {len(data)}-byte datagram")
    attrs: list[tuple[int, bytes, int]] = []
    off = HEADER.size
    while off < len(data):
        if off + 4 > len(data):
            raise StunError("truncated attribute header")
        atype, alen = struct.unpack_from("!HH", data, off)
        end = off + 4 + alen
        if end > len(data):
            raise StunError(f"attribute 0x{atype:04x} runs past the message")
        attrs.append((atype, data[off + 4:end], off))
        if atype == ATTR_FINGERPRINT:
            if alen != 4 or end != len(data):
                raise StunError("FINGERPRINT must be the last attribute, 4 bytes long")
            want = struct.unpack("!I", data[off + 4:end])[0]
            if fingerprint(data[:off]) != want:
                raise StunError("FINGERPRINT does not match")
        off = end + _pad(alen)
    return mtype, txid, attrs


def parse_response(data: bytes, transaction_id: bytes) -> BindingResponse:
    """Decode a Binding success or error response to the request ``transaction_id``.

    XOR-MAPPED-ADDRESS wins over MAPPED-ADDRESS (§14.2: NATs that rewrite addresses in
    payloads leave the XOR form alone). Raises :class:`StunError` for anything else,
    including an answer to another transaction (§6.3: such responses are discarded).
    """
    mtype, txid, attrs = parse_message(data)
    if txid != transaction_id:
        raise StunError("answer to another transaction")
    if mtype not in (BINDING_SUCCESS, BINDING_ERROR):
        raise StunError(f"message type 0x{mtype:04x} is no Binding response")
    found: dict[int, bytes] = {}
    for atype, value, _ in attrs:
        if atype == ATTR_MESSAGE_INTEGRITY:
            break  # §14.5: what follows (except FINGERPRINT) is not covered; ignore it
        found.setdefault(atype, value)
    software = found[ATTR_SOFTWARE].decode("utf-8", "replace") if ATTR_SOFTWARE in found else None
    if mtype == BINDING_ERROR:
        value = found.get(ATTR_ERROR_CODE, b"")
        if len(value) < 4:
            raise StunError("error response without ERROR-CODE")
        code = (value[2] & 0x07) * 100 + value[3]
        return BindingResponse(txid, None, (code, value[4:].decode("utf-8", "replace")), software)
    if ATTR_XOR_MAPPED_ADDRESS in found:
        mapped = _address(found[ATTR_XOR_MAPPED_ADDRESS], True, txid)
    elif ATTR_MAPPED_ADDRESS in found:
        mapped = _address(found[ATTR_MAPPED_ADDRESS], False, txid)
    else:
        raise StunError("success response without a mapped address")
    return BindingResponse(txid, mapped, None, software)


class BindingTransaction:
    """One Binding request over UDP with RFC 8489 §6.2.1 retransmissions, no I/O.

    ``poll(now)`` returns the datagram to send now (or None) and when to call it again
    (None: the transaction is over); ``receive(data)`` returns the answer once one of
    ours arrives. After ``tries`` sends and a last wait of ``rm`` RTOs it gives up
    (``timed_out``): 39.5 s with the RFC's values, bounded by ``tries``.
    """

    def __init__(self, now: float, rto: float = RTO, tries: int = RC, rm: int = RM,
                 transaction_id: bytes | None = None, with_fingerprint: bool = True) -> None:
        self.request, self.transaction_id = binding_request(transaction_id, with_fingerprint)
        self.rto, self.tries, self.rm = rto, tries, rm
        self.sent = 0
        self.next_at = now
        self.response: BindingResponse | None = None
        self.timed_out = False

    @property
    def done(self) -> bool:
        return self.response is not None or self.timed_out

    def poll(self, now: float) -> tuple[bytes | None, float | None]:
        """(datagram to send now or None, time of the next call or None when over)."""
        if self.done:
            return None, None
        if now < self.next_at:
            return None, self.next_at
        if self.sent >= self.tries:
            self.timed_out = True
            return None, None
        wait = self.rto * (2 ** self.sent) if self.sent < self.tries - 1 else self.rto * self.rm
        self.sent += 1
        self.next_at = now + wait
        return self.request, self.next_at

    def receive(self, data: bytes) -> BindingResponse | None:
        """The answer if ``data`` is ours (the first one counts); None for anything else."""
        if self.done:
            return None
        try:
            self.response = parse_response(data, self.transaction_id)
        except StunError:
            return None
        return self.response
