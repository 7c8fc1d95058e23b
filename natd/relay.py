"""The WAN-side PCP sockets: requests out from the WAN address, responses and ANNOUNCEs in.

Only packets from a server natd has sent to, from its PCP port, are passed on
(RFC 6887 §8.3 step 1 and §14.1.3: check the source of responses and announcements).
A response that matches an outstanding request (same server, opcode and, for MAP,
nonce: RFC 6887 §8.3, §11.4) settles that request's waiter, so controld gets it in
the reply to its own request; anything else goes to ``on_packet`` (natd publishes it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable

from shared.const import ALL_HOSTS, PCP_CLIENT_PORT, PCP_SERVER_PORT

log = logging.getLogger("natd.relay")

MAX_SERVERS = 16  # PCP servers whose answers are accepted (RFC 7488 lists are short)
MAX_WAITING = 70_000  # outstanding requests: one per mapping or probe, bounded like controld's exchanges

# (server, opcode, nonce): what a response must repeat to answer a request (RFC 6887 §8.3, §11.4)
MatchKey = tuple[str, int, bytes]
Answer = tuple[bytes, "str | None"]  # the response as relayed to controld, and the LAN host it is for


def match_key(server: str, opcode: int, nonce: bytes | None) -> MatchKey:
    """The key a request is waited on and a response looked up by; ANNOUNCE has no nonce."""
    return (server, opcode, nonce or b"")


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
    address, so it hears both multicast and unicast announcements (RFC 6887 §14.1.1,
    §14.1.3); it is bound to the WAN interface (SO_BINDTODEVICE), so only packets that
    arrived on the WAN reach it: a LAN host cannot pose as the server with its source
    address (the source check below keeps other WAN senders out).
    """

    def __init__(self, on_packet: Callable[[str, bytes], None],
                 on_servers: Callable[[list[str]], None] | None = None, wan_if: str | None = None) -> None:
        self.on_packet = on_packet
        self.wan_if = wan_if
        self.on_servers = on_servers  # told when the trusted server list changes (fw4 input set)
        self.servers: dict[str, None] = {}  # ordered: oldest first (a bounded LRU)
        self.waiting: dict[MatchKey, asyncio.Future[Answer]] = {}
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
        usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._bind_to_wan(usock)  # answers count only when they arrived on the WAN (as for 5350)
            usock.bind((wan_ip, 0))
        except OSError:
            usock.close()
            raise
        self._unicast, _ = await loop.create_datagram_endpoint(lambda: _Proto(self), sock=usock)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._bind_to_wan(sock)
            sock.bind(("0.0.0.0", PCP_CLIENT_PORT))
            mreq = struct.pack("4s4s", socket.inet_aton(ALL_HOSTS), socket.inet_aton(wan_ip))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            self._announce, _ = await loop.create_datagram_endpoint(lambda: _Proto(self), sock=sock)
        except OSError as exc:
            log.warning("cannot listen for PCP ANNOUNCE on %s:%d: %s", ALL_HOSTS, PCP_CLIENT_PORT, exc)
        log.info("pcp relay bound to %s:%d", wan_ip, self._unicast.get_extra_info("sockname")[1])

    def _bind_to_wan(self, sock: socket.socket) -> None:
        """Receive only what arrived on the WAN interface (SO_BINDTODEVICE: no CAP_NET_RAW
        needed since Linux 5.7); without it the source check alone guards the socket."""
        if not self.wan_if:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.wan_if.encode())
        except OSError as exc:
            log.warning("cannot bind the PCP socket to %s (%s): LAN hosts could reach it", self.wan_if, exc)

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
        self._unicast.sendto(data, (server, PCP_SERVER_PORT))

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] not in self.servers or addr[1] != PCP_SERVER_PORT:
            log.debug("dropped PCP packet from unknown source %s:%d", *addr)
            return
        self.on_packet(addr[0], data)

    def expect(self, key: MatchKey) -> asyncio.Future[Answer]:
        """Wait for the response to a request about to be sent; a newer request for the same
        key takes over (the older waiter ends without an answer)."""
        old = self.waiting.pop(key, None)
        if old is not None and not old.done():
            old.cancel()
        while len(self.waiting) >= MAX_WAITING:  # bounded: the oldest waiter gives up
            oldest = self.waiting.pop(next(iter(self.waiting)))
            if not oldest.done():
                oldest.cancel()
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        return fut

    def forget(self, key: MatchKey, fut: asyncio.Future[Answer]) -> None:
        """The request's wait is over (answered or not)."""
        if self.waiting.get(key) is fut:
            del self.waiting[key]

    def settle(self, key: MatchKey, answer: Answer) -> bool:
        """Hand a response to the request waiting for it; False when none waits (unsolicited)."""
        fut = self.waiting.pop(key, None)
        if fut is None or fut.done():
            return False
        fut.set_result(answer)
        return True
