"""LAN-side PCP server logic (RFC 6887), with version dispatch to NAT-PMP (RFC 6886).

:func:`handle_datagram` checks one request datagram in the order of RFC 6887 §8.2 and
answers protocol faults at once; what needs the mapping core comes out as a wanted event
(``events``). :func:`respond` turns the core's outcome into the answer bytes. Pure: the
epoch value (``epoch.ServerEpoch``) is passed in.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from controld.pcpserver import natpmp
from controld.pcpserver.events import (
    AddressWanted,
    AnnounceWanted,
    DeleteWanted,
    Done,
    Drop,
    Granted,
    Handled,
    MapWanted,
    Outcome,
    PeerWanted,
    Refused,
    Reply,
    Requester,
    Wanted,
    error_lifetime,
)
from shared.const import PCP_MAX_PACKET, PROTOCOLS
from shared.pcp import (
    HEADER_SIZE,
    MAP_SIZE,
    MAX_LIFETIME,
    VERSION,
    IPAddress,
    MapData,
    Opcode,
    Options,
    PcpDecodeError,
    Request,
    Response,
    Result,
    decode_request,
    description_bytes,
    encode_response,
    pack_address,
    unpack_address,
)

PEER_SIZE = 56  # RFC 6887 §12.1
_PEER = struct.Struct("!12sB3xHH16sH2x16s")
_OPCODE_SIZE = {Opcode.ANNOUNCE: 0, Opcode.MAP: MAP_SIZE, Opcode.PEER: PEER_SIZE}


@dataclass(frozen=True)
class ServerPolicy:
    """What this server answers; each switch mirrors a miniupnpd option (docs/lan-pcp.md).

    ``managers`` are the hosts allowed THIRD_PARTY (RFC 6887 §13.1: forbidden by default
    on a CPE). ``protocols`` are those a MAP or PEER may create mappings for.
    """

    pcp: bool = True
    natpmp: bool = True
    map: bool = True
    peer: bool = True
    managers: frozenset[IPAddress] = frozenset()
    protocols: frozenset[int] = field(default_factory=lambda: frozenset(PROTOCOLS))

    def opcodes(self) -> frozenset[int]:
        """Opcodes served; the rest get UNSUPP_OPCODE (RFC 6887 §8.2: MAP and PEER can be disabled)."""
        on = {Opcode.ANNOUNCE}
        if self.map:
            on.add(Opcode.MAP)
        if self.peer:
            on.add(Opcode.PEER)
        return frozenset(on)


class _Fault(Exception):
    """An error answer decided while checking; ``parsed`` picks the Reserved field rule (§7.2)."""

    def __init__(self, result: Result, reason: str, parsed: bool = False) -> None:
        super().__init__(reason)
        self.result = result
        self.parsed = parsed


def plain(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 source (dual-stack socket) as the IPv4 address it is."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def error_response(request: bytes, result: int, lifetime: int, epoch: int, parsed: bool) -> bytes:
    """An error answer as RFC 6887 §8.2 builds it: the request copied (cut to 1100 octets,
    zero-padded to a multiple of 4), R set, result, lifetime and epoch written; Reserved
    zeroed if the request was parsed, else left holding the Client IP's last 96 bits."""
    out = bytearray(request[:PCP_MAX_PACKET])
    out.extend(b"\x00" * (-len(out) % 4))
    out.extend(b"\x00" * max(0, HEADER_SIZE - len(out)))
    out[0] = VERSION
    out[1] |= 0x80
    out[2] = 0
    out[3] = result
    struct.pack_into("!II", out, 4, lifetime, epoch)
    if parsed:
        out[12:24] = b"\x00" * 12
    return bytes(out)


def unsupported_version(request: bytes, epoch: int) -> bytes:
    """UNSUPP_VERSION proposing version 2 (RFC 6887 §9): we serve 0 and 2, so for any other
    version 2 is both the lowest above and the highest below. Only a 24-octet header
    comes back: the rest of an unknown version cannot be interpreted."""
    return error_response(request[:HEADER_SIZE], Result.UNSUPP_VERSION, error_lifetime(Result.UNSUPP_VERSION),
                          epoch, parsed=False)


def handle_datagram(data: bytes, source: IPAddress, source_port: int, epoch: int,
                    policy: ServerPolicy = ServerPolicy()) -> Handled:
    """Check one datagram sent to our server port by a LAN host (RFC 6887 §8.2, §9).

    Returns a wanted event for the core, a :class:`Reply` to send back at once, or a
    :class:`Drop`. Never raises on any input.
    """
    source = plain(source)
    if len(data) < 2:
        return Drop("shorter than 2 octets (RFC 6887 §8.2)")
    if data[1] & 0x80:
        return Drop("R bit set: a response, not a request (RFC 6887 §8.2, RFC 6886 §3.5)")
    if data[0] == natpmp.VERSION and source.version == 6:
        # no NAT-PMP client sends over IPv6 (RFC 6886 is IPv4 only): no answer, nothing reflected
        return Drop("NAT-PMP over IPv6 (RFC 6886 is IPv4 only)")
    if data[0] == natpmp.VERSION and policy.natpmp:
        return natpmp.handle_datagram(data, source, source_port, epoch)
    if not policy.pcp:  # a NAT-PMP-only server answers in its own format (RFC 6886 §3.5)
        return Reply(natpmp.unsupported_version(epoch), f"version {data[0]}, only NAT-PMP served")
    if data[0] != VERSION:
        return Reply(unsupported_version(data, epoch), f"version {data[0]} (RFC 6887 §9)")
    if len(data) < HEADER_SIZE:
        return Drop("PCP request shorter than 24 octets (RFC 6887 §8.2)")
    try:
        return _check(data, source, source_port, policy)
    except _Fault as fault:
        result = fault.result
        return Reply(error_response(data, result, error_lifetime(result), epoch, fault.parsed),
                     f"{result.name}: {fault}")


def _check(data: bytes, source: IPAddress, source_port: int, policy: ServerPolicy) -> Wanted:
    """The §8.2 checks after the version, then the opcode's own (§11.1, §12.1, §14.1)."""
    if len(data) > PCP_MAX_PACKET or len(data) % 4:
        raise _Fault(Result.MALFORMED_REQUEST, "length over 1100 or not a multiple of 4 (§8.2)")
    client_ip = unpack_address(data[8:24])
    if plain(client_ip) != source:
        raise _Fault(Result.ADDRESS_MISMATCH, f"client address {client_ip} is not the source {source} (§8.2)")
    opcode = data[1] & 0x7F
    if opcode not in policy.opcodes():
        raise _Fault(Result.UNSUPP_OPCODE, f"opcode {opcode} (§8.2)")
    if len(data) < HEADER_SIZE + _OPCODE_SIZE[Opcode(opcode)]:
        raise _Fault(Result.MALFORMED_REQUEST, "too short for its opcode (§8.2)")
    try:
        req = decode_request(data)
    except PcpDecodeError as exc:
        raise _Fault(exc.result, str(exc)) from None
    internal_ip = _internal_address(req, source, policy)
    nonce = data[24:36] if opcode != Opcode.ANNOUNCE else None
    who = Requester("pcp", source, source_port, nonce)
    if opcode == Opcode.ANNOUNCE:
        return AnnounceWanted(who, data)
    if opcode == Opcode.PEER:
        return _peer(data, req, who, internal_ip, policy)
    return _map(data, req, who, internal_ip, policy)


def _internal_address(req: Request, source: IPAddress, policy: ServerPolicy) -> IPAddress:
    """The mapping's internal address: THIRD_PARTY's when a manager sends one (§13.1)."""
    tp = req.options.third_party
    if tp is None:
        return source
    if source not in policy.managers:
        raise _Fault(Result.UNSUPP_OPTION, f"THIRD_PARTY from {source}, not a manager (§13.1)", parsed=True)
    if plain(tp) == source:
        raise _Fault(Result.MALFORMED_REQUEST, "THIRD_PARTY names the source itself (§13.1)", parsed=True)
    return plain(tp)


def _suggestion(raw_ip: IPAddress) -> tuple[IPAddress | None, int]:
    """Suggested external address (None: no preference) and the family it asks for (§11.1)."""
    ip = plain(raw_ip)
    return (None if ip.is_unspecified else ip), ip.version


def _map(data: bytes, req: Request, who: Requester, internal_ip: IPAddress, policy: ServerPolicy) -> Wanted:
    """MAP (RFC 6887 §11.3, §15.1); the framing and option rules are already checked."""
    m = req.map
    assert m is not None  # decode_request gives MAP data for a MAP opcode
    suggested_ip, family = _suggestion(m.external_ip)
    third = req.options.third_party is not None
    if req.lifetime == 0:
        return DeleteWanted(who, internal_ip, m.protocol, m.internal_port, family, third, data)
    if m.protocol not in policy.protocols or m.internal_port == 0:
        # all-ports and all-protocols (DMZ) mappings are not offered (§11.3)
        raise _Fault(Result.UNSUPP_PROTOCOL, f"protocol {m.protocol} port {m.internal_port}", parsed=True)
    opts = req.options
    return MapWanted(who, internal_ip, m.protocol, m.internal_port, req.lifetime, m.external_port,
                     suggested_ip, family, opts.prefer_failure, opts.filters, opts.description, third, data)


def _peer(data: bytes, req: Request, who: Requester, internal_ip: IPAddress, policy: ServerPolicy) -> Wanted:
    """PEER (RFC 6887 §12.1, §12.3)."""
    _, proto, iport, eport, eip, rport, rip = _PEER.unpack_from(data, HEADER_SIZE)
    remote = plain(unpack_address(rip))
    if proto == 0 or iport == 0 or rport == 0:
        raise _Fault(Result.MALFORMED_REQUEST, "PEER with protocol, internal or remote port 0 (§12.1)")
    if remote.is_unspecified or remote.is_multicast or remote.is_loopback:
        raise _Fault(Result.MALFORMED_REQUEST, f"PEER remote peer {remote} is not a host (§12.3)")
    if proto not in policy.protocols:
        raise _Fault(Result.UNSUPP_PROTOCOL, f"protocol {proto}", parsed=True)
    suggested_ip, family = _suggestion(unpack_address(eip))
    return PeerWanted(who, internal_ip, proto, iport, req.lifetime, remote, rport, eport, suggested_ip, family,
                      req.options.description, req.options.third_party is not None, data)


def _echoed(event: MapWanted | PeerWanted | DeleteWanted, described: str | None) -> Options:
    """The options a success answer carries: only those processed (RFC 6887 §7.3, RFC 7220 §4)."""
    tp = event.internal_ip if event.third_party else None
    if isinstance(event, DeleteWanted):
        return Options(third_party=tp)
    text = request_text = event.description
    if request_text is None:
        text = None  # RFC 7220 §4: never a DESCRIPTION the request lacked
    elif described is not None and len(described.encode("utf-8")) <= len(request_text.encode("utf-8")):
        # the stored value, cut by the core (RFC 7220 §4); never longer than what came in,
        # so the answer stays within the request's size and so within 1100 octets (§8.2)
        text = description_bytes(described).decode("utf-8")
    if isinstance(event, PeerWanted):
        return Options(third_party=tp, description=text)
    return Options(third_party=tp, prefer_failure=event.prefer_failure, filters=event.filters, description=text)


def _options_bytes(opts: Options) -> bytes:
    return encode_response(Response(0, 0, 0, 0, options=opts))[HEADER_SIZE:]


def respond(event: Wanted, outcome: Outcome, epoch: int) -> bytes:
    """The answer to a wanted event once the core has decided (RFC 6887 §8.2, RFC 6886 §3)."""
    if event.requester.front_end == "natpmp":
        return natpmp.respond(event, outcome, epoch)
    if isinstance(event, AddressWanted):
        raise ValueError("a PCP requester never asks for the NAT-PMP public address")
    raw = event.raw
    if isinstance(outcome, Refused):
        result = outcome.result
        lifetime = error_lifetime(result) if outcome.lifetime is None else outcome.lifetime
        return error_response(raw, result, min(lifetime, MAX_LIFETIME), epoch, parsed=True)
    if isinstance(event, AnnounceWanted):
        return announcement(epoch)
    nonce = event.requester.nonce or b"\x00" * 12
    if isinstance(event, DeleteWanted):
        lifetime = outcome.lifetime if isinstance(outcome, Done) else 0
        # erratum 3621: the suggested port and address are copied into the answer
        port, eip = struct.unpack_from("!H16s", raw, HEADER_SIZE + 18)
        m = MapData(nonce, event.protocol, event.internal_port, port, unpack_address(eip))
        return encode_response(Response(Opcode.MAP, Result.SUCCESS, lifetime, epoch, m, _echoed(event, None)))
    if not isinstance(outcome, Granted):
        raise ValueError(f"{type(outcome).__name__} does not answer {type(event).__name__}")
    opts = _echoed(event, outcome.description)
    granted = min(outcome.lifetime, MAX_LIFETIME)  # a static mapping's 2^32-1 (§11.3) at most
    if isinstance(event, MapWanted):
        m = MapData(nonce, event.protocol, event.internal_port, outcome.external_port, outcome.external_ip)
        return encode_response(Response(Opcode.MAP, Result.SUCCESS, granted, epoch, m, opts))
    head = encode_response(Response(Opcode.PEER, Result.SUCCESS, granted, epoch))
    peer = raw[HEADER_SIZE:HEADER_SIZE + PEER_SIZE]
    body = bytearray(peer)
    struct.pack_into("!H16s", body, 18, outcome.external_port, pack_address(outcome.external_ip))
    return head + bytes(body) + _options_bytes(opts)


def announcement(epoch: int) -> bytes:
    """An unsolicited ANNOUNCE answer (RFC 6887 §14.1.3): SUCCESS, lifetime 0, our epoch."""
    return encode_response(Response(Opcode.ANNOUNCE, Result.SUCCESS, 0, epoch))
