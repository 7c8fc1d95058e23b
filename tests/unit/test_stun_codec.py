"""shared/stun.py: the STUN Binding codec against RFC 5769's test vectors, and the
RFC 8489 §6.2.1 retransmission schedule."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest

from shared import stun

# RFC 5769 §2.1-§2.3 (short-term credential password for all three).
PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
REQUEST = bytes.fromhex(
    "00010058 2112a442 b7e7a701 bc34d686 fa87dfae"
    "80220010 5354554e 20746573 7420636c 69656e74"
    "00240004 6e0001ff"
    "80290008 932ff9b1 51263b36"
    "00060009 6576746a 3a683676 59202020"
    "00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2"
    "80280004 e57a3bcf".replace(" ", ""))
RESPONSE_V4 = bytes.fromhex(
    "0101003c 2112a442 b7e7a701 bc34d686 fa87dfae"
    "8022000b 74657374 20766563 746f7220"
    "00200008 0001a147 e112a643"
    "00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7"
    "80280004 c07d4c96".replace(" ", ""))
RESPONSE_V6 = bytes.fromhex(
    "01010048 2112a442 b7e7a701 bc34d686 fa87dfae"
    "8022000b 74657374 20766563 746f7220"
    "00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9"
    "00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41"
    "80280004 c8fb0b4c".replace(" ", ""))


def _integrity_ok(msg: bytes) -> bool:
    """RFC 8489 §14.5 over a vector: proves the vector bytes above are exactly the RFC's."""
    i = msg.index(b"\x00\x08\x00\x14", 20)
    head = struct.pack("!H", msg[0] << 8 | msg[1]) + struct.pack("!H", i - 20 + 24) + msg[4:i]
    return hmac.compare_digest(hmac.new(PASSWORD, head, hashlib.sha1).digest(), msg[i + 4:i + 24])


@pytest.mark.parametrize("vector", [REQUEST, RESPONSE_V4, RESPONSE_V6], ids=["request", "v4", "v6"])
def test_vectors_are_the_rfcs_and_their_fingerprint_checks(vector: bytes) -> None:
    assert _integrity_ok(vector)
    mtype, txid, attrs = stun.parse_message(vector)  # raises if FINGERPRINT were wrong
    assert txid == TXID and attrs[-1][0] == stun.ATTR_FINGERPRINT


def test_rfc5769_ipv4_response() -> None:
    r = stun.parse_response(RESPONSE_V4, TXID)
    assert r.mapped == ("192.0.2.1", 32853) and r.error is None and r.software == "test vector"


def test_rfc5769_ipv6_response() -> None:
    r = stun.parse_response(RESPONSE_V6, TXID)
    assert r.mapped == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)


def test_request_vector_is_no_response() -> None:
    with pytest.raises(stun.StunError, match="no Binding response"):
        stun.parse_response(REQUEST, TXID)


def test_one_flipped_bit_fails_the_fingerprint() -> None:
    bad = bytearray(RESPONSE_V4)
    bad[30] ^= 1  # inside the XOR-MAPPED-ADDRESS port
    with pytest.raises(stun.StunError, match="FINGERPRINT"):
        stun.parse_response(bytes(bad), TXID)


def test_answer_to_another_transaction_is_refused() -> None:
    with pytest.raises(stun.StunError, match="another transaction"):
        stun.parse_response(RESPONSE_V4, bytes(12))


def test_binding_request_layout() -> None:
    req, txid = stun.binding_request(TXID)
    assert txid == TXID and len(req) == 28
    mtype, length, cookie, got = stun.HEADER.unpack_from(req)
    assert (mtype, length, cookie, got) == (0x0001, 8, 0x2112A442, TXID)
    assert stun.parse_message(req)[2][0][0] == stun.ATTR_FINGERPRINT
    plain, _ = stun.binding_request(TXID, with_fingerprint=False)
    assert plain == req[:20][:2] + b"\x00\x00" + req[4:20]
    assert len(stun.binding_request()[1]) == 12 and stun.binding_request()[1] != stun.binding_request()[1]


def _response(txid: bytes, attrs: bytes, mtype: int = stun.BINDING_SUCCESS) -> bytes:
    return stun.HEADER.pack(mtype, len(attrs), stun.MAGIC_COOKIE, txid) + attrs


def test_rfc3489_mapped_address_and_xor_precedence() -> None:
    mapped = struct.pack("!HHBBH4s", 0x0001, 8, 0, 1, 4444, bytes([198, 20, 0, 1]))
    assert stun.parse_response(_response(TXID, mapped), TXID).mapped == ("198.20.0.1", 4444)
    xor = RESPONSE_V4[36:48]  # XOR-MAPPED-ADDRESS of the vector: 192.0.2.1:32853
    assert stun.parse_response(_response(TXID, mapped + xor), TXID).mapped == ("192.0.2.1", 32853)


def test_error_response() -> None:
    reason = b"Bad Request"
    err = struct.pack("!HHHBB", 0x0009, 4 + len(reason), 0, 4, 0) + reason + b"\0"
    r = stun.parse_response(_response(TXID, err, stun.BINDING_ERROR), TXID)
    assert r.mapped is None and r.error == (400, "Bad Request")


@pytest.mark.parametrize("data, why", [
    (b"", "no STUN message"),
    (b"\x00" * 19, "no STUN message"),
    (RESPONSE_V4[:4] + b"\x00\x00\x00\x00" + RESPONSE_V4[8:], "magic cookie"),
    (b"\x81" + RESPONSE_V4[1:], "top bits"),
    (RESPONSE_V4[:-4], "length field"),
    (_response(TXID, b"\x00\x20\x00\x40" + b"\0" * 4), "runs past"),
    (_response(TXID, b""), "without a mapped address"),
    (_response(TXID, struct.pack("!HHBBH", 0x0020, 4, 0, 9, 1)), "address family"),
    (_response(TXID, b"", stun.BINDING_ERROR), "without ERROR-CODE"),
    (b"\x00" * 2000, "no STUN message"),
])
def test_malformed_datagrams_are_refused_with_a_reason(data: bytes, why: str) -> None:
    with pytest.raises(stun.StunError, match=why):
        stun.parse_response(data, TXID)


def test_retransmission_schedule_rfc8489() -> None:
    """§6.2.1: sends at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s and failure at 39.5 s."""
    t = stun.BindingTransaction(100.0)
    sends, now = [], 100.0
    for _ in range(20):  # bounded
        pkt, nxt = t.poll(now)
        if pkt is not None:
            sends.append(now - 100.0)
            assert pkt == t.request
        if nxt is None:
            break
        now = nxt
    assert sends == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5] and now - 100.0 == 39.5 and t.timed_out


def test_transaction_takes_only_its_answer() -> None:
    t = stun.BindingTransaction(0.0, transaction_id=TXID)
    assert t.poll(0.0)[0] == t.request and t.poll(0.1) == (None, 0.5)
    assert t.receive(b"garbage") is None and t.receive(_response(bytes(12), b"")) is None
    r = t.receive(RESPONSE_V4)
    assert r is not None and r.mapped == ("192.0.2.1", 32853) and t.done
    assert t.poll(1.0) == (None, None) and t.receive(RESPONSE_V4) is None
