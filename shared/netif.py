"""Interface facts from rtnetlink (pyroute2), readable without privileges."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import AsyncIPRoute


@dataclass(frozen=True)
class IfAddrs:
    """An interface's IPv4 addresses, the subnets they sit in, and its default gateway."""

    addresses: tuple[str, ...]
    subnets: tuple[str, ...]
    gateway: str | None


async def if_addrs(ifname: str) -> IfAddrs:
    """Read ``ifname``'s IPv4 addresses and the default gateway through it (empty if absent)."""
    async with AsyncIPRoute() as ipr:
        index = None
        async for link in await ipr.link("dump"):
            if link.get("ifname") == ifname:
                index = link["index"]
        addrs: list[str] = []
        nets: list[str] = []
        gateway = None
        if index is None:
            return IfAddrs((), (), None)
        async for a in await ipr.addr("dump", family=socket.AF_INET):
            if a["index"] == index:
                addrs.append(a.get("address"))
                nets.append(str(ipaddress.ip_interface(f"{a.get('address')}/{a['prefixlen']}").network))
        async for r in await ipr.route("dump", family=socket.AF_INET):
            if r["dst_len"] == 0 and r.get("oif") == index and r.get("gateway"):
                gateway = r.get("gateway")
                break
    return IfAddrs(tuple(addrs), tuple(nets), gateway)
