"""Interface facts from rtnetlink: WAN address and gateway, LAN addresses.

``snapshot`` answers once; ``watch`` follows rtnetlink address, link and route
events and calls back with a fresh snapshot when something that matters changed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from natd.netlink import RT_GROUPS, RouteEvents
from shared.netif import if_addrs, read_addrs

RTMGRP_IPV6_IFADDR = 0x100  # the LAN's IPv6 prefixes decide which pinholes are allowed

log = logging.getLogger("natd.wan")


@dataclass(frozen=True)
class IfState:
    """What natd needs to know about its two interfaces."""

    wan_ip: str | None
    gateway: str | None
    lan_ips: tuple[str, ...]
    lan_subnets: tuple[str, ...]
    lan6_ips: tuple[str, ...] = ()  # the LAN's global IPv6 addresses (pinholes, docs/pinholes.md)
    lan6_prefixes: tuple[str, ...] = ()


async def snapshot(wan_if: str, lan_if: str) -> IfState:
    """Read the current WAN address/gateway and LAN addresses from the kernel."""
    w, lan = await if_addrs(wan_if), await if_addrs(lan_if)
    r6 = read_addrs(lan_if, socket.AF_INET6)
    v6 = [(a, n) for a, n in zip(r6.addresses, r6.subnets, strict=True)
          if not ipaddress.IPv6Address(a).is_link_local]
    return IfState(w.addresses[0] if w.addresses else None, w.gateway, lan.addresses, lan.subnets,
                   tuple(a for a, _ in v6), tuple(dict.fromkeys(n for _, n in v6)))


async def watch(wan_if: str, lan_if: str, on_change: Callable[[IfState], Awaitable[None]],
                initial: IfState) -> None:
    """Call ``on_change`` whenever the interface facts differ from the last ones seen."""
    last = initial
    while True:
        events = None
        try:
            events = RouteEvents(RT_GROUPS | RTMGRP_IPV6_IFADDR)
            while True:
                await events.wait()
                # A burst of netlink messages accompanies one change: settle first.
                await asyncio.sleep(0.05)
                now = await snapshot(wan_if, lan_if)
                if now != last:
                    last = now
                    await on_change(now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # netlink socket trouble (ENOBUFS after a flood): back off and reopen
            log.warning("netlink monitor failed (%s); reopening in 1 s", exc)
            await asyncio.sleep(1)
        finally:
            if events is not None:
                events.close()
