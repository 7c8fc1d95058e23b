"""controld/pcpserver/pcp.py: the LAN PCP server's checks and answers (RFC 6887).

Requests are built and answers read with the independent client tests/bed/pcp_client.py,
so these tests compare the server's bytes with the RFC figures, not with its own codec.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from controld.pcpserver import pcp
from controld.pcpserver.events import (
    AnnounceWanted,
    DeleteWanted,
    Done,
    Drop,
    Granted,
    Handled,
    MapWanted,
    PeerWanted,
    Refused,
    Reply,
    error_lifetime,
)
from controld.pcpserver.pcp import ServerPolicy
from shared.pcp import Filter, Result
from tests.bed import pcp_client as c

SRC = ipaddress.IPv4Address("192.168.1.10")
OTHER = ipaddress.IPv4Address("192.168.1.20")
MANAGER = ipaddress.IPv4Address("192.168.1.2")
EXT = ipaddress.IPv4Address("203.0.113.5")
PEER_IP = ipaddress.IPv4Address("198.51.100.9")
NONCE = bytes(range(1, 13))
EPOCH = 4242
TCP, UDP = 6, 17


DEFAULT = ServerPolicy()


def handle(data: bytes, source: ipaddress.IPv4Address | ipaddress.IPv6Address = SRC,
           policy: ServerPolicy = DEFAULT) -> Handled:
    return pcp.handle_datagram(data, source, 40000, EPOCH, policy)


def map_req(lifetime: int = 7200, protocol: int = TCP, iport: int = 8080, eport: int = 8080,
            eip: str = "0.0.0.0", options: bytes = b"", client: object = SRC) -> bytes:
    return c.map_request(str(client), NONCE, protocol, iport, lifetime, eport, eip, options)


def peer_req(lifetime: int = 600, protocol: int = UDP, iport: int = 5000, rip: str = str(PEER_IP),
             rport: int = 6000, options: bytes = b"") -> bytes:
    return c.peer_request(str(SRC), NONCE, protocol, iport, lifetime, rip, rport, options=options)


def error_of(data: bytes, source: ipaddress.IPv4Address = SRC, policy: ServerPolicy = DEFAULT) -> c.PcpAnswer:
    """The immediate error answer the server gives ``data``; fails if it is anything else."""
    out = handle(data, source, policy)
    assert isinstance(out, Reply), out
    answer = c.parse_pcp(out.payload)
    assert answer.result != 0 and answer.epoch == EPOCH and answer.version == 2
    return answer


# --- RFC 6887 §8.2 framing: what is dropped ------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"\x02"], ids=["empty", "one-octet"])
def test_shorter_than_two_octets_dropped_rfc6887_8_2(data: bytes) -> None:
    assert isinstance(handle(data), Drop)


def test_r_bit_set_dropped_rfc6887_8_2() -> None:
    data = bytearray(map_req())
    data[1] |= 0x80
    assert isinstance(handle(bytes(data)), Drop)


@pytest.mark.parametrize("length", [2, 4, 20, 23])
def test_version_2_shorter_than_header_dropped_rfc6887_8_2(length: int) -> None:
    assert isinstance(handle(map_req()[:length]), Drop)


# --- RFC 6887 §9: version negotiation ------------------------------------------------------

@pytest.mark.parametrize("version", [1, 3, 255])
def test_unknown_version_gets_unsupp_version_proposing_2_rfc6887_9(version: int) -> None:
    data = bytes([version]) + map_req()[1:]
    answer = error_of(data)
    assert answer.result == Result.UNSUPP_VERSION and answer.version == 2 and answer.opcode == 1
    assert answer.lifetime == 1800  # long error, RFC 6887 §7.4
    out = handle(data)
    assert isinstance(out, Reply) and len(out.payload) == 24


def test_unknown_version_short_request_still_gets_full_header_rfc6887_9() -> None:
    out = handle(b"\x01\x00")
    assert isinstance(out, Reply)
    assert c.parse_pcp(out.payload).result == Result.UNSUPP_VERSION


def test_nat_pmp_disabled_v0_gets_pcp_unsupp_version_rfc6887_9_appendix_a() -> None:
    out = handle(c.natpmp_address_request(), policy=ServerPolicy(natpmp=False))
    assert isinstance(out, Reply)
    # a NAT-PMP client reads octets 2-3 as its 16-bit result: 1 = Unsupported Version (RFC 6887 §9)
    assert out.payload[0] == 2 and struct.unpack("!H", out.payload[2:4])[0] == 1


def test_pcp_disabled_v2_gets_nat_pmp_unsupported_version_rfc6886_3_5() -> None:
    out = handle(map_req(), policy=ServerPolicy(pcp=False))
    assert isinstance(out, Reply)
    assert out.payload == b"\x00\x80\x00\x01" + struct.pack("!I", EPOCH)
    assert c.parse_natpmp(out.payload).result == 1


def test_version_0_goes_to_nat_pmp() -> None:
    out = handle(c.natpmp_map_request(c.NATPMP_TCP, 80, 80, 3600))
    assert isinstance(out, MapWanted) and out.requester.front_end == "natpmp"


# --- RFC 6887 §8.2: MALFORMED_REQUEST for length -----------------------------------------------

def test_over_1100_octets_malformed_and_answer_cut_rfc6887_8_2() -> None:
    data = map_req(options=c.description("x" * 1100))
    assert len(data) > 1100
    out = handle(data)
    assert isinstance(out, Reply) and len(out.payload) == 1100
    assert c.parse_pcp(out.payload).result == Result.MALFORMED_REQUEST


@pytest.mark.parametrize("extra", [1, 2, 3])
def test_not_multiple_of_4_malformed_rfc6887_8_2(extra: int) -> None:
    out = handle(map_req() + b"\x00" * extra)
    assert isinstance(out, Reply) and len(out.payload) % 4 == 0
    answer = c.parse_pcp(out.payload)
    assert answer.result == Result.MALFORMED_REQUEST
    assert answer.reserved == c.addr16(SRC)[4:]  # not parsed: the Client IP's last 96 bits (§7.2)


@pytest.mark.parametrize(("opcode", "length"), [(1, 24), (1, 56), (2, 24), (2, 76)])
def test_too_short_for_opcode_malformed_rfc6887_8_2(opcode: int, length: int) -> None:
    data = (map_req() if opcode == 1 else peer_req())[:length]
    assert error_of(data).result == Result.MALFORMED_REQUEST


# --- RFC 6887 §8.2 ADDRESS_MISMATCH ----------------------------------------------------------

def test_client_address_not_the_source_address_mismatch_rfc6887_8_2() -> None:
    answer = error_of(map_req(client=OTHER))
    assert answer.result == Result.ADDRESS_MISMATCH and answer.lifetime == 1800
    assert answer.nonce == NONCE and answer.external_port == 8080  # the request comes back (§8.2)


def test_client_field_must_be_ipv4_mapped_rfc6887_5() -> None:
    data = bytearray(map_req())
    data[8:24] = bytes(12) + SRC.packed  # IPv4-compatible form, not IPv4-mapped
    assert error_of(bytes(data)).result == Result.ADDRESS_MISMATCH


def test_ipv4_mapped_socket_source_is_the_ipv4_client() -> None:
    assert isinstance(handle(map_req(), ipaddress.IPv6Address(f"::ffff:{SRC}")), MapWanted)


# --- RFC 6887 §8.2: UNSUPP_OPCODE ------------------------------------------------------------

@pytest.mark.parametrize("opcode", [3, 4, 63, 96, 127])
def test_unknown_opcode_unsupp_opcode_copied_back_rfc6887_8_2(opcode: int) -> None:
    data = c.header(opcode, 0, SRC) + b"\xab" * 8
    out = handle(data)
    assert isinstance(out, Reply)
    answer = c.parse_pcp(out.payload)
    assert answer.result == Result.UNSUPP_OPCODE and answer.opcode == opcode
    assert out.payload[24:] == b"\xab" * 8


@pytest.mark.parametrize(("policy", "data"), [
    (ServerPolicy(map=False), map_req()),
    (ServerPolicy(peer=False), peer_req()),
])
def test_disabled_opcode_unsupp_opcode_rfc6887_8_2(policy: ServerPolicy, data: bytes) -> None:
    assert error_of(data, policy=policy).result == Result.UNSUPP_OPCODE


# --- RFC 6887 §7.3: options ---------------------------------------------------------------

@pytest.mark.parametrize("code", [0, 4, 13, 127])
def test_unknown_mandatory_option_unsupp_option_rfc6887_7_3(code: int) -> None:
    assert error_of(map_req(options=c.option(code, b"abcd"))).result == Result.UNSUPP_OPTION


def test_unknown_optional_option_ignored_and_not_echoed_rfc6887_7_3() -> None:
    event = handle(map_req(options=c.option(200, b"zz")))
    assert isinstance(event, MapWanted)
    answer = c.parse_pcp(pcp.respond(event, Granted(EXT, 8080, 3600), EPOCH))
    assert answer.options == ()


def test_option_running_past_the_end_malformed_option_rfc6887_7_3() -> None:
    data = map_req() + struct.pack("!BBH", 128, 0, 40)
    assert error_of(data).result == Result.MALFORMED_OPTION


@pytest.mark.parametrize("opt", [c.prefer_failure(), c.description("a")], ids=["PREFER_FAILURE", "DESCRIPTION"])
def test_single_option_repeated_malformed_option_rfc6887_7_3(opt: bytes) -> None:
    assert error_of(map_req(options=opt + opt)).result == Result.MALFORMED_OPTION


def test_prefer_failure_with_length_malformed_option_rfc6887_13_2() -> None:
    assert error_of(map_req(options=c.option(2, b"\x00\x00\x00\x00"))).result == Result.MALFORMED_OPTION


def test_prefer_failure_with_port_0_malformed_option_rfc6887_13_2() -> None:
    assert error_of(map_req(eport=0, options=c.prefer_failure())).result == Result.MALFORMED_OPTION


def test_prefer_failure_on_delete_malformed_option_rfc6887_11_3() -> None:
    assert error_of(map_req(lifetime=0, options=c.prefer_failure())).result == Result.MALFORMED_OPTION


def test_prefer_failure_in_peer_malformed_request_rfc6887_13_2() -> None:
    assert error_of(peer_req(options=c.prefer_failure())).result == Result.MALFORMED_REQUEST


def test_filter_wrong_length_malformed_option_rfc6887_13_3() -> None:
    assert error_of(map_req(options=c.option(3, bytes(16)))).result == Result.MALFORMED_OPTION


@pytest.mark.parametrize(("prefix", "peer"), [(95, "198.51.100.0"), (129, "2001:db8::")])
def test_filter_prefix_out_of_range_malformed_option_rfc6887_13_3(prefix: int, peer: str) -> None:
    assert error_of(map_req(options=c.filter_option(prefix, 0, peer))).result == Result.MALFORMED_OPTION


def test_filter_on_delete_malformed_option_rfc6887_13_3() -> None:
    data = map_req(lifetime=0, options=c.filter_option(120, 0, "198.51.100.0"))
    assert error_of(data).result == Result.MALFORMED_OPTION


def test_filter_in_peer_unsupp_option_rfc6887_7_3() -> None:
    assert error_of(peer_req(options=c.filter_option(128, 1, str(PEER_IP)))).result == Result.UNSUPP_OPTION


def test_filters_carried_in_order_and_echoed_rfc6887_13_3() -> None:
    opts = c.filter_option(0, 0, "0.0.0.0") + c.filter_option(120, 443, "198.51.100.0")
    event = handle(map_req(options=opts))
    assert isinstance(event, MapWanted)
    assert event.filters == (Filter(0, 0, ipaddress.IPv4Address(0)),
                             Filter(120, 443, ipaddress.IPv4Address("198.51.100.0")))
    answer = c.parse_pcp(pcp.respond(event, Granted(EXT, 8080, 3600), EPOCH))
    assert [code for code, _ in answer.options] == [3, 3]


# --- RFC 6887 §13.1: THIRD_PARTY ---------------------------------------------------------------

def test_third_party_from_ordinary_host_unsupp_option_rfc6887_13_1() -> None:
    answer = error_of(map_req(options=c.third_party(OTHER)))
    assert answer.result == Result.UNSUPP_OPTION and answer.reserved == bytes(12)


def test_third_party_from_manager_maps_the_named_host_rfc6887_13_1() -> None:
    policy = ServerPolicy(managers=frozenset({MANAGER}))
    event = handle(map_req(client=MANAGER, options=c.third_party(OTHER)), MANAGER, policy)
    assert isinstance(event, MapWanted) and event.internal_ip == OTHER and event.third_party
    assert event.requester.address == MANAGER
    answer = c.parse_pcp(pcp.respond(event, Granted(EXT, 8080, 3600), EPOCH))
    assert answer.options == ((1, c.addr16(OTHER)),)  # processed, so echoed (§13.1)


def test_third_party_naming_the_source_malformed_request_rfc6887_13_1() -> None:
    policy = ServerPolicy(managers=frozenset({MANAGER}))
    data = map_req(client=MANAGER, options=c.third_party(MANAGER))
    assert error_of(data, MANAGER, policy).result == Result.MALFORMED_REQUEST


def test_third_party_wrong_length_malformed_option_rfc6887_13_1() -> None:
    assert error_of(map_req(options=c.option(1, bytes(4)))).result == Result.MALFORMED_OPTION


def test_third_party_in_announce_unsupp_option_rfc6887_7_3() -> None:
    assert error_of(c.announce_request(SRC) + c.third_party(OTHER)).result == Result.UNSUPP_OPTION


# --- RFC 6887 §11: MAP ----------------------------------------------------------------------

def test_map_becomes_map_wanted_rfc6887_11_3() -> None:
    event = handle(map_req(options=c.prefer_failure() + c.description("game")))
    assert isinstance(event, MapWanted)
    assert event == MapWanted(event.requester, SRC, TCP, 8080, 7200, 8080, None, 4, True, (), "game", False,
                              event.raw)
    assert event.requester.nonce == NONCE and event.requester.front_end == "pcp"
    assert event.requester.port == 40000


def test_map_suggested_address_kept_rfc6887_11_1() -> None:
    event = handle(map_req(eip=str(EXT)))
    assert isinstance(event, MapWanted) and event.suggested_ip == EXT and event.family == 4


def test_map_ipv6_all_zeros_suggestion_asks_for_ipv6_family_erratum_3621() -> None:
    event = handle(map_req(eip="::"))
    assert isinstance(event, MapWanted) and event.suggested_ip is None and event.family == 6


def test_map_protocol_0_with_port_malformed_request_rfc6887_11_1() -> None:
    assert error_of(map_req(protocol=0, iport=80)).result == Result.MALFORMED_REQUEST


@pytest.mark.parametrize(("protocol", "iport"), [(0, 0), (TCP, 0), (132, 9), (46, 0)],
                         ids=["dmz", "all-ports", "sctp", "rsvp"])
def test_map_not_offered_unsupp_protocol_rfc6887_11_3(protocol: int, iport: int) -> None:
    answer = error_of(map_req(protocol=protocol, iport=iport))
    assert answer.result == Result.UNSUPP_PROTOCOL and answer.reserved == bytes(12)


def test_map_lifetime_0_is_delete_rfc6887_15_1() -> None:
    event = handle(map_req(lifetime=0, eport=0))
    assert isinstance(event, DeleteWanted)
    assert event == DeleteWanted(event.requester, SRC, TCP, 8080, 4, False, event.raw)


def test_map_delete_answer_copies_suggested_fields_erratum_3621() -> None:
    event = handle(map_req(lifetime=0, eport=1234, eip="::"))
    assert isinstance(event, DeleteWanted) and event.family == 6
    answer = c.parse_pcp(pcp.respond(event, Done(), EPOCH))
    assert (answer.result, answer.lifetime, answer.external_port) == (0, 0, 1234)
    assert answer.external_ip == ipaddress.IPv6Address("::")
    assert answer.nonce == NONCE and answer.internal_port == 8080 and answer.protocol == TCP


def test_map_granted_answer_layout_rfc6887_11_1() -> None:
    event = handle(map_req(options=c.prefer_failure() + c.description("game")))
    assert isinstance(event, MapWanted)
    out = pcp.respond(event, Granted(EXT, 8080, 3600), EPOCH)
    answer = c.parse_pcp(out)
    assert (answer.version, answer.opcode, answer.result, answer.lifetime, answer.epoch) == (2, 1, 0, 3600, EPOCH)
    assert answer.reserved == bytes(12)
    assert (answer.nonce, answer.protocol, answer.internal_port) == (NONCE, TCP, 8080)
    assert (answer.external_ip, answer.external_port) == (EXT, 8080)
    assert answer.options == ((2, b""), (128, b"game"))


def test_description_echoes_the_stored_value_rfc7220_4() -> None:
    event = handle(map_req(options=c.description("a long name")))
    assert isinstance(event, MapWanted)
    answer = c.parse_pcp(pcp.respond(event, Granted(EXT, 1, 60, description="a long"), EPOCH))
    assert answer.options == ((128, b"a long"),)


def test_description_echo_never_longer_than_the_request_rfc6887_8_2() -> None:
    data = map_req(options=c.description("d" * 900) + c.filter_option(128, 1, str(PEER_IP)) * 2)
    event = handle(data)
    assert isinstance(event, MapWanted)
    out = pcp.respond(event, Granted(EXT, 1, 60, description="e" * 1016), EPOCH)
    assert len(out) <= len(data) <= 1100
    assert dict(c.parse_pcp(out).options)[128] == b"d" * 900


def test_description_never_echoed_when_absent_or_invalid_rfc7220_4() -> None:
    for opts in (b"", c.option(128, b"\xff\xfe")):
        event = handle(map_req(options=opts))
        assert isinstance(event, MapWanted) and event.description is None
        answer = c.parse_pcp(pcp.respond(event, Granted(EXT, 1, 60, description="stored"), EPOCH))
        assert answer.options == ()


def test_empty_description_echoed_empty_rfc7220_4() -> None:
    event = handle(map_req(options=c.description("")))
    assert isinstance(event, MapWanted) and event.description == ""
    assert c.parse_pcp(pcp.respond(event, Granted(EXT, 1, 60), EPOCH)).options == ((128, b""),)


# --- Refusals from the core: the request copied back (RFC 6887 §8.2) -----------------------------

@pytest.mark.parametrize("result", [Result.NOT_AUTHORIZED, Result.NO_RESOURCES, Result.CANNOT_PROVIDE_EXTERNAL,
                                    Result.USER_EX_QUOTA, Result.NETWORK_FAILURE, Result.UNSUPP_PROTOCOL,
                                    Result.EXCESSIVE_REMOTE_PEERS])
def test_refusal_copies_request_with_class_lifetime_rfc6887_7_4(result: Result) -> None:
    data = map_req(eip=str(EXT), options=c.prefer_failure() + c.option(200, b"kept"))
    event = handle(data)
    assert isinstance(event, MapWanted)
    out = pcp.respond(event, Refused(result), EPOCH)
    assert len(out) == len(data) and out[24:] == data[24:]  # options too: the whole request (§8.2)
    answer = c.parse_pcp(out)
    assert answer.result == result and answer.reserved == bytes(12) and answer.opcode == 1
    expected = 30 if result in (Result.NETWORK_FAILURE, Result.NO_RESOURCES, Result.USER_EX_QUOTA,
                                Result.CANNOT_PROVIDE_EXTERNAL) else 1800
    assert answer.lifetime == expected == error_lifetime(result)


def test_nonce_mismatch_refusal_carries_remaining_lifetime_rfc6887_11_3() -> None:
    event = handle(map_req())
    assert isinstance(event, MapWanted)
    answer = c.parse_pcp(pcp.respond(event, Refused(Result.NOT_AUTHORIZED, lifetime=517), EPOCH))
    assert (answer.result, answer.lifetime) == (Result.NOT_AUTHORIZED, 517)


def test_refused_delete_copies_request_rfc6887_15_1() -> None:
    event = handle(map_req(lifetime=0, eport=0))
    assert isinstance(event, DeleteWanted)
    answer = c.parse_pcp(pcp.respond(event, Refused(Result.NOT_AUTHORIZED), EPOCH))
    assert answer.result == Result.NOT_AUTHORIZED and answer.lifetime == 1800


# --- RFC 6887 §12: PEER -----------------------------------------------------------------------

def test_peer_becomes_peer_wanted_rfc6887_12_3() -> None:
    event = handle(peer_req(options=c.description("call")))
    assert isinstance(event, PeerWanted)
    assert (event.protocol, event.internal_port, event.remote_ip, event.remote_port) == (UDP, 5000, PEER_IP, 6000)
    assert event.description == "call" and event.requester.nonce == NONCE


def test_peer_granted_answer_layout_rfc6887_12_1() -> None:
    event = handle(peer_req(options=c.description("call")))
    assert isinstance(event, PeerWanted)
    answer = c.parse_pcp(pcp.respond(event, Granted(EXT, 40123, 600), EPOCH))
    assert (answer.opcode, answer.result, answer.lifetime) == (2, 0, 600)
    assert (answer.external_ip, answer.external_port) == (EXT, 40123)
    assert (answer.remote_ip, answer.remote_port, answer.nonce) == (PEER_IP, 6000, NONCE)
    assert answer.options == ((128, b"call"),)


@pytest.mark.parametrize(("kw"), [{"protocol": 0}, {"iport": 0}, {"rport": 0}, {"rip": "0.0.0.0"},
                                   {"rip": "224.0.0.1"}, {"rip": "127.0.0.1"}])
def test_peer_invalid_fields_malformed_request_rfc6887_12_1(kw: dict) -> None:
    assert error_of(peer_req(**kw)).result == Result.MALFORMED_REQUEST


def test_peer_unsupported_protocol_unsupp_protocol_rfc6887_12_3() -> None:
    assert error_of(peer_req(protocol=132)).result == Result.UNSUPP_PROTOCOL


# --- RFC 6887 §14.1: ANNOUNCE -----------------------------------------------------------------

def test_announce_answered_success_lifetime_0_rfc6887_14_1() -> None:
    event = handle(c.announce_request(SRC))
    assert isinstance(event, AnnounceWanted) and event.requester.nonce is None
    out = pcp.respond(event, Done(), EPOCH)
    assert out == struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, EPOCH) + bytes(12)


def test_announce_with_lifetime_malformed_request_rfc6887_14_1() -> None:
    assert error_of(c.header(0, 5, SRC)).result == Result.MALFORMED_REQUEST


def test_announce_from_wrong_address_mismatch_rfc6887_14_1() -> None:
    assert error_of(c.announce_request(OTHER)).result == Result.ADDRESS_MISMATCH


def test_unsolicited_announce_layout_rfc6887_14_1_3() -> None:
    answer = c.parse_pcp(pcp.announcement(9))
    assert (answer.opcode, answer.result, answer.lifetime, answer.epoch) == (0, 0, 0, 9)


def test_huge_lifetimes_capped_to_32_bits_rfc6887_11_3() -> None:
    event = handle(map_req())
    assert isinstance(event, MapWanted)
    assert c.parse_pcp(pcp.respond(event, Granted(EXT, 1, 1 << 40), EPOCH)).lifetime == 0xFFFFFFFF
    assert c.parse_pcp(pcp.respond(event, Refused(Result.NOT_AUTHORIZED, 1 << 40), EPOCH)).lifetime == 0xFFFFFFFF


def test_respond_refuses_mismatched_outcome() -> None:
    event = handle(map_req())
    assert isinstance(event, MapWanted)
    with pytest.raises(ValueError):
        pcp.respond(event, Done(), EPOCH)
