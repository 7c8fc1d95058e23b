"""PCP wire codec against RFC 6887 layouts (RFC 6887 §7, §11, §13)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from shared import pcp

V4 = ipaddress.IPv4Address
NONCE = bytes(range(1, 13))


def test_worked_example_bytes() -> None:
    """A worked example: MAP TCP 8080, lifetime 7200, from 198.51.100.7, PREFER_FAILURE."""
    req = pcp.Request(pcp.Opcode.MAP, 7200, V4("198.51.100.7"),
                      pcp.MapData(NONCE, 6, 8080, 8080), pcp.Options(prefer_failure=True))
    expected = bytes.fromhex(
        "02010000" "00001c20"
        "00000000" "00000000" "0000ffff" "c6336407"
        "01020304" "05060708" "090a0b0c"
        "06000000" "1f901f90"
        "00000000" "00000000" "0000ffff" "00000000"
        "02000000")
    assert pcp.encode_request(req) == expected
    assert pcp.decode_request(expected) == req


def test_third_party_option_bytes() -> None:
    """RFC 6887 §13.1: THIRD_PARTY for 192.168.1.10 adds exactly these 20 octets."""
    req = pcp.Request(pcp.Opcode.MAP, 60, V4("10.0.0.1"), pcp.MapData(NONCE, 6, 80, 0),
                      pcp.Options(third_party=V4("192.168.1.10")))
    assert pcp.encode_request(req)[60:] == bytes.fromhex(
        "01000010" "00000000" "00000000" "0000ffff" "c0a8010a")


def test_ipv4_mapped_check_uses_all_96_bits() -> None:
    almost = b"\x00" * 9 + b"\x01\xff\xff" + bytes([1, 2, 3, 4])
    assert pcp.unpack_address(almost).version == 6
    assert pcp.unpack_address(b"\x00" * 10 + b"\xff\xff" + bytes([1, 2, 3, 4])) == V4("1.2.3.4")


def test_delete_uses_all_zeros_of_the_family() -> None:
    """Erratum 3621: suggested address of a delete is ::ffff:0:0 for IPv4, not ::."""
    req = pcp.Request(pcp.Opcode.MAP, 0, V4("10.0.0.1"), pcp.MapData(NONCE, 6, 80, 0, pcp.any_address(4)))
    assert pcp.encode_request(req)[44:60] == b"\x00" * 10 + b"\xff\xff" + b"\x00" * 4


def _resp(result: int = 0, opts: bytes = b"") -> bytes:
    hdr = struct.pack("!BBBBII12s", 2, 0x81, 0, result, 600, 42, b"\x00" * 12)
    body = struct.pack("!12sB3xHH16s", NONCE, 6, 80, 8080, b"\x00" * 10 + b"\xff\xff" + bytes([198, 20, 0, 1]))
    return hdr + body + opts


def test_response_decodes() -> None:
    r = pcp.decode_response(_resp())
    assert (r.result, r.lifetime, r.epoch) == (0, 600, 42)
    assert r.map == pcp.MapData(NONCE, 6, 80, 8080, V4("198.20.0.1"))


@pytest.mark.parametrize("bad,why", [
    (b"\x02", "too short"),
    (_resp()[:1] + b"\x01" + _resp()[2:], "R bit clear"),
    (_resp()[:-1], "not a multiple of 4"),
    (_resp() + b"\x00" * 1100, "longer than 1100"),
    (b"\x03" + _resp()[1:], "wrong version"),
    (_resp(opts=b"\x03\x00\x00\x30" + b"\x00" * 4), "option runs past the end"),
])
def test_bad_responses_are_rejected(bad: bytes, why: str) -> None:
    with pytest.raises(pcp.PcpDecodeError):
        pcp.decode_response(bad)


def test_unknown_mandatory_option_in_response_is_ignored() -> None:
    """RFC 6887 §7.3: a client ignores options it does not understand."""
    r = pcp.decode_response(_resp(opts=b"\x7e\x00\x00\x00"))
    assert r.result == 0 and r.options == pcp.Options()


def test_unsupp_version_is_reported_even_when_short() -> None:
    """RFC 6887 §9: a NAT-PMP server answers 8 octets; version negotiation must still see it."""
    r = pcp.decode_response(bytes([0, 0x80, 0, 1, 0, 0, 0, 5]))
    assert r.result == pcp.Result.UNSUPP_VERSION and r.version == 0


@pytest.mark.parametrize("mutate,result", [
    (lambda b: b + b"\x02\x00\x00\x00", pcp.Result.MALFORMED_OPTION),  # PREFER_FAILURE twice
    (lambda b: b + b"\x05\x00\x00\x00", pcp.Result.UNSUPP_OPTION),  # unknown mandatory option
    (lambda b: b[:36] + b"\x00" + b[37:], pcp.Result.MALFORMED_REQUEST),  # protocol 0 with a port
    (lambda b: b[:1] + b"\x09" + b[2:], pcp.Result.UNSUPP_OPCODE),
    (lambda b: b[:30], pcp.Result.MALFORMED_REQUEST),
])
def test_server_side_checks(mutate, result) -> None:
    good = pcp.encode_request(pcp.Request(pcp.Opcode.MAP, 600, V4("10.0.0.1"), pcp.MapData(NONCE, 6, 80, 80),
                                          pcp.Options(prefer_failure=True)))
    with pytest.raises(pcp.PcpDecodeError) as exc:
        pcp.decode_request(mutate(good))
    assert exc.value.result == result


def test_rewrite_as_natd_does() -> None:
    """Cascaded mode: internal address/port become NAT1's (RFC 6970 §5.5, docs/requirements.md IWF-35 to IWF-37)."""
    lan = pcp.encode_request(pcp.Request(pcp.Opcode.MAP, 600, V4("192.168.1.2"),
                                         pcp.MapData(NONCE, 6, 80, 8080), pcp.Options(description="web")))
    out = pcp.decode_request(pcp.rewrite_request(lan, V4("100.64.0.2"), 40000))
    assert out.client_ip == V4("100.64.0.2") and out.map is not None and out.map.internal_port == 40000
    assert out.map.external_port == 8080 and out.options.description == "web"
    back = pcp.decode_response(pcp.rewrite_response_port(_resp(), 8000))
    assert back.map is not None and back.map.internal_port == 8000 and back.map.external_port == 8080


def test_filter_and_description_bytes() -> None:
    """FILTER (RFC 6887 §13.3): code 3, length 20, reserved, prefix, port, IPv4-mapped peer;
    DESCRIPTION (RFC 7220): code 128, UTF-8, zero padding not counted in the length."""
    import ipaddress as ip

    opts = pcp.Options(filters=(pcp.Filter(128, 0, ip.IPv4Address("198.20.0.10")),), description="caf\u00e9")
    req = pcp.Request(pcp.Opcode.MAP, 600, ip.IPv4Address("100.64.0.2"),
                      pcp.MapData(b"\x01" * 12, 6, 80, 8080), opts)
    raw = pcp.encode_request(req)
    assert raw[60:84] == bytes.fromhex("03000014" "00800000" "00000000000000000000ffff" "c614000a")
    assert raw[84:] == bytes.fromhex("80000005") + "caf\u00e9".encode() + b"\0\0\0"
    assert len(raw) % 4 == 0 and pcp.decode_request(raw) == req


def _map_with(opts: bytes, opcode: int = pcp.Opcode.MAP) -> bytes:
    if opcode == pcp.Opcode.PEER:
        body = struct.pack("!12sB3xHH16sH2x16s", NONCE, 6, 80, 0, pcp.pack_address(pcp.any_address(4)), 80,
                           pcp.pack_address(V4("198.20.0.10")))
    else:
        body = struct.pack("!12sB3xHH16s", NONCE, 6, 80, 80, pcp.pack_address(pcp.any_address(4)))
    return struct.pack("!BBHI16s", 2, opcode, 0, 600, pcp.pack_address(V4("10.0.0.1"))) + body + opts


def _filter(prefix: int, peer: str = "198.20.0.10") -> bytes:
    return struct.pack("!BBHxBH16s", 3, 0, 20, prefix, 0, pcp.pack_address(ipaddress.ip_address(peer)))


@pytest.mark.parametrize("prefix,ok", [(0, True), (96, True), (128, True), (50, False), (129, False), (255, False)])
def test_filter_prefix_range(prefix: int, ok: bool) -> None:
    """RFC 6887 §13.3 with erratum 3891: IPv4 prefixes 96-128, 0 clears; others MALFORMED_OPTION."""
    data = _map_with(_filter(prefix))
    if ok:
        assert pcp.decode_request(data).options.filters[0].prefix_len == prefix
    else:
        with pytest.raises(pcp.PcpDecodeError) as exc:
            pcp.decode_request(data)
        assert exc.value.result == pcp.Result.MALFORMED_OPTION


def test_prefer_failure_in_peer_is_malformed_request() -> None:
    """RFC 6887 §13.2: PREFER_FAILURE in PEER MUST be MALFORMED_REQUEST (not UNSUPP_OPTION)."""
    with pytest.raises(pcp.PcpDecodeError) as exc:
        pcp.decode_request(_map_with(b"\x02\x00\x00\x00", pcp.Opcode.PEER))
    assert exc.value.result == pcp.Result.MALFORMED_REQUEST


def test_repeated_unknown_optional_option_is_not_malformed() -> None:
    """RFC 6887 §7.3: the repeat rule covers single-occurrence options the receiver understands."""
    req = pcp.decode_request(_map_with(b"\xc8\x00\x00\x00" * 2))
    assert req.options.unknown == ((200, b""), (200, b""))
