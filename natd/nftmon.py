"""Notice foreign changes to natd's nftables objects, as ``nft monitor`` does.

A netlink socket subscribed to NFNLGRP_NFTABLES receives every committed nftables
change in the namespace. :class:`MonitorParser` (sans-I/O: bytes in, verdicts out)
remembers whether a batch touched natd's table and, at the batch's closing NEWGEN
message, reports it unless natd itself made the change (NFTA_GEN_PROC_PID). natd
then verifies and, when needed, restores its objects: a ``nft flush ruleset`` or a
fw4 reload is repaired within the 2 s budget of issue #5 instead of the next
periodic check. A receive-buffer overflow (ENOBUFS) also counts as "something changed".
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("natd.nftmon")

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID = 1
NFTA_GEN_PROC_PID = 2
NLMSG_HDR = struct.Struct("=IHHII")
NLA_HDR = struct.Struct("=HH")
FAMILIES = {"ip": 2, "inet": 1, "ip6": 10}
RCVBUF = 8 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux value; Python 3.11 lacks the name
MAX_READS = 256  # datagrams drained per wake-up: bounded work per event-loop turn


@dataclass
class MonitorParser:
    """Feed raw netlink datagrams; ``feed`` returns True when a foreign batch touched our table.

    Socket and loop do not appear here; natd.nftmon.NftMonitor is the I/O edge.
    """

    family: int
    table: bytes
    own_pid: int = field(default_factory=os.getpid)
    _touched: bool = False
    own_generation: int | None = None  # the generation natd's own last commit made (its NEWGEN)

    def reset(self) -> None:
        """Forget a half-seen batch (after lost events)."""
        self._touched = False

    def feed(self, data: bytes) -> bool:
        """Parse one datagram (one or more netlink messages); True when natd must verify."""
        alarm = False
        off = 0
        while off + NLMSG_HDR.size <= len(data):
            length, mtype, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, off)
            if length < NLMSG_HDR.size or off + length > len(data):
                return True  # malformed: err on the safe side and verify
            start = off
            off += (length + 3) & ~3
            msg = mtype & 0xFF
            if mtype >> 8 != NFNL_SUBSYS_NFTABLES or length < NLMSG_HDR.size + 4:
                continue
            if self._touched and msg != NFT_MSG_NEWGEN:
                continue  # only the batch's closing NEWGEN matters now (a restore: 20k element messages)
            body = data[start + NLMSG_HDR.size: start + length]
            attrs = _attrs(body[4:])
            if msg == NFT_MSG_NEWGEN:
                pid = attrs.get(NFTA_GEN_PROC_PID)
                foreign = pid is None or struct.unpack(">I", pid[:4])[0] != self.own_pid
                if self._touched and foreign:
                    alarm = True
                gen = attrs.get(NFTA_GEN_ID)
                if not foreign and gen is not None and len(gen) >= 4:
                    self.own_generation = struct.unpack(">I", gen[:4])[0]
                self._touched = False
                continue
            # Attribute 1 is the table name in table, chain, rule, set and element messages;
            # family 0 (NFPROTO_UNSPEC) is a whole-ruleset operation.
            fam = body[0]
            name = attrs.get(1, b"").rstrip(b"\0")
            if fam == 0 or (fam == self.family and name == self.table):
                self._touched = True
        return alarm


def _attrs(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + NLA_HDR.size <= len(buf):
        alen, atype = NLA_HDR.unpack_from(buf, off)
        if alen < NLA_HDR.size:
            break
        out.setdefault(atype & 0x3FFF, buf[off + NLA_HDR.size: off + alen])
        off += (alen + 3) & ~3
    return out


NFT_MSG_GETGEN = 16


class Generation:
    """Reads the ruleset's generation id (it changes with every commit) in microseconds.

    The netlink socket stays open: closing a NETLINK_NETFILTER socket waits for an RCU
    grace period in the kernel (~15 ms measured after a commit), too slow per request.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def read(self, timeout: float = 1.0) -> int | None:
        """The current generation id, or None when it cannot be read."""
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                self._sock.bind((0, 0))
            self._sock.settimeout(timeout)
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            req = NLMSG_HDR.pack(NLMSG_HDR.size + 4, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, 1, self._seq, 0)
            self._sock.send(req + b"\0\0\0\0")
            for _ in range(8):  # bounded: skip answers to earlier, timed-out requests
                data = self._sock.recv(4096)
                if len(data) < NLMSG_HDR.size + 4:
                    return None
                length, mtype, _f, seq, _p = NLMSG_HDR.unpack_from(data)
                if seq != self._seq:
                    continue
                if mtype & 0xFF != NFT_MSG_NEWGEN:
                    return None
                gid = _attrs(data[NLMSG_HDR.size + 4:length]).get(NFTA_GEN_ID)
                return struct.unpack(">I", gid[:4])[0] if gid and len(gid) >= 4 else None
        except OSError:
            self.close()
        return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_GENERATION = Generation()


def generation(timeout: float = 1.0) -> int | None:
    """The ruleset's generation id through one long-lived socket; None if unreadable."""
    return _GENERATION.read(timeout)


class NftMonitor:
    """The socket edge of :class:`MonitorParser`; calls ``on_change`` (sync) on an alarm.

    ``on_overflow`` runs instead when events were lost (ENOBUFS: a big commit, often
    natd's own sync, overran the buffer); natd then compares generation ids rather
    than re-reading everything.
    """

    def __init__(self, family: str, table: str, on_change: Callable[[], None],
                 on_overflow: Callable[[], None] | None = None,
                 on_own_generation: Callable[[int], None] | None = None) -> None:
        self.parser = MonitorParser(FAMILIES[family], table.encode())
        self.on_change = on_change
        self.on_overflow = on_overflow or on_change
        self.on_own_generation = on_own_generation  # natd's own commits, as the kernel numbered them
        self.sock: socket.socket | None = None

    def start(self) -> None:
        """Open the netlink socket and register it with the running loop."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:  # root may exceed rmem_max: room for the events of a big commit
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, 0))
        sock.setsockopt(270, 1, NFNLGRP_NFTABLES)  # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP
        sock.setblocking(False)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self.sock is not None
        alarm = overflow = False
        for _ in range(MAX_READS):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: events were lost; the batch state is unknown
                log.debug("nft monitor: %s", exc)
                overflow = True
                self.parser.reset()
                continue
            alarm = self.parser.feed(data) or alarm
        own = self.parser.own_generation
        if own is not None and self.on_own_generation is not None:
            self.parser.own_generation = None
            self.on_own_generation(own)
        if alarm:
            self.on_change()
        elif overflow:
            self.on_overflow()

    def close(self) -> None:
        if self.sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            except RuntimeError:
                pass
            self.sock.close()
            self.sock = None
