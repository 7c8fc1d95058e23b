"""shared/natpmp.py: the NAT-PMP codec against the byte layouts of RFC 6886 §3."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import natpmp
from shared.natpmp import Fault, NatPmpDecodeError, Opcode, Result

# A bounded slice by default; IGDPCP_FUZZ_EXAMPLES=100000 (or more) for the long run.
EXAMPLES = int(os.environ.get("IGDPCP_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None)
LONG = pytest.mark.timeout(max(300, EXAMPLES // 25))  # the long profile outlasts the default timeout
ADDR = ipaddress.IPv4Address("203.0.113.7")


def test_public_address_request_is_two_octets_rfc6886_3_2() -> None:
    assert natpmp.encode_request(natpmp.PublicAddressRequest()) == b"\x00\x00"
    assert natpmp.decode_request(b"\x00\x00") == natpmp.PublicAddressRequest()


@pytest.mark.parametrize(("opcode", "proto"), [(1, 17), (2, 6)])
def test_map_request_layout_rfc6886_3_3(opcode: int, proto: int) -> None:
    raw = struct.pack("!BBHHHI", 0, opcode, 0, 5000, 6000, 7200)
    req = natpmp.MapRequest(proto, 5000, 6000, 7200)
    assert natpmp.encode_request(req) == raw
    assert natpmp.decode_request(raw) == req


def test_map_request_reserved_octets_ignored_rfc6886_3_3() -> None:
    raw = struct.pack("!BBHHHI", 0, 2, 0xBEEF, 80, 8080, 60)
    assert natpmp.decode_request(raw) == natpmp.MapRequest(6, 80, 8080, 60)


def test_public_address_response_layout_rfc6886_3_2() -> None:
    raw = natpmp.encode_response(natpmp.PublicAddressResponse(0, 1234, ADDR))
    assert raw == struct.pack("!BBHI", 0, 128, 0, 1234) + ADDR.packed
    assert natpmp.decode_response(raw) == natpmp.PublicAddressResponse(0, 1234, ADDR)


def test_map_response_layout_rfc6886_3_3() -> None:
    resp = natpmp.MapResponse(6, 0, 99, 80, 8080, 3600)
    raw = natpmp.encode_response(resp)
    assert raw == struct.pack("!BBHIHHI", 0, 130, 0, 99, 80, 8080, 3600)
    assert natpmp.decode_response(raw) == resp
    udp = natpmp.encode_response(natpmp.MapResponse(17, 4, 99, 80, 0, 0))
    assert udp[1] == 129 and udp[2:4] == b"\x00\x04"


def test_unsupported_version_answer_rfc6886_3_5_erratum_3618() -> None:
    raw = natpmp.unsupported_version(77)
    assert raw == b"\x00\x80\x00\x01" + struct.pack("!I", 77)
    assert natpmp.decode_response(raw) == natpmp.ErrorResponse(0, Result.UNSUPP_VERSION, 77)
    # the original figure's OP = 0 is still understood by the client side
    assert natpmp.decode_response(b"\x00\x00\x00\x01\x00\x00\x00\x05").result == Result.UNSUPP_VERSION


def test_unsupported_opcode_echoes_whole_request_rfc6886_3_5() -> None:
    req = bytes([0, 9, 0, 0, 1, 2, 3, 4])
    assert natpmp.unsupported_opcode(req, 1100) == bytes([0, 0x89, 0, 5, 1, 2, 3, 4])
    assert natpmp.unsupported_opcode(bytes([0, 3]), 1100) == bytes([0, 0x83, 0, 5])
    assert len(natpmp.unsupported_opcode(bytes([0, 3]) + bytes(2000), 1100)) == 1100


def test_address_announcement_is_a_public_address_response_rfc6886_3_2_1() -> None:
    assert natpmp.address_announcement(5, ADDR) == natpmp.encode_response(natpmp.PublicAddressResponse(0, 5, ADDR))


def test_result_codes_rfc6886_3_5() -> None:
    assert [int(r) for r in Result] == [0, 1, 2, 3, 4, 5]
    assert [int(o) for o in Opcode] == [0, 1, 2]


@pytest.mark.parametrize(("raw", "fault"), [
    (b"", Fault.TRUNCATED),
    (b"\x00", Fault.TRUNCATED),
    (b"\x02\x00", Fault.VERSION),
    (b"\x01\x01" + bytes(10), Fault.VERSION),
    (b"\x00\x80", Fault.NOT_REQUEST),
    (b"\x00\x81" + bytes(10), Fault.NOT_REQUEST),
    (b"\x00\x03", Fault.OPCODE),
    (b"\x00\x7f" + bytes(10), Fault.OPCODE),
    (b"\x00\x00\x00", Fault.TRAILING),
    (b"\x00\x01" + bytes(9), Fault.TRUNCATED),
    (b"\x00\x02" + bytes(11), Fault.TRAILING),
])
def test_decode_request_faults_rfc6886_3_5(raw: bytes, fault: Fault) -> None:
    with pytest.raises(NatPmpDecodeError) as err:
        natpmp.decode_request(raw)
    assert err.value.fault is fault


@pytest.mark.parametrize(("raw", "fault"), [
    (b"\x00\x80\x00\x00", Fault.TRUNCATED),
    (b"\x02\x80\x00\x00\x00\x00\x00\x00", Fault.VERSION),
    (b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", Fault.NOT_REQUEST),
    (b"\x00\x80" + bytes(11), Fault.TRAILING),
    (b"\x00\x85" + bytes(14), Fault.OPCODE),
    (b"\x00\x81" + bytes(12), Fault.TRAILING),
])
def test_decode_response_faults(raw: bytes, fault: Fault) -> None:
    with pytest.raises(NatPmpDecodeError) as err:
        natpmp.decode_response(raw)
    assert err.value.fault is fault


def test_short_map_error_answer_decodes() -> None:
    assert natpmp.decode_response(b"\x00\x82\x00\x03" + bytes(4)) == natpmp.ErrorResponse(2, 3, 0)


def test_encode_refuses_what_nat_pmp_cannot_say() -> None:
    with pytest.raises(ValueError):
        natpmp.encode_request(natpmp.MapRequest(132, 1, 1, 1))
    with pytest.raises(ValueError):
        natpmp.encode_request(natpmp.MapRequest(6, 1, 1, 1 << 32))
    with pytest.raises(ValueError):
        natpmp.encode_response(natpmp.MapResponse(1, 0, 0, 1, 1, 1))
    with pytest.raises(ValueError):
        natpmp.encode_response(natpmp.PublicAddressResponse(0, -1, ADDR))


@LONG
@FUZZ
@given(st.binary(max_size=40))
def test_fuzz_decode_request_raises_only_typed_errors(raw: bytes) -> None:
    try:
        req = natpmp.decode_request(raw)
    except NatPmpDecodeError:
        return
    assert natpmp.encode_request(req)[:2] == raw[:2]  # a decoded request re-encodes to its own type


@LONG
@FUZZ
@given(st.binary(max_size=40))
def test_fuzz_decode_response_raises_only_typed_errors(raw: bytes) -> None:
    try:
        resp = natpmp.decode_response(raw)
    except NatPmpDecodeError:
        return
    again = natpmp.encode_response(resp)
    assert again[2:] == raw[2:] and again[0] == raw[0]
