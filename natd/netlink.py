"""natd's one seam to the kernel's netlink: rtnetlink events and ctnetlink, on natd's event loop.

Non-blocking AF_NETLINK sockets read through the loop (``loop.sock_recv``), no
threads, no pyroute2 (stdlib only, the same on every distribution's Python); the
framing is shared/netlink.py. What goes over them:

- :class:`RouteEvents`: the rtnetlink multicast groups for links, IPv4 addresses and
  routes; natd only needs to know *that* something changed.
- :func:`ct_dump`: the conntrack entries whose mark matches ``mark``/``mask``, filtered
  by the kernel (CTA_MARK + CTA_MARK_MASK in the dump request), so Python decodes
  only the flows through natd's forwards, however many other flows the router has.
- :func:`ct_delete`: delete entries by their original tuple (a hash lookup each).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shared import netlink as nl

# rtnetlink multicast groups: links, IPv4 addresses, IPv4 routes (linux/rtnetlink.h RTMGRP_*)
RT_GROUPS = 0x1 | 0x10 | 0x40

NETLINK_NETFILTER = 12
_CT = 1 << 8  # NFNL_SUBSYS_CTNETLINK
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = _CT | 0, _CT | 1, _CT | 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_MARK, CTA_MARK_MASK = 1, 2, 8, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
_NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, res_id (big endian)
_U32BE = struct.Struct("!I")
_U16BE = struct.Struct("!H")

MAX_CT_ENTRIES = 1_000_000  # bound on one dump (nf_conntrack_max is far lower)
CT_DUMP_TIMEOUT_S = 5.0
RECV_BYTES = 1 << 16
MAX_DRAIN = 10_000  # bound on queued event datagrams read in one go
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


class RouteEvents:
    """Subscription to rtnetlink link/address/route events; ``await wait()`` for the next burst."""

    def __init__(self, groups: int = RT_GROUPS) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setblocking(False)
        self.sock.bind((0, groups))

    async def wait(self) -> None:
        """Return once at least one event arrived, with every queued one consumed."""
        try:
            await asyncio.get_running_loop().sock_recv(self.sock, RECV_BYTES)
        except OSError as exc:  # ENOBUFS: events overflowed the buffer, which is an event too
            if exc.errno != errno.ENOBUFS:
                raise
        for _ in range(MAX_DRAIN):  # drain what else is queued: natd re-reads the whole picture anyway
            try:
                self.sock.recv(RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise

    def close(self) -> None:
        self.sock.close()


def _ct_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.setblocking(False)
    return s


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
    if msg.type != IPCTNL_MSG_CT_NEW or len(msg.payload) < _NFGEN.size:
        return None
    at = nl.attrs(msg.payload, _NFGEN.size)
    o, r = decode_tuple(at.get(CTA_TUPLE_ORIG, b"")), decode_tuple(at.get(CTA_TUPLE_REPLY, b""))
    return CtEntry(msg.payload[0], o, r) if o and r else None


def dump_request(family: int, mark: int, mask: int, seq: int = 1) -> bytes:
    """A ctnetlink dump of ``family`` that the kernel filters on ``ct mark & mask == mark``."""
    return nl.message(IPCTNL_MSG_CT_GET, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq,
                      _NFGEN.pack(family, 0, 0) + nl.attr(CTA_MARK, _U32BE.pack(mark))
                      + nl.attr(CTA_MARK_MASK, _U32BE.pack(mask)))


def delete_request(e: CtEntry, seq: int = 1) -> bytes:
    """Delete the entry whose original tuple is ``e.orig`` (no ACK: only failures answer)."""
    return nl.message(IPCTNL_MSG_CT_DELETE, nl.NLM_F_REQUEST, seq,
                      _NFGEN.pack(e.family, 0, 0) + encode_tuple(CTA_TUPLE_ORIG, e.orig))


async def ct_dump(mark: int, mask: int, family: int = socket.AF_INET) -> list[CtEntry]:
    """The port-carrying conntrack entries of ``family`` whose mark matches, read off the loop's reader."""
    loop = asyncio.get_running_loop()
    out: list[CtEntry] = []
    with _ct_socket() as s:
        await loop.sock_sendall(s, dump_request(family, mark, mask))

        async def read() -> None:
            seen = 0
            while seen < MAX_CT_ENTRIES:
                for m in nl.messages(await loop.sock_recv(s, RECV_BYTES)):
                    if m.type == nl.NLMSG_DONE:
                        return
                    if m.type == nl.NLMSG_ERROR:
                        raise OSError(nl.error_code(m), "conntrack dump")
                    seen += 1
                    e = decode_entry(m)
                    if e is not None:
                        out.append(e)

        await asyncio.wait_for(read(), CT_DUMP_TIMEOUT_S)
    return out


async def ct_delete(entries: Iterable[CtEntry]) -> None:
    """Delete ``entries`` by original tuple, many per datagram; ones already gone are no error."""
    loop = asyncio.get_running_loop()
    batch = [delete_request(e, i + 1) for i, e in enumerate(entries)]
    with _ct_socket() as s:
        for i in range(0, len(batch), DELETES_PER_SEND):
            await loop.sock_sendall(s, b"".join(batch[i:i + DELETES_PER_SEND]))
            for _ in range(DELETES_PER_SEND + 1):  # drain the ENOENT answers of flows that ended meanwhile
                try:
                    s.recv(RECV_BYTES)
                except BlockingIOError:
                    break
                except OSError:  # ENOBUFS: answers overflowed the buffer; they were only errors
                    continue


# --------------------------------------------------------------------- nf_tables set elements
# A bulk write of map elements (natd's restore of N forwards after a restart) as one nf_tables
# batch: the same transaction `nft add element` makes, without libnftables parsing N elements of
# text (~25 us each). linux/netfilter/nf_tables.h and nfnetlink.h.
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE = 1
NLM_F_CREATE = 0x400
ELEMS_PER_MESSAGE = 1000  # ~40 bytes each: one message's element list stays under its u16 length
NFT_BATCH_TIMEOUT_S = 10.0
FAMILIES = {"ip": socket.AF_INET, "inet": 1, "ip6": socket.AF_INET6}

# One element change: (key bytes, data bytes) to add (b"": a plain set's element, no data), or
# (key bytes, None) to delete; a third item, when there, is the element's timeout in ms.
ElemOp = tuple[bytes, bytes | None] | tuple[bytes, bytes | None, int]
ElemVal = tuple[bytes, bytes | None]  # an element read back: key, data (None in a plain set)
NFTA_SET_ELEM_TIMEOUT = 4
_TIMEOUT_HDR = struct.Struct("=HH")  # NFTA_SET_ELEM_TIMEOUT: a native header, then
_MS = struct.Struct("!Q")  # u64 milliseconds, big endian


class NftBatchError(OSError):
    """The kernel refused the batch (nothing of it was applied)."""


_NLA = struct.Struct("=HH")  # an attribute header: length, type
_NLA2 = struct.Struct("=HHHH")  # an attribute header and the header of the one attribute it nests


def _elem(key: bytes, data: bytes | None, timeout_ms: int = 0) -> bytes:
    """One NFTA_LIST_ELEM: key (and data) values, and a timeout. Keys and data are whole registers
    (multiples of 4 bytes), so no padding falls between; packed by hand, as this runs N times per batch.
    A set declared with ``counter`` gives every new element its own counter (the kernel's template)."""
    inner = _NLA2.pack(8 + len(key), NFTA_SET_ELEM_KEY | nl.NLA_F_NESTED, 4 + len(key), NFTA_DATA_VALUE) + key
    if data:
        inner += _NLA2.pack(8 + len(data), NFTA_SET_ELEM_DATA | nl.NLA_F_NESTED, 4 + len(data), NFTA_DATA_VALUE) + data
    if timeout_ms:
        inner += _TIMEOUT_HDR.pack(_TIMEOUT_HDR.size + _MS.size, NFTA_SET_ELEM_TIMEOUT) + _MS.pack(timeout_ms)
    return _NLA.pack(4 + len(inner), NFTA_LIST_ELEM | nl.NLA_F_NESTED) + inner


def setelem_batch(family: int, table: str, changes: Iterable[tuple[str, Sequence[ElemOp]]],
                  seq: int = 1) -> tuple[bytes, int]:
    """One nf_tables batch (begin, the element messages, end) that applies ``changes``: per set name,
    its deletes then its adds, in the given order. Returns the bytes and how many messages ask for
    an acknowledgement (every element message)."""
    out = [nl.message(NFNL_MSG_BATCH_BEGIN, nl.NLM_F_REQUEST, seq, _NFGEN.pack(0, 0, NFNL_SUBSYS_NFTABLES))]
    head = nl.attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
    acks = 0
    for name, ops in changes:
        where = head + nl.attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
        for kind, part in ((NFT_MSG_DELSETELEM, [op for op in ops if op[1] is None]),
                           (NFT_MSG_NEWSETELEM, [op for op in ops if op[1] is not None])):
            flags = nl.NLM_F_REQUEST | nl.NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
            for i in range(0, len(part), ELEMS_PER_MESSAGE):
                seq += 1
                elems = b"".join(_elem(*op) for op in part[i:i + ELEMS_PER_MESSAGE])
                out.append(nl.message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq,
                                      _NFGEN.pack(family, 0, 0) + where
                                      + nl.attr(NFTA_SET_ELEM_LIST_ELEMENTS | nl.NLA_F_NESTED, elems)))
                acks += 1
    seq += 1
    out.append(nl.message(NFNL_MSG_BATCH_END, nl.NLM_F_REQUEST, seq, _NFGEN.pack(0, 0, NFNL_SUBSYS_NFTABLES)))
    return b"".join(out), acks


class NftSocket:
    """natd's one long-lived nf_tables socket for element batches (blocking, as a libnftables command is).

    Long-lived because closing a netfilter socket makes the kernel wait for the element destruction
    work of every earlier commit (an RCU grace period, ~10 ms after a delete); kept open, one element's
    add or delete costs tens of microseconds against libnftables' ~200 for parsing the same text.
    Each batch carries its own sequence numbers, so a late answer to an earlier batch (one that timed
    out) is never taken for this one's."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._sndbuf = 0
        self._seq = 0

    def _socket(self, size: int) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        if size + 4096 > self._sndbuf:  # the whole batch goes in one datagram (one transaction)
            self._sndbuf = max(size + 4096, 1 << 16)
            self._sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_SNDBUFFORCE", 32), self._sndbuf)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock, self._sndbuf = None, 0

    def run(self, changes: Iterable[tuple[str, Sequence[ElemOp]]], family: int, table: str,
            timeout: float = NFT_BATCH_TIMEOUT_S) -> None:
        """Apply ``changes`` (per set: deletes, then adds) as one transaction; NftBatchError when the
        kernel refused it (nothing applied), another OSError when the socket failed (then reopened)."""
        first = self._seq + 1
        batch, acks = setelem_batch(family, table, changes, seq=first)
        self._seq = first + acks + 1
        if self._seq > 1 << 30:
            self._seq = 0
        wanted = set(range(first + 1, first + acks + 1))  # the element messages' numbers
        try:
            s = self._socket(len(batch))
            s.settimeout(timeout)
            s.sendall(batch)
            while wanted:
                for msg in nl.messages(s.recv(RECV_BYTES)):
                    if msg.type != nl.NLMSG_ERROR or msg.seq not in wanted:
                        continue  # an earlier batch's late answer
                    code = nl.error_code(msg)
                    if code:
                        raise NftBatchError(code, f"nf_tables batch refused: {errno.errorcode.get(code, code)}")
                    wanted.discard(msg.seq)
        except NftBatchError:
            raise
        except OSError:
            self.close()  # a timeout or a broken socket: the next batch starts on a fresh one
            raise


_NFT_SOCKET = NftSocket()


def nft_batch(changes: Iterable[tuple[str, Sequence[ElemOp]]], family: int, table: str,
              timeout: float = NFT_BATCH_TIMEOUT_S) -> None:
    """Apply element ``changes`` to ``table`` as one nf_tables transaction, on natd's long-lived socket;
    NftBatchError when the kernel refused it (nothing of it applied)."""
    _NFT_SOCKET.run(changes, family, table, timeout)


NFT_MSG_GETSETELEM = 13
MAX_SET_ELEMENTS = 1 << 17  # bound on one dump (natd's maps hold at most 65535 x 2 protocols)


def getsetelem_request(family: int, table: str, name: str, seq: int = 1) -> bytes:
    """Dump every element of set/map ``name``."""
    return nl.message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq,
                      _NFGEN.pack(family, 0, 0) + nl.attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                      + nl.attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"))


def decode_setelems(msg: nl.Msg) -> list[ElemVal]:
    """The (key, data) values of one NEWSETELEM message of a dump (data None in a plain set)."""
    if msg.type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM or len(msg.payload) < _NFGEN.size:
        return []
    out: list[ElemVal] = []
    elems = nl.attrs(msg.payload, _NFGEN.size).get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")
    off = 0
    while off + _NLA.size <= len(elems):  # a list of NFTA_LIST_ELEM (several share a type: no dict)
        length, _ = _NLA.unpack_from(elems, off)
        if length < _NLA.size:
            break
        e = nl.attrs(elems[off + _NLA.size:off + length])
        key = nl.attrs(e.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
        if key is not None:
            data = e.get(NFTA_SET_ELEM_DATA)
            out.append((key, None if data is None else nl.attrs(data).get(NFTA_DATA_VALUE)))
        off += (length + 3) & ~3
    return out


def nft_dump_elements(family: int, table: str, name: str, timeout: float = NFT_BATCH_TIMEOUT_S) -> list[ElemVal]:
    """Every element of a set or map as raw key/data values (blocking, as a libnftables listing is; far
    less memory than its JSON for 10k elements). OSError (ENOENT: no such table or set) on failure."""
    out: list[ElemVal] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(timeout)
        s.sendall(getsetelem_request(family, table, name))
        while True:
            for msg in nl.messages(s.recv(RECV_BYTES)):
                if msg.type == nl.NLMSG_DONE:
                    return out
                if msg.type == nl.NLMSG_ERROR:
                    code = nl.error_code(msg)
                    raise OSError(code, f"nf_tables element dump of {name}: {errno.errorcode.get(code, code)}")
                out += decode_setelems(msg)
                if len(out) > MAX_SET_ELEMENTS:
                    raise OSError(errno.E2BIG, f"{name} holds more than {MAX_SET_ELEMENTS} elements")
