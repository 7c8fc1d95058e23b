"""Netlink framing, stdlib only (RFC 3549; linux/netlink.h): messages and attributes in, bytes out.

Sans-I/O: callers own the sockets. Both daemons read interface facts through it
(shared/netif.py) and natd speaks ctnetlink with it (natd/netlink.py), so neither
needs pyroute2, whose version differs on every distribution and whose import
alone costs ~22 MB.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
_NLA_TYPE_MASK = 0x3FFF  # without the NESTED / NET_BYTEORDER flag bits

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_ATTR = struct.Struct("=HH")  # nlattr: len, type


@dataclass(frozen=True)
class Msg:
    """One netlink message: its type, flags, sequence number and payload (after the header)."""

    type: int
    flags: int
    seq: int
    payload: bytes


def _pad(n: int) -> int:
    return (n + 3) & ~3


def message(mtype: int, flags: int, seq: int, payload: bytes) -> bytes:
    """Encode one netlink message."""
    return _HDR.pack(_HDR.size + len(payload), mtype, flags, seq, 0) + payload


def attr(atype: int, data: bytes) -> bytes:
    """Encode one attribute, padded to 4 bytes."""
    n = _ATTR.size + len(data)
    return _ATTR.pack(n, atype) + data + b"\0" * (_pad(n) - n)


def nested(atype: int, *attrs: bytes) -> bytes:
    """Encode a nested attribute holding ``attrs``."""
    return attr(atype | NLA_F_NESTED, b"".join(attrs))


def messages(buf: bytes) -> Iterator[Msg]:
    """The messages in one datagram; stops at a truncated or malformed one."""
    off = 0
    while off + _HDR.size <= len(buf):
        length, mtype, flags, seq, _pid = _HDR.unpack_from(buf, off)
        if length < _HDR.size or off + length > len(buf):
            return
        yield Msg(mtype, flags, seq, bytes(buf[off + _HDR.size:off + length]))
        off += _pad(length)


def attrs(buf: bytes, offset: int = 0) -> dict[int, bytes]:
    """The attributes in ``buf`` from ``offset`` on, by type (flag bits removed; last one wins)."""
    out: dict[int, bytes] = {}
    off = offset
    while off + _ATTR.size <= len(buf):
        length, atype = _ATTR.unpack_from(buf, off)
        if length < _ATTR.size or off + length > len(buf):
            break
        out[atype & _NLA_TYPE_MASK] = buf[off + _ATTR.size:off + length]
        off += _pad(length)
    return out


def error_code(msg: Msg) -> int:
    """The (positive) errno an NLMSG_ERROR carries; 0 is an acknowledgement."""
    return -struct.unpack_from("=i", msg.payload)[0] if len(msg.payload) >= 4 else 0
