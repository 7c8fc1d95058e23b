"""controld/pcpserver/natpmp.py: the LAN NAT-PMP server (RFC 6886), through the version dispatch."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from controld.pcpserver import natpmp, pcp
from controld.pcpserver.events import (
    Address,
    AddressWanted,
    AnnounceWanted,
    DeleteWanted,
    Done,
    Drop,
    Granted,
    Handled,
    MapWanted,
    Outcome,
    Refused,
    Reply,
    Wanted,
)
from shared.pcp import Result
from tests.bed import pcp_client as c

SRC = ipaddress.IPv4Address("192.168.1.10")
EXT = ipaddress.IPv4Address("203.0.113.5")
EPOCH = 321


def handle(data: bytes, source: ipaddress.IPv4Address | ipaddress.IPv6Address = SRC) -> Handled:
    return pcp.handle_datagram(data, source, 5350, EPOCH)


def wanted(data: bytes) -> Wanted:
    """The wanted event ``data`` makes; fails on a drop or an immediate answer."""
    out = handle(data)
    assert not isinstance(out, Reply | Drop), out
    return out


def test_public_address_request_and_answer_rfc6886_3_2() -> None:
    event = wanted(c.natpmp_address_request())
    assert isinstance(event, AddressWanted) and event.requester.address == SRC
    assert event.requester.front_end == "natpmp" and event.requester.nonce is None
    out = pcp.respond(event, Address(EXT), EPOCH)
    assert out == struct.pack("!BBHI", 0, 128, 0, EPOCH) + EXT.packed
    assert c.parse_natpmp(out).address == EXT


@pytest.mark.parametrize(("outcome", "code"), [(Refused(Result.NETWORK_FAILURE), 3),
                                               (Refused(Result.NO_RESOURCES), 4), (Done(), 3)])
def test_public_address_failure_rfc6886_3_5(outcome: Outcome, code: int) -> None:
    event = wanted(c.natpmp_address_request())
    answer = c.parse_natpmp(natpmp.respond(event, outcome, EPOCH))
    assert (answer.result, answer.address, answer.epoch) == (code, ipaddress.IPv4Address(0), EPOCH)


@pytest.mark.parametrize(("opcode", "proto"), [(c.NATPMP_UDP, 17), (c.NATPMP_TCP, 6)])
def test_map_request_becomes_map_wanted_rfc6886_3_3(opcode: int, proto: int) -> None:
    event = wanted(c.natpmp_map_request(opcode, 5000, 6000, 7200))
    assert isinstance(event, MapWanted)
    assert event == MapWanted(event.requester, SRC, proto, 5000, 7200, 6000)
    answer = c.parse_natpmp(pcp.respond(event, Granted(EXT, 6001, 3600), EPOCH))
    assert (answer.opcode, answer.result, answer.epoch) == (128 + opcode, 0, EPOCH)
    assert (answer.internal_port, answer.external_port, answer.lifetime) == (5000, 6001, 3600)


def test_map_no_suggestion_rfc6886_3_3() -> None:
    event = wanted(c.natpmp_map_request(c.NATPMP_TCP, 80, 0, 60))
    assert isinstance(event, MapWanted) and event.suggested_port == 0


def test_delete_one_mapping_lifetime_0_rfc6886_3_4() -> None:
    event = wanted(c.natpmp_map_request(c.NATPMP_UDP, 5000, 6000, 0))
    assert isinstance(event, DeleteWanted)
    assert event == DeleteWanted(event.requester, SRC, 17, 5000)
    answer = c.parse_natpmp(pcp.respond(event, Done(), EPOCH))
    assert (answer.opcode, answer.result, answer.internal_port, answer.external_port, answer.lifetime) == \
        (129, 0, 5000, 0, 0)


def test_delete_all_of_hosts_mappings_internal_port_0_rfc6886_3_4() -> None:
    event = wanted(c.natpmp_map_request(c.NATPMP_TCP, 0, 0, 0))
    assert isinstance(event, DeleteWanted) and event.internal_port == 0 and event.protocol == 6


def test_map_port_0_with_lifetime_refused_rfc6886_3_3() -> None:
    out = handle(c.natpmp_map_request(c.NATPMP_TCP, 0, 0, 60))
    assert isinstance(out, Reply)
    answer = c.parse_natpmp(out.payload)
    assert (answer.opcode, answer.result, answer.epoch) == (130, 2, EPOCH)


@pytest.mark.parametrize(("result", "code"), [
    (Result.NOT_AUTHORIZED, 2), (Result.NETWORK_FAILURE, 3), (Result.NO_RESOURCES, 4),
    (Result.USER_EX_QUOTA, 4), (Result.CANNOT_PROVIDE_EXTERNAL, 2), (Result.UNSUPP_PROTOCOL, 2),
])
def test_refusal_result_codes_rfc6886_3_5(result: Result, code: int) -> None:
    event = wanted(c.natpmp_map_request(c.NATPMP_TCP, 80, 80, 60))
    answer = c.parse_natpmp(pcp.respond(event, Refused(result), EPOCH))
    # §3.5: internal port copied so the client can match; port and lifetime say nothing granted
    assert (answer.result, answer.internal_port, answer.external_port, answer.lifetime) == (code, 80, 0, 0)


def test_refused_delete_rfc6886_3_4() -> None:
    event = wanted(c.natpmp_map_request(c.NATPMP_TCP, 80, 0, 0))
    answer = c.parse_natpmp(pcp.respond(event, Refused(Result.NOT_AUTHORIZED), EPOCH))
    assert (answer.result, answer.internal_port) == (2, 80)


def test_unsupported_opcode_echoed_with_result_5_rfc6886_3_5() -> None:
    req = bytes([0, 3, 0, 0, 9, 9, 9, 9])
    out = handle(req)
    assert isinstance(out, Reply) and out.payload == bytes([0, 131, 0, 5, 9, 9, 9, 9])


@pytest.mark.parametrize("data", [b"\x00\x80", b"\x00\x81" + bytes(10), b"\x00\x01" + bytes(5),
                                  b"\x00\x00\x00\x00", b"\x00\x02" + bytes(14)],
                         ids=["response-op0", "response-op1", "short-map", "long-address", "long-map"])
def test_responses_and_off_layout_requests_dropped_rfc6886_3_5(data: bytes) -> None:
    assert isinstance(handle(data), Drop)


def test_ipv6_source_dropped_rfc6886_is_ipv4_only() -> None:
    assert isinstance(handle(c.natpmp_address_request(), ipaddress.IPv6Address("fd00::1")), Drop)


def test_unsupported_version_when_called_directly_rfc6886_3_5() -> None:
    out = natpmp.handle_datagram(b"\x02\x00", SRC, 1, EPOCH)
    assert isinstance(out, Reply) and out.payload == natpmp.unsupported_version(EPOCH)


def test_respond_refuses_what_nat_pmp_cannot_say() -> None:
    event = wanted(c.natpmp_map_request(c.NATPMP_TCP, 80, 80, 60))
    with pytest.raises(ValueError):
        natpmp.respond(event, Granted(ipaddress.IPv6Address("2001:db8::1"), 1, 1), EPOCH)
    with pytest.raises(ValueError):
        natpmp.respond(event, Done(), EPOCH)
    announce = pcp.handle_datagram(c.announce_request(SRC), SRC, 1, EPOCH)
    assert isinstance(announce, AnnounceWanted)
    with pytest.raises(ValueError):
        natpmp.respond(announce, Done(), EPOCH)


def test_huge_granted_lifetime_capped_to_32_bits() -> None:
    event = wanted(c.natpmp_map_request(c.NATPMP_TCP, 80, 80, 60))
    answer = c.parse_natpmp(pcp.respond(event, Granted(EXT, 80, 1 << 40), EPOCH))
    assert answer.lifetime == 0xFFFFFFFF
