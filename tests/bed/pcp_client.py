"""An independent PCP (RFC 6887) and NAT-PMP (RFC 6886) client for the tests.

Written from the RFC figures with struct, sharing no code with the product's codecs
(shared/pcp.py, shared/natpmp.py), so a test that uses it checks the server's bytes
against the RFCs rather than against our own reading twice. Self-contained: it imports
only the standard library.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

Addr = ipaddress.IPv4Address | ipaddress.IPv6Address

PCP_VERSION = 2
NATPMP_VERSION = 0
SERVER_PORT = 5351  # RFC 6887 §19.1, RFC 6886 §3
OP_ANNOUNCE, OP_MAP, OP_PEER = 0, 1, 2  # RFC 6887 §19.2
OPT_THIRD_PARTY, OPT_PREFER_FAILURE, OPT_FILTER, OPT_DESCRIPTION = 1, 2, 3, 128  # §19.4, RFC 7220


def addr16(addr: str | Addr) -> bytes:
    """RFC 6887 §5: 16 octets; IPv4 as ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


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
    return struct.pack("!BBHI", version, opcode & 0x7F, 0, lifetime) + addr16(client_ip)


def map_request(client_ip: str | Addr, nonce: bytes, protocol: int, internal_port: int, lifetime: int,
                suggested_port: int = 0, suggested_ip: str | Addr = "0.0.0.0", options: bytes = b"") -> bytes:
    """RFC 6887 §11.1 figure 9 after the common header."""
    body = nonce + struct.pack("!B3xHH", protocol, internal_port, suggested_port) + addr16(suggested_ip)
    return header(OP_MAP, lifetime, client_ip) + body + options


def peer_request(client_ip: str | Addr, nonce: bytes, protocol: int, internal_port: int, lifetime: int,
                 remote_ip: str | Addr, remote_port: int, suggested_port: int = 0,
                 suggested_ip: str | Addr = "0.0.0.0", options: bytes = b"") -> bytes:
    """RFC 6887 §12.1 figure 10 after the common header."""
    body = (nonce + struct.pack("!B3xHH", protocol, internal_port, suggested_port) + addr16(suggested_ip)
            + struct.pack("!HH", remote_port, 0) + addr16(remote_ip))
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


def exchange(server: str, payload: bytes, port: int = SERVER_PORT, timeout: float = 2.0,
             tries: int = 3) -> bytes | None:
    """Send ``payload`` over UDP and return the first answer from the server, or None.

    Bounded: ``tries`` sends, ``timeout`` seconds each (the RFCs' back-off is not needed
    on a test bed's loss-free links).
    """
    family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((server, port))
        for _ in range(tries):
            sock.send(payload)
            try:
                return sock.recv(2048)
            except TimeoutError:
                continue
    return None


def local_address(server: str, port: int = SERVER_PORT) -> str:
    """The source address the kernel picks toward ``server``: what the Client IP field holds (§8.1)."""
    family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((server, port))
        return str(sock.getsockname()[0])
