"""The WAN-side PCP sockets: requests out from the WAN address, responses and ANNOUNCEs in.

Only packets from a server natd has sent to, from its PCP port, are passed on
(RFC 6887 §8.3 step 1 and §14.1.3: check the source of responses and announcements).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable

from shared import pcp

log = logging.getLogger("natd.relay")

MAX_SERVERS = 16  # PCP servers whose answers are accepted (RFC 7488 lists are short)


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, relay: PcpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._received(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("pcp socket error: %s", exc)


class PcpRelay:
    """One UDP socket bound to the WAN address, one on port 5350 for ANNOUNCE and mapping updates.

    The 5350 socket is bound to the wildcard address and joins 224.0.0.1 on the WAN
    address, so it hears both multicast and unicast announcements (RFC 6887 §14.1,
    rfc6887-pcp.md §8.8); the source check below keeps LAN senders out.
    """

    def __init__(self, on_packet: Callable[[str, bytes], None],
                 on_servers: Callable[[list[str]], None] | None = None) -> None:
        self.on_packet = on_packet
        self.on_servers = on_servers  # told when the trusted server list changes (fw4 input set)
        self.servers: dict[str, None] = {}  # ordered: oldest first (a bounded LRU)
        self.wan_ip: str | None = None
        self._unicast: asyncio.DatagramTransport | None = None
        self._announce: asyncio.DatagramTransport | None = None

    async def open(self, wan_ip: str | None) -> None:
        """(Re)bind to the WAN address; called at start and when the address changes."""
        self.close()
        self.wan_ip = wan_ip
        if wan_ip is None:
            return
        loop = asyncio.get_running_loop()
        self._unicast, _ = await loop.create_datagram_endpoint(lambda: _Proto(self), local_addr=(wan_ip, 0))
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("0.0.0.0", pcp.ANNOUNCE_PORT))
            mreq = struct.pack("4s4s", socket.inet_aton(pcp.ANNOUNCE_GROUP_V4), socket.inet_aton(wan_ip))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            self._announce, _ = await loop.create_datagram_endpoint(lambda: _Proto(self), sock=sock)
        except OSError as exc:
            log.warning("cannot listen for PCP ANNOUNCE on %s:%d: %s", pcp.ANNOUNCE_GROUP_V4, pcp.ANNOUNCE_PORT, exc)
        log.info("pcp relay bound to %s:%d", wan_ip, self._unicast.get_extra_info("sockname")[1])

    def close(self) -> None:
        for t in (self._unicast, self._announce):
            if t is not None:
                t.close()
        self._unicast = self._announce = None

    def send(self, server: str, data: bytes) -> None:
        """Send one PCP request to ``server``:5351 from the WAN address."""
        if self._unicast is None:
            raise OSError("no WAN address")
        before = set(self.servers)
        self.servers.pop(server, None)
        self.servers[server] = None
        while len(self.servers) > MAX_SERVERS:  # bounded; the oldest server stops being trusted
            del self.servers[next(iter(self.servers))]
        if self.on_servers is not None and set(self.servers) != before:
            self.on_servers(list(self.servers))
        self._unicast.sendto(data, (server, pcp.SERVER_PORT))

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] not in self.servers or addr[1] != pcp.SERVER_PORT:
            log.debug("dropped PCP packet from unknown source %s:%d", *addr)
            return
        self.on_packet(addr[0], data)
