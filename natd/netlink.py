"""natd's netlink seam on its event loop: rtnetlink events, and nf_tables element batches and dumps.

No pyroute2 (stdlib only, the same on every distribution's Python); the framing is
shared/netlink.py. What goes over it:

- :class:`RouteEvents`: the rtnetlink multicast groups for links, IPv4 addresses and
  routes, read through the loop (``loop.sock_recv``); natd only needs to know *that*
  something changed.
- :func:`nft_batch` and :func:`nft_dump_elements`: nf_tables map elements in bulk.

ctnetlink (the conntrack dump and deletes) is natd/ctnetlink.py: it runs only in the
conntrack worker process, which imports no asyncio.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from natd.ctnetlink import NETLINK_NETFILTER, RECV_BYTES
from natd.ctnetlink import NFGEN as _NFGEN
from shared import netlink as nl

# rtnetlink multicast groups: links, IPv4 addresses, IPv4 routes (linux/rtnetlink.h RTMGRP_*)
RT_GROUPS = 0x1 | 0x10 | 0x40

MAX_DRAIN = 10_000  # bound on queued event datagrams read in one go


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
_E = TypeVar("_E")
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


def setelem_batch(family: int, table: str, changes: Iterable[tuple[str, Iterable[ElemOp]]],
                  seq: int = 1) -> tuple[bytes, int]:
    """One nf_tables batch (begin, the element messages, end) that applies ``changes``: per set name,
    its ops in the given order (callers give a set's deletes first), consecutive ops of one kind in
    messages of at most ELEMS_PER_MESSAGE elements. The ops are read one at a time, so a 10k restore
    never holds an object per element. Returns the bytes and how many messages ask for an
    acknowledgement (every element message)."""
    out = [nl.message(NFNL_MSG_BATCH_BEGIN, nl.NLM_F_REQUEST, seq, _NFGEN.pack(0, 0, NFNL_SUBSYS_NFTABLES))]
    head = nl.attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
    acks = 0
    for name, ops in changes:
        where = _NFGEN.pack(family, 0, 0) + head + nl.attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
        kind, elems, count = 0, bytearray(), 0
        for op in ops:
            op_kind = NFT_MSG_DELSETELEM if op[1] is None else NFT_MSG_NEWSETELEM
            if count and (op_kind != kind or count == ELEMS_PER_MESSAGE):
                seq += 1
                out.append(_elems_message(kind, seq, where, elems))
                acks, elems, count = acks + 1, bytearray(), 0
            kind, count = op_kind, count + 1
            elems += _elem(*op)
        if count:
            seq += 1
            out.append(_elems_message(kind, seq, where, elems))
            acks += 1
    seq += 1
    out.append(nl.message(NFNL_MSG_BATCH_END, nl.NLM_F_REQUEST, seq, _NFGEN.pack(0, 0, NFNL_SUBSYS_NFTABLES)))
    return b"".join(out), acks


def _elems_message(kind: int, seq: int, where: bytes, elems: bytes | bytearray) -> bytes:
    """One DELSETELEM or NEWSETELEM message (acknowledged) carrying ``elems``."""
    flags = nl.NLM_F_REQUEST | nl.NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
    return nl.message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq,
                      where + nl.attr(NFTA_SET_ELEM_LIST_ELEMENTS | nl.NLA_F_NESTED, bytes(elems)))


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

    def run(self, changes: Iterable[tuple[str, Iterable[ElemOp]]], family: int, table: str,
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


def nft_batch(changes: Iterable[tuple[str, Iterable[ElemOp]]], family: int, table: str,
              timeout: float = NFT_BATCH_TIMEOUT_S) -> None:
    """Apply element ``changes`` to ``table`` as one nf_tables transaction, on natd's long-lived socket;
    NftBatchError when the kernel refused it (nothing of it applied)."""
    _NFT_SOCKET.run(changes, family, table, timeout)


NFT_MSG_GETSETELEM = 13
MAX_SET_ELEMENTS = 1 << 17  # bound on one dump (natd's maps hold at most 65535 x 2 protocols)
# An element's counter and time left (linux/netfilter/nf_tables.h): a set declared with one
# expression dumps it in NFTA_SET_ELEM_EXPR, with several in a list in NFTA_SET_ELEM_EXPRESSIONS.
NFTA_SET_ELEM_EXPIRATION, NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_EXPRESSIONS = 5, 7, 11
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_COUNTER_PACKETS = 2
ElemCount = tuple[bytes, int, int]  # an element of a counted set read back: key, packets, ms left (0: none)


def getsetelem_request(family: int, table: str, name: str, seq: int = 1, key: bytes | None = None) -> bytes:
    """Dump every element of set/map ``name``; with ``key``, get that one element only (the kernel
    looks it up: O(1) in the set's size)."""
    where = (_NFGEN.pack(family, 0, 0) + nl.attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
             + nl.attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"))
    if key is None:
        return nl.message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq,
                          where)
    return nl.message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, nl.NLM_F_REQUEST | nl.NLM_F_ACK, seq,
                      where + nl.attr(NFTA_SET_ELEM_LIST_ELEMENTS | nl.NLA_F_NESTED, _elem(key, None)))


def _list_items(buf: bytes) -> Iterator[bytes]:
    """The payloads of a list of NFTA_LIST_ELEM attributes (several share a type: no dict)."""
    off = 0
    while off + _NLA.size <= len(buf):
        length, _ = _NLA.unpack_from(buf, off)
        if length < _NLA.size:
            break
        yield buf[off + _NLA.size:off + length]
        off += (length + 3) & ~3


def _elements(msg: nl.Msg) -> Iterator[dict[int, bytes]]:
    """The attributes of each element of one NEWSETELEM message (none for another message)."""
    if msg.type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM or len(msg.payload) < _NFGEN.size:
        return
    for item in _list_items(nl.attrs(msg.payload, _NFGEN.size).get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
        yield nl.attrs(item)


def decode_setelems(msg: nl.Msg) -> list[ElemVal]:
    """The (key, data) values of one NEWSETELEM message of a dump (data None in a plain set)."""
    out: list[ElemVal] = []
    for e in _elements(msg):
        key = nl.attrs(e.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
        if key is not None:
            data = e.get(NFTA_SET_ELEM_DATA)
            out.append((key, None if data is None else nl.attrs(data).get(NFTA_DATA_VALUE)))
    return out


def _packets(expr: bytes) -> int | None:
    """A counter expression's packets (None for another expression)."""
    a = nl.attrs(expr)
    if a.get(NFTA_EXPR_NAME, b"").rstrip(b"\0") != b"counter":
        return None
    raw = nl.attrs(a.get(NFTA_EXPR_DATA, b"")).get(NFTA_COUNTER_PACKETS, b"")
    return _MS.unpack(raw)[0] if len(raw) == _MS.size else None


def decode_counted(msg: nl.Msg) -> list[ElemCount]:
    """(key, packets, ms left) of each element of one NEWSETELEM message of a set declared with ``counter``."""
    out: list[ElemCount] = []
    for e in _elements(msg):
        key = nl.attrs(e.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
        if key is None:
            continue
        exprs = [e[NFTA_SET_ELEM_EXPR]] if NFTA_SET_ELEM_EXPR in e else []
        exprs += _list_items(e.get(NFTA_SET_ELEM_EXPRESSIONS, b""))
        packets = next((n for n in map(_packets, exprs) if n is not None), 0)
        left = e.get(NFTA_SET_ELEM_EXPIRATION, b"")
        out.append((key, packets, _MS.unpack(left)[0] if len(left) == _MS.size else 0))
    return out


def _read_dump(family: int, table: str, name: str, decode: Callable[[nl.Msg], list[_E]],
               timeout: float) -> Iterator[_E]:
    seen = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(timeout)
        s.sendall(getsetelem_request(family, table, name))
        while True:
            for msg in nl.messages(s.recv(RECV_BYTES)):
                if msg.type == nl.NLMSG_DONE:
                    return
                if msg.type == nl.NLMSG_ERROR:
                    code = nl.error_code(msg)
                    raise OSError(code, f"nf_tables element dump of {name}: {errno.errorcode.get(code, code)}")
                elems = decode(msg)
                seen += len(elems)
                if seen > MAX_SET_ELEMENTS:
                    raise OSError(errno.E2BIG, f"{name} holds more than {MAX_SET_ELEMENTS} elements")
                yield from elems


def nft_dump_elements(family: int, table: str, name: str, timeout: float = NFT_BATCH_TIMEOUT_S) -> Iterator[ElemVal]:
    """Every element of a set or map as raw key/data values, yielded as the dump arrives (blocking, as a
    libnftables listing is; far less memory than its JSON for 10k elements, and no list of them all).
    OSError (ENOENT: no such table or set) on failure, possibly after some elements were yielded."""
    return _read_dump(family, table, name, decode_setelems, timeout)


def nft_dump_counted(family: int, table: str, name: str, timeout: float = NFT_BATCH_TIMEOUT_S) -> Iterator[ElemCount]:
    """Every element of a set declared with ``counter``, as (key, packets, ms left), as the dump arrives
    (a libnftables JSON listing of 4096 such elements takes ~150 ms and 13 MiB). OSError as
    :func:`nft_dump_elements`."""
    return _read_dump(family, table, name, decode_counted, timeout)


def nft_get_counted(family: int, table: str, name: str, key: bytes,
                    timeout: float = NFT_BATCH_TIMEOUT_S) -> ElemCount | None:
    """One element of a set declared with ``counter``, looked up by the kernel; None when the set does
    not hold it. OSError for anything else (no such table or set: ENOENT as well, so callers that
    must tell the two apart check the set first)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(timeout)
        s.sendall(getsetelem_request(family, table, name, key=key))
        found: ElemCount | None = None
        for _ in range(4):  # the element, then the acknowledgement; bounded
            for msg in nl.messages(s.recv(RECV_BYTES)):
                if msg.type == nl.NLMSG_ERROR:
                    code = nl.error_code(msg)
                    if code == errno.ENOENT:
                        return None
                    if code:
                        raise OSError(code, f"nf_tables element get in {name}: {errno.errorcode.get(code, code)}")
                    return found
                found = next(iter(decode_counted(msg)), found)
        raise OSError(errno.EPROTO, f"nf_tables element get in {name}: no acknowledgement")
