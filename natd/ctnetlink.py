"""ctnetlink, the conntrack part of netfilter's netlink: a pure codec and the blocking I/O of the worker.

The dump and the deletes run only in the conntrack worker process (natd/ctworker.py), never
on natd's event loop, so they are plain blocking calls on sockets with timeouts and this
module imports no asyncio (the worker stays a small process). The codec (linux/netfilter/
nfnetlink_conntrack.h) is pure and shared with natd and the tests; the framing is shared/netlink.py.

- :func:`ct_dump`: the conntrack entries whose mark matches ``mark``/``mask``, filtered
  by the kernel (CTA_MARK + CTA_MARK_MASK in the dump request), so Python decodes
  only the flows through natd's forwards, however many other flows the router has.
- :func:`ct_delete`: delete entries by their original tuple (a hash lookup each).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

from shared import netlink as nl

NETLINK_NETFILTER = 12
_CT = 1 << 8  # NFNL_SUBSYS_CTNETLINK
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = _CT | 0, _CT | 1, _CT | 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_MARK, CTA_MARK_MASK = 1, 2, 8, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, res_id (big endian)
_U32BE = struct.Struct("!I")
_U16BE = struct.Struct("!H")

MAX_CT_ENTRIES = 1_000_000  # bound on one dump (nf_conntrack_max is far lower)
CT_DUMP_TIMEOUT_S = 5.0  # bound on one dump, and on each send of deletes
RECV_BYTES = 1 << 16
DELETES_PER_SEND = 512  # ~100 bytes each: one datagram well under the socket's send buffer


@dataclass(frozen=True)
class CtTuple:
    """One direction of a conntrack entry."""

    proto: int
    src: str
    dst: str
    sport: int
    dport: int


@dataclass(frozen=True)
class CtEntry:
    """A conntrack entry as natd needs it: both directions."""

    family: int
    orig: CtTuple
    reply: CtTuple


def _ip(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def decode_tuple(buf: bytes) -> CtTuple | None:
    """A CTA_TUPLE_* payload, or None if it lacks an address or a port (ICMP, GRE, ...)."""
    at = nl.attrs(buf)
    ip, pr = nl.attrs(at.get(CTA_TUPLE_IP, b"")), nl.attrs(at.get(CTA_TUPLE_PROTO, b""))
    src = ip.get(CTA_IP_V4_SRC) or ip.get(CTA_IP_V6_SRC)
    dst = ip.get(CTA_IP_V4_DST) or ip.get(CTA_IP_V6_DST)
    num, sp, dp = pr.get(CTA_PROTO_NUM), pr.get(CTA_PROTO_SRC_PORT), pr.get(CTA_PROTO_DST_PORT)
    if not (src and dst and num and sp and dp):
        return None
    return CtTuple(num[0], _ip(src), _ip(dst), _U16BE.unpack(sp)[0], _U16BE.unpack(dp)[0])


def encode_tuple(atype: int, t: CtTuple) -> bytes:
    """A CTA_TUPLE_ORIG/REPLY attribute for ``t``."""
    v6 = ipaddress.ip_address(t.src).version == 6
    s_at, d_at = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if v6 else (CTA_IP_V4_SRC, CTA_IP_V4_DST)
    return nl.nested(atype,
                     nl.nested(CTA_TUPLE_IP, nl.attr(s_at, ipaddress.ip_address(t.src).packed),
                               nl.attr(d_at, ipaddress.ip_address(t.dst).packed)),
                     nl.nested(CTA_TUPLE_PROTO, nl.attr(CTA_PROTO_NUM, bytes([t.proto])),
                               nl.attr(CTA_PROTO_SRC_PORT, _U16BE.pack(t.sport)),
                               nl.attr(CTA_PROTO_DST_PORT, _U16BE.pack(t.dport))))


def decode_entry(msg: nl.Msg) -> CtEntry | None:
    """An IPCTNL_MSG_CT_NEW message of a dump, or None if it is not a port-carrying flow."""
    if msg.type != IPCTNL_MSG_CT_NEW or len(msg.payload) < NFGEN.size:
        return None
    at = nl.attrs(msg.payload, NFGEN.size)
    o, r = decode_tuple(at.get(CTA_TUPLE_ORIG, b"")), decode_tuple(at.get(CTA_TUPLE_REPLY, b""))
    return CtEntry(msg.payload[0], o, r) if o and r else None


def dump_request(family: int, mark: int, mask: int, seq: int = 1) -> bytes:
    """A ctnetlink dump of ``family`` that the kernel filters on ``ct mark & mask == mark``."""
    return nl.message(IPCTNL_MSG_CT_GET, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq,
                      NFGEN.pack(family, 0, 0) + nl.attr(CTA_MARK, _U32BE.pack(mark))
                      + nl.attr(CTA_MARK_MASK, _U32BE.pack(mask)))


def delete_request(e: CtEntry, seq: int = 1) -> bytes:
    """Delete the entry whose original tuple is ``e.orig`` (no ACK: only failures answer)."""
    return nl.message(IPCTNL_MSG_CT_DELETE, nl.NLM_F_REQUEST, seq,
                      NFGEN.pack(e.family, 0, 0) + encode_tuple(CTA_TUPLE_ORIG, e.orig))


def ct_dump(mark: int, mask: int, family: int = socket.AF_INET,
            timeout: float = CT_DUMP_TIMEOUT_S) -> list[CtEntry]:
    """The port-carrying conntrack entries of ``family`` whose mark matches (blocking, at most
    ``timeout`` seconds in all: TimeoutError past it; at most MAX_CT_ENTRIES read)."""
    deadline = time.monotonic() + timeout
    out: list[CtEntry] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(timeout)
        s.sendall(dump_request(family, mark, mask))
        seen = 0
        while seen < MAX_CT_ENTRIES:
            s.settimeout(max(deadline - time.monotonic(), 1e-3))  # the whole dump's bound, not each read's
            for m in nl.messages(s.recv(RECV_BYTES)):
                if m.type == nl.NLMSG_DONE:
                    return out
                if m.type == nl.NLMSG_ERROR:
                    raise OSError(nl.error_code(m), "conntrack dump")
                seen += 1
                e = decode_entry(m)
                if e is not None:
                    out.append(e)
    return out


def ct_delete(entries: Iterable[CtEntry], timeout: float = CT_DUMP_TIMEOUT_S) -> None:
    """Delete ``entries`` by original tuple, many per datagram; ones already gone are no error."""
    batch = [delete_request(e, i + 1) for i, e in enumerate(entries)]
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        for i in range(0, len(batch), DELETES_PER_SEND):
            s.settimeout(timeout)
            s.sendall(b"".join(batch[i:i + DELETES_PER_SEND]))
            s.setblocking(False)  # drain what is queued, wait for nothing
            for _ in range(DELETES_PER_SEND + 1):  # the ENOENT answers of flows that ended meanwhile
                try:
                    s.recv(RECV_BYTES)
                except BlockingIOError:
                    break
                except OSError:  # ENOBUFS: answers overflowed the buffer; they were only errors
                    continue
