"""natd's PCP relay matches a response to the request waiting for it (RFC 6887 §8.3, §11.4):
same server, opcode and, for MAP, nonce; anything else is unsolicited (an event)."""

from __future__ import annotations

import asyncio

import pytest

from natd import relay
from natd.relay import PcpRelay, match_key
from shared import pcp, wire


def test_a_response_settles_only_its_own_request() -> None:
    async def main() -> None:
        r = PcpRelay(lambda server, data: None)
        key = match_key("100.64.0.1", pcp.Opcode.MAP, b"n" * 12)
        fut = r.expect(key)
        assert not r.settle(match_key("100.64.0.9", pcp.Opcode.MAP, b"n" * 12), (b"x", None))  # other server
        assert not r.settle(match_key("100.64.0.1", pcp.Opcode.MAP, b"m" * 12), (b"x", None))  # other nonce
        assert not r.settle(match_key("100.64.0.1", pcp.Opcode.ANNOUNCE, None), (b"x", None))  # other opcode
        assert not fut.done()
        assert r.settle(key, (b"answer", "192.168.1.2"))
        assert fut.result() == (b"answer", "192.168.1.2")
        assert not r.settle(key, (b"late", None))  # a duplicate answer is unsolicited: an event
    asyncio.run(main())


def test_a_newer_request_takes_over_and_waiters_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        r = PcpRelay(lambda server, data: None)
        key = match_key("100.64.0.1", pcp.Opcode.MAP, b"n" * 12)
        old = r.expect(key)
        new = r.expect(key)  # a retransmission or a refresh of the same mapping
        assert old.cancelled() and not new.done()
        r.forget(key, old)  # the old request's end must not drop the new waiter
        assert r.settle(key, (b"a", None)) and new.result() == (b"a", None)
        monkeypatch.setattr(relay, "MAX_WAITING", 3)
        futs = [r.expect(match_key("100.64.0.1", pcp.Opcode.MAP, bytes([i]) * 12)) for i in range(5)]
        assert len(r.waiting) == 3 and futs[0].cancelled() and futs[1].cancelled() and not futs[4].done()
    asyncio.run(main())


def test_the_answer_message_is_checked() -> None:
    raw = wire.encode(wire.PcpAnswer(b"\x02\x81" + b"\x00" * 58, "192.168.1.2"), 7)
    msg, rid = wire.decode(raw)
    assert rid == 7 and isinstance(msg, wire.PcpAnswer) and msg.lan_ip == "192.168.1.2"
    assert wire.decode(wire.encode(wire.PcpAnswer(), 1))[0] == wire.PcpAnswer()
    for bad in (wire.PcpAnswer(None, "not-an-ip"), wire.PcpExchange("100.64.0.1", b"", None, wire.MAX_WAIT_MS + 1)):
        try:
            wire.decode(wire.encode(bad, 1))
        except wire.WireError as exc:
            assert exc.code == "bad-field"
        else:
            raise AssertionError(f"{bad} was accepted")
