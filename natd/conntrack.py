"""Forget the conntrack entries of deleted forwards (openwrt.md §4.5 item 5).

Deleting a DNAT map element does not end flows already set up through it: the
kernel keeps translating them from the conntrack entry. natd removes them over
ctnetlink (pyroute2), matched precisely on both tuples so that a new forward that
reuses the WAN port keeps its own flows:

- inbound (DNAT) flow:  original dst = WAN addr:WAN port, reply src = LAN addr:LAN port
- outbound (SNAT) flow: original src = LAN addr:LAN port, reply dst = WAN addr:WAN port
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import AsyncConntrack

log = logging.getLogger("natd.conntrack")

MAX_SCAN = 1_000_000  # bound on entries looked at in one pass (nf_conntrack_max is far lower)


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


async def forget(flows: Iterable[Flow]) -> int:
    """Delete every conntrack entry that belongs to ``flows``; returns how many went."""
    dnat, snat = matches(flows)
    if not dnat:
        return 0
    doomed = []
    async with AsyncConntrack() as ct:
        n = 0
        async for e in await ct.dump_entries():
            n += 1
            if n > MAX_SCAN:
                break
            o, r = e.tuple_orig, e.tuple_reply
            if o.family != socket.AF_INET or o.proto not in (6, 17):
                continue
            if (o.proto, o.daddr, o.dport, r.saddr, r.sport) in dnat or \
                    (o.proto, o.saddr, o.sport, r.daddr, r.dport) in snat:
                doomed.append(e)
        for e in doomed:
            try:
                await ct.delete(e)
            except Exception as exc:  # already gone (timed out meanwhile): nothing to do
                log.debug("conntrack delete %s: %s", e.tuple_orig, exc)
    return len(doomed)
