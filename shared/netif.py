"""Interface facts from rtnetlink, readable without privileges, stdlib only (shared/netlink.py).

A dump of the addresses and routes is answered by the kernel at once from its own
tables (no wire I/O), so it is read directly; it takes well under a millisecond.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from shared import netlink as nl

RTM_GETADDR = 22
RTM_NEWADDR = 20
RTM_GETROUTE = 26
RTM_NEWROUTE = 24
IFA_ADDRESS = 1
IFA_LOCAL = 2  # our end of a point-to-point link (PPPoE WAN); IFA_ADDRESS is then the peer
RTA_OIF = 4
RTA_GATEWAY = 5
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
MAX_DUMP_MSGS = 100_000  # bound on one dump (a router has a handful of addresses and routes)
DUMP_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class IfAddrs:
    """An interface's IPv4 addresses, the subnets they sit in, and its default gateway."""

    addresses: tuple[str, ...]
    subnets: tuple[str, ...]
    gateway: str | None


def dump(mtype: int, payload: bytes) -> list[nl.Msg]:
    """One rtnetlink dump request and every message of its answer (NLMSG_DONE excluded)."""
    out: list[nl.Msg] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.settimeout(DUMP_TIMEOUT_S)
        s.send(nl.message(mtype, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, 1, payload))
        while len(out) < MAX_DUMP_MSGS:
            for m in nl.messages(s.recv(65536)):
                if m.type == nl.NLMSG_DONE:
                    return out
                if m.type == nl.NLMSG_ERROR:
                    raise OSError(nl.error_code(m), f"rtnetlink dump {mtype}")
                out.append(m)
    return out


def read_addrs(ifname: str, family: int = socket.AF_INET) -> IfAddrs:
    """``ifname``'s addresses of ``family`` and the default gateway through it (empty if absent)."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        return IfAddrs((), (), None)
    addrs: list[str] = []
    nets: list[str] = []
    for m in dump(RTM_GETADDR, _IFADDRMSG.pack(family, 0, 0, 0, 0)):
        fam, plen, _fl, _scope, idx = _IFADDRMSG.unpack_from(m.payload)
        at = nl.attrs(m.payload, _IFADDRMSG.size)
        raw = at.get(IFA_LOCAL) or at.get(IFA_ADDRESS)
        if m.type != RTM_NEWADDR or fam != family or idx != index or raw is None:
            continue
        ip = ipaddress.ip_address(raw)
        addrs.append(str(ip))
        nets.append(str(ipaddress.ip_interface(f"{ip}/{plen}").network))
    gateway = None
    for m in dump(RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
        fam, dst_len = _RTMSG.unpack_from(m.payload)[:2]
        at = nl.attrs(m.payload, _RTMSG.size)
        oif = struct.unpack("=I", at[RTA_OIF])[0] if len(at.get(RTA_OIF, b"")) == 4 else None
        if m.type == RTM_NEWROUTE and fam == family and dst_len == 0 and oif == index and RTA_GATEWAY in at:
            gateway = str(ipaddress.ip_address(at[RTA_GATEWAY]))
            break
    return IfAddrs(tuple(addrs), tuple(nets), gateway)


async def if_addrs(ifname: str) -> IfAddrs:
    """Read ``ifname``'s IPv4 addresses and the default gateway through it (empty if absent)."""
    return read_addrs(ifname)
