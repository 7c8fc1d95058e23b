"""Fuzzing the LAN server's datagram handling (hypothesis).

Every datagram, garbage or near-miss, must come out as a drop, an answer or a wanted event,
never an exception; and an independent oracle written here from RFC 6887 §7.3, §8.2,
§11.1, §12.1, §13 and RFC 6886 §3.5 says which: the server must give exactly the result
code the oracle names. Bounded by default; IGDPCP_FUZZ_EXAMPLES=100000 runs the long profile.
"""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controld.pcpserver import pcp
from controld.pcpserver.events import (
    AddressWanted,
    AnnounceWanted,
    DeleteWanted,
    Done,
    Drop,
    Granted,
    MapWanted,
    PeerWanted,
    Refused,
    Reply,
)
from controld.pcpserver.pcp import ServerPolicy
from shared.pcp import Result
from tests.bed import pcp_client as c

EXAMPLES = int(os.environ.get("IGDPCP_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# the long profile runs past pytest-timeout's default (100,000 cases: about 8 min on one core)
LONG = pytest.mark.timeout(max(300, EXAMPLES // 25))
SRC = ipaddress.IPv4Address("192.168.1.10")
EXT = ipaddress.IPv4Address("203.0.113.5")
EPOCH = 77
MANAGED = ServerPolicy(managers=frozenset({SRC}))

# --- generators: near-misses of valid requests ----------------------------------------------

addresses = st.sampled_from(["0.0.0.0", "192.168.1.10", "192.168.1.20", "198.51.100.9", "224.0.0.1",
                             "127.0.0.1", "::", "2001:db8::1"])
ports = st.one_of(st.sampled_from([0, 1, 80, 5351, 65535]), st.integers(0, 65535))
protocols = st.one_of(st.sampled_from([0, 6, 17, 132]), st.integers(0, 255))
lifetimes = st.one_of(st.sampled_from([0, 1, 7200, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))


@st.composite
def options(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["tp", "pf", "filter", "desc", "raw", "badlen"]))
    if kind == "tp":
        return c.third_party(draw(addresses))
    if kind == "pf":
        return c.prefer_failure()
    if kind == "filter":
        return c.filter_option(draw(st.integers(0, 255)), draw(ports), draw(addresses))
    if kind == "desc":
        return c.option(128, draw(st.binary(max_size=12)))
    body = draw(st.binary(max_size=24))
    code = draw(st.sampled_from([0, 1, 2, 3, 4, 13, 127, 128, 129, 200, 255]))
    raw = c.option(code, body)
    if kind == "badlen":  # the length field lies
        raw = raw[:2] + struct.pack("!H", draw(st.integers(0, 0xFFFF))) + raw[4:]
    return raw


@st.composite
def pcp_requests(draw: st.DrawFn) -> bytes:
    opcode = draw(st.sampled_from([0, 1, 2, 2, 1, 3, 127]))
    client = SRC if draw(st.integers(0, 9)) else draw(addresses)
    lifetime = 0 if opcode == 0 and draw(st.booleans()) else draw(lifetimes)
    if opcode == 1:
        data = c.map_request(str(client), draw(st.binary(min_size=12, max_size=12)), draw(protocols), draw(ports),
                             lifetime, draw(ports), draw(addresses))
    elif opcode == 2:
        data = c.peer_request(str(client), b"n" * 12, draw(protocols), draw(ports), lifetime, draw(addresses),
                              draw(ports), draw(ports), draw(addresses))
    else:
        data = c.header(opcode, lifetime, str(client))
    data += b"".join(draw(st.lists(options(), max_size=4)))
    buf = bytearray(data)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        if buf:
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0:
        del buf[draw(st.integers(0, len(buf))):]
    tail = draw(st.integers(0, 9))
    return bytes(buf) + (draw(st.binary(max_size=4)) if tail == 0 else b"\x80" * 1100 if tail == 1 else b"")


@st.composite
def natpmp_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(c.natpmp_map_request(draw(st.integers(0, 255)), draw(ports), draw(ports), draw(lifetimes)))
    return bytes(data[:draw(st.integers(0, 14))])


datagrams = st.one_of(st.binary(max_size=1200), pcp_requests(), pcp_requests(), pcp_requests(), natpmp_requests())

# --- the oracle ----------------------------------------------------------------------------

OPCODE_SIZE = {0: 0, 1: 36, 2: 56}
KNOWN = {0: {128}, 1: {1, 2, 3, 128}, 2: {1, 128}}  # §13, RFC 7220: options each opcode allows
LENGTH = {1: 16, 2: 0, 3: 20}
SINGLE = {1, 2, 128}


def _addr(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return c.from16(raw)


def _option_fault(data: bytes, opcode: int) -> tuple[int | None, dict[int, list[bytes]]]:
    """Walk the options in order (§7.3): the first fault, and what was seen."""
    seen: dict[int, list[bytes]] = {}
    off = 24 + OPCODE_SIZE[opcode]
    while off < len(data):
        if len(data) - off < 4:
            return Result.MALFORMED_OPTION, seen
        code, _, length = struct.unpack_from("!BBH", data, off)
        body = data[off + 4:off + 4 + length]
        if len(body) != length:
            return Result.MALFORMED_OPTION, seen
        off += 4 + length + (-length % 4)
        if code in SINGLE and code in seen:
            return Result.MALFORMED_OPTION, seen
        seen.setdefault(code, []).append(body)
        if opcode == 2 and code == 2:
            return Result.MALFORMED_REQUEST, seen  # §13.2
        if code in KNOWN[opcode]:
            if code in LENGTH and length != LENGTH[code]:
                return Result.MALFORMED_OPTION, seen
            if code == 3:
                prefix = body[1]
                if prefix > 128 or (prefix and _addr(body[4:20]).version == 4 and prefix < 96):
                    return Result.MALFORMED_OPTION, seen
        elif code < 128:
            return Result.UNSUPP_OPTION, seen
    return None, seen


def expected_pcp(data: bytes, policy: ServerPolicy) -> int | None | str:
    """'drop', a result code the server must answer at once, or None: a wanted event is due."""
    if len(data) < 24:
        return "drop"
    if len(data) > 1100 or len(data) % 4:
        return Result.MALFORMED_REQUEST
    if _addr(data[8:24]) != SRC:
        return Result.ADDRESS_MISMATCH
    opcode = data[1] & 0x7F
    if opcode not in OPCODE_SIZE:
        return Result.UNSUPP_OPCODE
    if len(data) < 24 + OPCODE_SIZE[opcode]:
        return Result.MALFORMED_REQUEST
    fault, seen = _option_fault(data, opcode)
    if fault is not None:
        return fault
    return _opcode_fault(data, opcode, seen, policy)


def _opcode_fault(data: bytes, opcode: int, seen: dict[int, list[bytes]], policy: ServerPolicy) -> int | None:
    """After the options: the opcode's own rules, THIRD_PARTY's authorisation, what we serve."""
    lifetime = struct.unpack_from("!I", data, 4)[0]
    proto, iport, eport = struct.unpack_from("!B3xHH", data, 36) if opcode else (0, 0, 0)
    if opcode == 1:
        if proto == 0 and iport:
            return Result.MALFORMED_REQUEST  # §11.1
        if 2 in seen and (lifetime == 0 or eport == 0):
            return Result.MALFORMED_OPTION  # §13.2, §11.3
        if 3 in seen and lifetime == 0:
            return Result.MALFORMED_OPTION  # §13.3
    if opcode == 0 and lifetime:
        return Result.MALFORMED_REQUEST  # §14.1.1
    if 1 in seen:
        if SRC not in policy.managers:
            return Result.UNSUPP_OPTION  # §13.1
        if _addr(seen[1][0]) == SRC:
            return Result.MALFORMED_REQUEST  # §13.1
    if opcode == 1 and lifetime and (proto not in (6, 17) or iport == 0):
        return Result.UNSUPP_PROTOCOL  # §11.3: no all-ports, DMZ or other protocols here
    if opcode == 2:
        rport = struct.unpack_from("!H", data, 60)[0]
        remote = _addr(data[64:80])
        if not proto or not iport or not rport or remote.is_unspecified or remote.is_multicast or remote.is_loopback:
            return Result.MALFORMED_REQUEST  # §12.1, §12.3
        if proto not in (6, 17):
            return Result.UNSUPP_PROTOCOL
    return None


def check_pcp_answer(payload: bytes, request: bytes) -> c.PcpAnswer:
    """Every PCP answer: parseable by the independent client, bounded, opcode echoed, our epoch."""
    assert len(payload) <= 1100 and len(payload) % 4 == 0
    answer = c.parse_pcp(payload)
    assert answer.epoch == EPOCH and answer.version == 2 and answer.opcode == request[1] & 0x7F
    return answer


def check_natpmp(data: bytes, out: object) -> None:
    op = data[1]
    if op == 0 and len(data) == 2:
        assert isinstance(out, AddressWanted)
    elif op in (1, 2) and len(data) == 12:
        lifetime = struct.unpack_from("!I", data, 8)[0]
        iport = struct.unpack_from("!H", data, 4)[0]
        if lifetime == 0:
            assert isinstance(out, DeleteWanted) and out.internal_port == iport
        elif iport == 0:
            assert isinstance(out, Reply) and c.parse_natpmp(out.payload).result == 2
        else:
            assert isinstance(out, MapWanted) and out.lifetime == lifetime
    elif op in (0, 1, 2):
        assert isinstance(out, Drop)
    else:
        assert isinstance(out, Reply) and out.payload[1] == op | 0x80 and out.payload[2:4] == b"\x00\x05"


def check_respond(event: object, data: bytes) -> None:
    """Any outcome the core may give makes a well-formed answer."""
    if not isinstance(event, MapWanted | DeleteWanted | PeerWanted | AnnounceWanted):
        return
    for outcome in (Granted(EXT, 40000, 3600, "d"), Refused(Result.NO_RESOURCES), Refused(Result.NOT_AUTHORIZED, 9),
                    Done()):
        if isinstance(outcome, Done) != isinstance(event, DeleteWanted | AnnounceWanted) and \
                not isinstance(outcome, Refused):
            continue
        out = pcp.respond(event, outcome, EPOCH)
        if event.requester.front_end == "pcp":
            answer = check_pcp_answer(out, data)
            assert answer.result == (outcome.result if isinstance(outcome, Refused) else 0)
        else:
            assert c.parse_natpmp(out).epoch == EPOCH


def run_one(data: bytes, policy: ServerPolicy) -> None:
    out = pcp.handle_datagram(data, SRC, 40000, EPOCH, policy)
    if len(data) < 2 or data[1] & 0x80:
        assert isinstance(out, Drop)
        return
    if data[0] == 0:
        check_natpmp(data, out)
        check_respond(out, data)
        return
    if data[0] != 2:
        assert isinstance(out, Reply) and len(out.payload) == 24
        assert c.parse_pcp(out.payload).result == Result.UNSUPP_VERSION
        return
    want = expected_pcp(data, policy)
    if want == "drop":
        assert isinstance(out, Drop)
    elif want is not None:
        assert isinstance(out, Reply), (want, out)
        assert check_pcp_answer(out.payload, data).result == want, (want, out)
    else:
        opcode = data[1] & 0x7F
        lifetime = struct.unpack_from("!I", data, 4)[0]
        kind = {0: AnnounceWanted, 1: MapWanted if lifetime else DeleteWanted, 2: PeerWanted}[opcode]
        assert isinstance(out, kind), (kind, out)
        check_respond(out, data)


@LONG
@FUZZ
@given(datagrams, st.booleans())
def test_fuzz_every_datagram_dropped_answered_or_wanted_as_the_rfcs_say(data: bytes, managed: bool) -> None:
    run_one(data, MANAGED if managed else ServerPolicy())


def test_oracle_agrees_on_known_cases() -> None:
    """The oracle itself names the right codes for hand-made cases, so it can catch a server bug."""
    ok = c.map_request(str(SRC), b"n" * 12, 6, 80, 60, 80)
    assert expected_pcp(ok, ServerPolicy()) is None
    assert expected_pcp(ok + c.option(4), ServerPolicy()) == Result.UNSUPP_OPTION
    assert expected_pcp(ok + c.third_party("10.0.0.1"), ServerPolicy()) == Result.UNSUPP_OPTION
    assert expected_pcp(ok + c.third_party("10.0.0.1"), MANAGED) is None
    assert expected_pcp(ok[:-4], ServerPolicy()) == Result.MALFORMED_REQUEST
    assert expected_pcp(ok + b"\x80\x00\x00\x09", ServerPolicy()) == Result.MALFORMED_OPTION
