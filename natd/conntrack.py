"""Forget the conntrack entries of deleted forwards (openwrt.md §4.5 item 5) and closed pinholes.

Deleting a DNAT map element does not end flows already set up through it: the
kernel keeps translating them from the conntrack entry. natd's DNAT and SNAT rules
mark the flows they translate (natd.nft.CT_MARK), so one kernel-filtered dump
(natd.ctnetlink.ct_dump) yields only the flows through forwards, never the router's
other traffic; those are matched precisely on both tuples, so that a new forward
that reuses the WAN port keeps its own flows, and deleted by original tuple:

- inbound (DNAT) flow:  original dst = WAN addr:WAN port, reply src = LAN addr:LAN port
- outbound (SNAT) flow: original src = LAN addr:LAN port, reply dst = WAN addr:WAN port

A closed IPv6 pinhole (docs/pinholes.md) ends its flows the same way: the pinhole rules set
the same mark, and an IPv6 entry goes when its original destination is the pinhole's LAN
address, protocol and port and, for a one-remote-host pinhole, its original source is that host.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

from natd import ctnetlink

# The conntrack mark bit natd's DNAT/SNAT rules OR into the flows they translate, so that
# this module asks the kernel for those flows only (other users' mark bits are kept).
CT_MARK = 0x00100000


@dataclass(frozen=True)
class Flow:
    """One forward's identity as conntrack sees it: proto, WAN endpoint, LAN endpoint."""

    proto: int
    wan_ip: str
    wan_port: int
    lan_ip: str
    lan_port: int


def matches(flows: Iterable[Flow]) -> tuple[set[tuple], set[tuple]]:
    """Lookup keys for inbound (DNAT) and outbound (SNAT) entries of ``flows``."""
    dnat, snat = set(), set()
    for f in flows:
        dnat.add((f.proto, f.wan_ip, f.wan_port, f.lan_ip, f.lan_port))
        snat.add((f.proto, f.lan_ip, f.lan_port, f.wan_ip, f.wan_port))
    return dnat, snat


def doomed(entries: Iterable[ctnetlink.CtEntry], flows: Iterable[Flow]) -> list[ctnetlink.CtEntry]:
    """The entries that belong to ``flows`` (pure: what :func:`forget` deletes)."""
    dnat, snat = matches(flows)
    out = []
    for e in entries:
        o, r = e.orig, e.reply
        if (o.proto, o.dst, o.dport, r.src, r.sport) in dnat or (o.proto, o.src, o.sport, r.dst, r.dport) in snat:
            out.append(e)
    return out


def forget(flows: Iterable[Flow]) -> int:
    """Delete every conntrack entry that belongs to ``flows``; returns how many went (blocking:
    the conntrack worker process runs it, natd/ctworker.py)."""
    flows = list(flows)
    if not flows:
        return 0
    gone = doomed(ctnetlink.ct_dump(CT_MARK, CT_MARK), flows)
    ctnetlink.ct_delete(gone)
    return len(gone)


# A pinhole as conntrack sees it: (LAN address, proto, LAN port, remote host or None), natd.nft.PinKey
PinFlow = tuple[str, int, int, str | None]


def doomed_pinholes(entries: Iterable[ctnetlink.CtEntry], keys: Iterable[PinFlow]) -> list[ctnetlink.CtEntry]:
    """The IPv6 entries admitted by the pinholes ``keys`` (pure: what :func:`forget_pinholes` deletes)."""
    want: dict[tuple[int, str, int], set[str | None]] = {}
    for lan, proto, port, remote in keys:
        want.setdefault((proto, lan, port), set()).add(remote)
    return [e for e in entries if {None, e.orig.src} & want.get((e.orig.proto, e.orig.dst, e.orig.dport), set())]


def forget_pinholes(keys: Iterable[PinFlow]) -> int:
    """Delete every conntrack entry that closed pinholes ``keys`` admitted; returns how many went
    (blocking, as :func:`forget`)."""
    keys = list(keys)
    if not keys:
        return 0
    gone = doomed_pinholes(ctnetlink.ct_dump(CT_MARK, CT_MARK, socket.AF_INET6), keys)
    ctnetlink.ct_delete(gone)
    return len(gone)
