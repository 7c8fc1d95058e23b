"""tests/bed/pcp_client.py, the independent client, checked against the RFC figures octet by
octet, and run over loopback against the server logic."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading

import pytest

from controld.pcpserver import pcp
from controld.pcpserver.events import Granted, MapWanted
from tests.bed import pcp_client as c

NONCE = bytes(range(1, 13))


def test_map_request_octets_rfc6887_figure_2_and_9() -> None:
    data = c.map_request("198.51.100.7", NONCE, 6, 8080, 7200, 8080, "0.0.0.0", c.prefer_failure())
    assert data.hex() == (
        "02010000" "00001c20"                            # version 2, R=0, opcode 1 | lifetime 7200
        "00000000000000000000ffffc6336407"              # client ::ffff:198.51.100.7
        "0102030405060708090a0b0c"                      # nonce
        "06000000"                                      # protocol 6, reserved 24
        "1f901f90"                                      # internal port 8080, suggested external 8080
        "00000000000000000000ffff00000000"              # suggested external ::ffff:0.0.0.0
        "02000000"                                      # PREFER_FAILURE, length 0 (figure 14)
    )
    assert len(data) == 64


def test_option_octets_rfc6887_figures_13_15_rfc7220() -> None:
    assert c.third_party("192.168.1.10").hex() == "01000010" "00000000000000000000ffffc0a8010a"
    assert c.filter_option(120, 443, "198.51.100.0").hex() == (
        "03000014" "007801bb" "00000000000000000000ffffc6336400")
    assert c.description("abcde").hex() == "80000005" "6162636465000000"  # padded, length unpadded
    assert c.option(200).hex() == "c8000000"


def test_peer_request_octets_rfc6887_figure_10() -> None:
    data = c.peer_request("10.0.0.2", NONCE, 17, 5000, 600, "198.51.100.9", 6000, 0, "0.0.0.0")
    assert len(data) == 80
    assert data[:4] == b"\x02\x02\x00\x00"
    assert struct.unpack("!B3xHH", data[36:44]) == (17, 5000, 0)
    assert struct.unpack("!HH", data[60:64]) == (6000, 0)
    assert data[64:80] == bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 9])


def test_announce_request_octets_rfc6887_14_1_1() -> None:
    assert c.announce_request("10.0.0.2").hex() == "02000000" "00000000" "00000000000000000000ffff0a000002"


def test_ipv6_addresses_stored_as_is_rfc6887_5() -> None:
    assert c.addr16("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1").packed
    assert c.from16(c.addr16("2001:db8::1")) == ipaddress.IPv6Address("2001:db8::1")
    # all 96 prefix bits decide, not just the ffff (RFC 6887 §5)
    assert c.from16(b"\x01" + bytes(9) + b"\xff\xff" + bytes(4)).version == 6


def test_natpmp_request_octets_rfc6886_3_2_3_3() -> None:
    assert c.natpmp_address_request() == b"\x00\x00"
    assert c.natpmp_map_request(c.NATPMP_TCP, 80, 8080, 7200).hex() == "00020000" "00501f90" "00001c20"


def test_parse_pcp_response_rfc6887_figure_3() -> None:
    data = (struct.pack("!BBBBII", 2, 0x81, 0, 0, 3600, 77) + bytes(12) + NONCE
            + struct.pack("!B3xHH", 6, 80, 8080) + c.addr16("203.0.113.5") + c.description("x"))
    a = c.parse_pcp(data)
    assert (a.opcode, a.result, a.lifetime, a.epoch, a.internal_port, a.external_port) == (1, 0, 3600, 77, 80, 8080)
    assert a.external_ip == ipaddress.IPv4Address("203.0.113.5") and a.options == ((128, b"x"),)


def test_parse_pcp_rejects_off_layout() -> None:
    for bad in (bytes(20), bytes(26), struct.pack("!BBBBII", 2, 1, 0, 0, 0, 0) + bytes(12),
                struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, 0) + bytes(12) + c.option(128, b"")[:2] + b"\x00\x09"):
        with pytest.raises(ValueError):
            c.parse_pcp(bad)


def test_parse_natpmp_layouts_rfc6886() -> None:
    assert c.parse_natpmp(b"\x00\x80\x00\x01\x00\x00\x00\x09").result == 1
    assert c.parse_natpmp(b"\x00\x80\x00\x00\x00\x00\x00\x09\xcb\x00\x71\x05").address == \
        ipaddress.IPv4Address("203.0.113.5")
    m = c.parse_natpmp(struct.pack("!BBHIHHI", 0, 130, 0, 9, 80, 81, 60))
    assert (m.internal_port, m.external_port, m.lifetime) == (80, 81, 60)
    for bad in (b"\x02\x80" + bytes(6), b"\x00\x80" + bytes(4), b"\x00\x81" + bytes(12)):
        with pytest.raises(ValueError):
            c.parse_natpmp(bad)


def test_exchange_over_loopback_with_the_server_logic() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.settimeout(5.0)
        port = srv.getsockname()[1]

        def serve_one() -> None:
            data, peer = srv.recvfrom(2048)
            event = pcp.handle_datagram(data, ipaddress.ip_address(peer[0]), peer[1], 12)
            assert isinstance(event, MapWanted)
            srv.sendto(pcp.respond(event, Granted(ipaddress.IPv4Address("203.0.113.5"), 4000, 120), 12), peer)

        worker = threading.Thread(target=serve_one, daemon=True)
        worker.start()
        me = c.local_address("127.0.0.1", port)
        answer = c.exchange("127.0.0.1", c.map_request(me, NONCE, 6, 3000, 120, 0), port=port, timeout=5.0, tries=1)
        worker.join(timeout=5.0)
    assert answer is not None
    parsed = c.parse_pcp(answer)
    assert (parsed.result, parsed.external_port, parsed.lifetime, parsed.epoch, parsed.nonce) == (0, 4000, 120, 12,
                                                                                                  NONCE)


def test_exchange_gives_up_when_nobody_answers() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet:
        quiet.bind(("127.0.0.1", 0))
        port = quiet.getsockname()[1]
        assert c.exchange("127.0.0.1", c.natpmp_address_request(), port=port, timeout=0.05, tries=2) is None
