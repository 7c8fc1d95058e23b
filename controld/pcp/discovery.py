"""Which PCP server to ask (RFC 6887 §8.1, RFC 7291, RFC 7488;, docs/requirements.md IWF-10).

Order: the configured address (``--pcp-server``), else the first server a DHCP client
hook wrote to the server file (DHCPv4 option 158, see packaging/hooks/), else the WAN
default router. Pure functions plus one small cached file reader; no sockets.

Server file format (written by ``packaging/hooks/udhcpc-pcp-server``): one server per
line, its addresses separated by blanks; ``#`` starts a comment. Multicast, loopback,
unspecified and unparsable addresses are discarded (RFC 7291 §4, MUST).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("controld.pcp")

MAX_FILE = 4096  # a DHCP option holds at most a few hundred octets; refuse anything larger


def usable(addr: str) -> str | None:
    """``addr`` as a normalised IPv4 address if a PCP server may have it, else None."""
    try:
        a = ipaddress.ip_address(addr.strip())
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped  # DHCPv6 option 86 carries IPv4 servers IPv4-mapped (RFC 7291 §3)
    if a.version != 4 or a.is_multicast or a.is_loopback or a.is_unspecified:
        return None  # the WAN side is IPv4 only here; RFC 7291 §4 discards the rest
    return str(a)


def parse_server_file(text: str) -> list[list[str]]:
    """Servers (each a list of its usable addresses, in order) from the server file's text."""
    servers: list[list[str]] = []
    for line in text.splitlines()[:64]:
        addrs = [a for a in (usable(w) for w in line.split("#", 1)[0].replace(",", " ").split()) if a]
        if addrs:
            servers.append(addrs)
    return servers


@dataclass
class ServerFile:
    """The DHCP-provided server file, re-read only when it changes (mtime and size)."""

    path: str | None
    _stamp: tuple[int, int] | None = None
    _servers: tuple[tuple[str, ...], ...] = ()

    def servers(self) -> list[list[str]]:
        """The servers the file names now (empty when it is missing or unreadable)."""
        if not self.path:
            return []
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._servers = None, ()
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                with open(self.path, encoding="ascii", errors="replace") as f:
                    text = f.read(MAX_FILE)
            except OSError as exc:
                log.warning("cannot read PCP server file %s: %s", self.path, exc)
                text = ""
            self._servers = tuple(tuple(s) for s in parse_server_file(text))
            log.info("PCP server file %s names %s", self.path,
                     "; ".join(" ".join(s) for s in self._servers) or "no server")
        return [list(s) for s in self._servers]


def choose_server(configured: str | None, dhcp: list[list[str]], gateway: str | None) -> tuple[str | None, str]:
    """(address, where it came from): configured, else DHCP's first server, else the default router."""
    if configured:
        return configured, "configured"
    if dhcp:
        return dhcp[0][0], "dhcp"
    if gateway:
        return gateway, "default-router"
    return None, "none"
