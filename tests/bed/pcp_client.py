"""An independent PCP (RFC 6887) and NAT-PMP (RFC 6886) client for the tests.

Written from the RFC figures with struct, sharing no code with the product's codecs
(shared/pcp.py, shared/natpmp.py), so a test that uses it checks the server's bytes
against the RFCs rather than against our own reading twice. Self-contained: it imports
only the standard library, so it also runs as a script inside a test namespace
(``python pcp_client.py ask|hear ...``, see :func:`main`), over IPv4 or IPv6 (a link-local
server or source is written with its scope, ``fe80::1%eth0``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

Addr = ipaddress.IPv4Address | ipaddress.IPv6Address

PCP_VERSION = 2
NATPMP_VERSION = 0
SERVER_PORT = 5351  # RFC 6887 §19.1, RFC 6886 §3
CLIENT_PORT = 5350  # announcements, RFC 6887 §14.1.3
ALL_NODES = {4: "224.0.0.1", 6: "ff02::1"}  # where announcements go (RFC 6887 §14.1.3)
OP_ANNOUNCE, OP_MAP, OP_PEER = 0, 1, 2  # RFC 6887 §19.2
OPT_THIRD_PARTY, OPT_PREFER_FAILURE, OPT_FILTER, OPT_DESCRIPTION = 1, 2, 3, 128  # §19.4, RFC 7220


def addr16(addr: str | Addr) -> bytes:
    """RFC 6887 §5: 16 octets; IPv4 as ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def any16(family_of: str | Addr) -> bytes:
    """The all-zeros address of ``family_of``'s family: "no preference" (RFC 6887 §5, erratum 3621)."""
    return addr16("0.0.0.0" if _ip(family_of).version == 4 else "::")


def _ip(addr: str | Addr) -> Addr:
    """An address, a link-local one possibly with its %scope."""
    return ipaddress.ip_address(str(addr).split("%", 1)[0])


def from16(raw: bytes) -> Addr:
    """Inverse of :func:`addr16`, checking all 96 prefix bits (RFC 6887 §5)."""
    if raw[:12] == b"\x00" * 10 + b"\xff\xff":
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


def option(code: int, data: bytes = b"") -> bytes:
    """RFC 6887 §7.3 figure 4: code, reserved, length, data padded to a multiple of 4."""
    return struct.pack("!BBH", code, 0, len(data)) + data + b"\x00" * (-len(data) % 4)


def third_party(addr: str | Addr) -> bytes:
    """RFC 6887 §13.1 figure 13."""
    return option(OPT_THIRD_PARTY, addr16(addr))


def prefer_failure() -> bytes:
    """RFC 6887 §13.2 figure 14."""
    return option(OPT_PREFER_FAILURE)


def filter_option(prefix_len: int, peer_port: int, peer_ip: str | Addr) -> bytes:
    """RFC 6887 §13.3 figure 15: reserved, prefix length, remote peer port, remote peer address."""
    return option(OPT_FILTER, struct.pack("!BBH", 0, prefix_len, peer_port) + addr16(peer_ip))


def description(text: str) -> bytes:
    """RFC 7220 §3 figure 1."""
    return option(OPT_DESCRIPTION, text.encode("utf-8"))


def header(opcode: int, lifetime: int, client_ip: str | Addr, version: int = PCP_VERSION) -> bytes:
    """RFC 6887 §7.1 figure 2: version, R=0 + opcode, reserved 16, lifetime, client address."""
    return struct.pack("!BBHI", version, opcode & 0x7F, 0, lifetime) + addr16(_ip(client_ip))


def _suggested(suggested_ip: str | Addr | None, client_ip: str | Addr) -> bytes:
    # no suggestion: the all-zeros address of the client's own family (an IPv6 client wants an
    # IPv6 pinhole, an IPv4 one an IPv4 mapping)
    return any16(client_ip) if suggested_ip is None else addr16(suggested_ip)


def map_request(client_ip: str | Addr, nonce: bytes, protocol: int, internal_port: int, lifetime: int,
                suggested_port: int = 0, suggested_ip: str | Addr | None = None, options: bytes = b"") -> bytes:
    """RFC 6887 §11.1 figure 9 after the common header."""
    body = (nonce + struct.pack("!B3xHH", protocol, internal_port, suggested_port)
            + _suggested(suggested_ip, client_ip))
    return header(OP_MAP, lifetime, client_ip) + body + options


def peer_request(client_ip: str | Addr, nonce: bytes, protocol: int, internal_port: int, lifetime: int,
                 remote_ip: str | Addr, remote_port: int, suggested_port: int = 0,
                 suggested_ip: str | Addr | None = None, options: bytes = b"") -> bytes:
    """RFC 6887 §12.1 figure 10 after the common header."""
    body = (nonce + struct.pack("!B3xHH", protocol, internal_port, suggested_port)
            + _suggested(suggested_ip, client_ip) + struct.pack("!HH", remote_port, 0) + addr16(remote_ip))
    return header(OP_PEER, lifetime, client_ip) + body + options


def announce_request(client_ip: str | Addr) -> bytes:
    """RFC 6887 §14.1.1: the header alone, lifetime 0."""
    return header(OP_ANNOUNCE, 0, client_ip)


def new_nonce() -> bytes:
    """12 random octets (RFC 6887 §11.2)."""
    return os.urandom(12)


@dataclass(frozen=True)
class PcpAnswer:
    """A PCP response as RFC 6887 §7.2 figure 3 lays it out, plus MAP/PEER data and options."""

    version: int
    opcode: int
    result: int
    lifetime: int
    epoch: int
    reserved: bytes
    nonce: bytes = b""
    protocol: int = 0
    internal_port: int = 0
    external_port: int = 0
    external_ip: Addr | None = None
    remote_port: int = 0
    remote_ip: Addr | None = None
    options: tuple[tuple[int, bytes], ...] = field(default=())
    rest: bytes = b""  # what follows the opcode data, as sent


def parse_pcp(data: bytes) -> PcpAnswer:
    """Parse a response strictly (RFC 6887 §8.3); raises ValueError on anything off-layout."""
    if len(data) < 24 or len(data) % 4 or len(data) > 1100:
        raise ValueError(f"PCP response of {len(data)} octets")
    version, rop, reserved8, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if not rop & 0x80 or reserved8:
        raise ValueError("R bit clear or reserved octet set")
    opcode = rop & 0x7F
    fields: dict = {}
    off = 24
    size = {OP_MAP: 36, OP_PEER: 56}.get(opcode, 0)
    if size and len(data) >= 24 + size:
        nonce, proto, iport, eport = struct.unpack_from("!12sB3xHH", data, 24)
        fields = dict(nonce=nonce, protocol=proto, internal_port=iport, external_port=eport,
                      external_ip=from16(data[44:60]))
        off = 60
        if opcode == OP_PEER:
            rport, = struct.unpack_from("!H", data, 60)
            fields.update(remote_port=rport, remote_ip=from16(data[64:80]))
            off = 80
    opts = []
    # an error answer is the request copied back, possibly cut at 1100 octets (RFC 6887 §8.2):
    # its options are the client's own, so only a success answer's are read
    while result == 0 and off < len(data):
        code, _, length = struct.unpack_from("!BBH", data, off)
        if off + 4 + length > len(data):
            raise ValueError(f"option {code} runs past the end")
        opts.append((code, data[off + 4:off + 4 + length]))
        off += 4 + length + (-length % 4)
    return PcpAnswer(version, opcode, result, lifetime, epoch, data[12:24], options=tuple(opts),
                     rest=data[24 + size if fields else 24:], **fields)


# NAT-PMP, RFC 6886 §3.2 and §3.3
NATPMP_UDP, NATPMP_TCP = 1, 2


def natpmp_address_request() -> bytes:
    """RFC 6886 §3.2: version 0, opcode 0."""
    return struct.pack("!BB", NATPMP_VERSION, 0)


def natpmp_map_request(opcode: int, internal_port: int, suggested_port: int, lifetime: int) -> bytes:
    """RFC 6886 §3.3: version, opcode (1 UDP, 2 TCP), reserved 16, internal port, suggested port, lifetime."""
    return struct.pack("!BBHHHI", NATPMP_VERSION, opcode, 0, internal_port, suggested_port, lifetime)


@dataclass(frozen=True)
class NatPmpAnswer:
    """A NAT-PMP response: RFC 6886 §3.2 (address), §3.3 (map) or §3.5 (8-octet error)."""

    opcode: int
    result: int
    epoch: int
    address: ipaddress.IPv4Address | None = None
    internal_port: int = 0
    external_port: int = 0
    lifetime: int = 0


def parse_natpmp(data: bytes) -> NatPmpAnswer:
    """Parse a NAT-PMP response strictly; raises ValueError off-layout."""
    if len(data) < 8 or data[0] != NATPMP_VERSION:
        raise ValueError(f"not a NAT-PMP response: {data[:4].hex()}")
    _, op, result, epoch = struct.unpack_from("!BBHI", data)
    if len(data) == 8:
        return NatPmpAnswer(op, result, epoch)
    if op == 128 and len(data) == 12:
        return NatPmpAnswer(op, result, epoch, address=ipaddress.IPv4Address(data[8:12]))
    if op in (129, 130) and len(data) == 16:
        iport, eport, lifetime = struct.unpack_from("!HHI", data, 8)
        return NatPmpAnswer(op, result, epoch, internal_port=iport, external_port=eport, lifetime=lifetime)
    raise ValueError(f"NAT-PMP response opcode {op} of {len(data)} octets")


def _family(addr: str | Addr) -> int:
    return socket.AF_INET6 if _ip(addr).version == 6 else socket.AF_INET


def _sockaddr(host: str, port: int) -> tuple:
    """A socket address; a link-local IPv6 one with its %scope as the scope id."""
    return socket.getaddrinfo(host, port, _family(host), socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)[0][4]


def exchange(server: str, payload: bytes, port: int = SERVER_PORT, timeout: float = 2.0,
             tries: int = 3, source: str | None = None) -> bytes | None:
    """Send ``payload`` over UDP and return the first answer from the server, or None.

    The socket is connected, so only an answer from the address asked is read (RFC 6887
    §8.3); ``source`` binds it to one of our addresses. Bounded: ``tries`` sends,
    ``timeout`` seconds each (the RFCs' back-off is not needed on a test bed's loss-free links).
    """
    with socket.socket(_family(server), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        if source:
            sock.bind(_sockaddr(source, 0))
        sock.connect(_sockaddr(server, port))
        for _ in range(tries):
            sock.send(payload)
            try:
                return sock.recv(2048)
            except TimeoutError:
                continue
    return None


def local_address(server: str, port: int = SERVER_PORT) -> str:
    """The source address the kernel picks toward ``server``: what the Client IP field holds (§8.1)."""
    with socket.socket(_family(server), socket.SOCK_DGRAM) as sock:
        sock.connect(_sockaddr(server, port))
        return str(sock.getsockname()[0])


def hear(family: int, timeout: float, port: int = CLIENT_PORT) -> Iterator[tuple[str, bytes]]:
    """Announcements to the all-nodes group of IP ``family`` (4 or 6) as ("SOURCE PORT",
    datagram), for at most ``timeout`` seconds (RFC 6887 §14.1.3: clients listen on 224.0.0.1
    and ff02::1, port 5350). The socket is bound when this returns."""
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    sock = socket.socket(af, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == 6:  # every IPv6 interface is in ff02::1 already (RFC 4291 §2.7.1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::", port))
    else:
        sock.bind(("0.0.0.0", port))
        group = struct.pack("4s4s", socket.inet_aton(ALL_NODES[4]), socket.inet_aton("0.0.0.0"))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
    return _received(sock, time.monotonic() + timeout)


def _received(sock: socket.socket, end: float) -> Iterator[tuple[str, bytes]]:
    with sock:
        while (left := end - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                data, peer = sock.recvfrom(2048)
                yield f"{peer[0]} {peer[1]}", data


def main(argv: Sequence[str] | None = None) -> int:
    """Run inside a namespace: ``ask SERVER HEX [--source S]`` prints the answer's hex (nothing if
    none came); ``hear 4|6 TIMEOUT`` prints "ready", then "SOURCE PORT HEX" for the first PCP
    ANNOUNCE answer heard (RFC 6887 §14.1.3) and exits; exit 1 when none came."""
    ap = argparse.ArgumentParser(prog="pcp_client")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ask = sub.add_parser("ask")
    ask.add_argument("server")
    ask.add_argument("payload")
    ask.add_argument("--source")
    ask.add_argument("--timeout", type=float, default=2.0)
    listen = sub.add_parser("hear")
    listen.add_argument("family", type=int, choices=(4, 6))
    listen.add_argument("timeout", type=float)
    args = ap.parse_args(argv)
    if args.cmd == "ask":
        answer = exchange(args.server, bytes.fromhex(args.payload), timeout=args.timeout, source=args.source)
        print(answer.hex() if answer else "", flush=True)
        return 0
    heard = hear(args.family, args.timeout)
    print("ready", flush=True)
    for src, data in heard:
        if len(data) >= 24 and data[0] == PCP_VERSION and data[1] == 0x80 | OP_ANNOUNCE:
            print(f"{src} {data.hex()}", flush=True)
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
