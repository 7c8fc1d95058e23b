"""The sans-I/O PCP client: retransmission, matching, epoch, renewal timing, without sleeping."""

from __future__ import annotations

import ipaddress
import random

from controld.pcp import client as c
from shared import pcp

V4 = ipaddress.IPv4Address
NONCE = b"n" * 12
SERVER = "100.64.0.1"


def _req(pf: bool = False, eport: int = 8080) -> pcp.Request:
    return pcp.Request(pcp.Opcode.MAP, 600, V4("100.64.0.2"), pcp.MapData(NONCE, 6, 80, eport),
                       pcp.Options(prefer_failure=pf))


def _resp(result: int = 0, eport: int = 8080, epoch: int = 100, nonce: bytes = NONCE, iport: int = 80) -> bytes:
    return pcp.encode_response(pcp.Response(pcp.Opcode.MAP, result, 600, epoch,
                                            pcp.MapData(nonce, 6, iport, eport, V4("198.20.0.1"))))


def test_retransmission_follows_rfc6887_8_1_1() -> None:
    """IRT 3 s, doubling, RAND within ±10 %; same packet (same nonce) every time."""
    cl = c.PcpClient(random.Random(1))
    first = cl.request("k", SERVER, _req(), now=0.0)
    assert len(first) == 1 and isinstance(first[0], c.Transmit)
    sends, now = [0.0], 0.0
    for _ in range(5):
        now = cl.next_timer()  # type: ignore[assignment]
        evs = cl.poll(now)
        assert [type(e) for e in evs] == [c.Transmit]
        assert isinstance(evs[0], c.Transmit) and evs[0].packet == first[0].packet
        sends.append(now)
    gaps = [b - a for a, b in zip(sends, sends[1:], strict=False)]
    assert 2.7 <= gaps[0] <= 3.3
    for prev, nxt in zip(gaps, gaps[1:], strict=False):
        assert 0.9 * 2 * prev / 1.1 <= nxt <= 1.1 * 2 * prev / 0.9


def test_bound_gives_up() -> None:
    cl = c.PcpClient(random.Random(2))
    cl.request("k", SERVER, _req(), now=0.0, max_duration=10.0)
    events: list[c.Event] = []
    now = 0.0
    for _ in range(20):
        t = cl.next_timer()
        if t is None:
            break
        now = t
        events += cl.poll(now)
    assert isinstance(events[-1], c.GaveUp) and 9.99 <= now <= 10.01
    # Retransmissions at 2.7..3.3 s and (RT doubling, ±10 %) 7.56..10.56 s: one or two fit in 10 s.
    assert 1 <= sum(isinstance(e, c.Transmit) for e in events) <= 2


def test_matching_needs_nonce_protocol_port_and_address() -> None:
    cl = c.PcpClient()
    cl.request("k", SERVER, _req(), now=0.0, internal_ip="192.168.1.2")
    assert cl.receive(SERVER, _resp(nonce=b"x" * 12), 1.0, "192.168.1.2") == [
        c.Unsolicited(SERVER, pcp.decode_response(_resp(nonce=b"x" * 12)), "192.168.1.2")]
    assert not any(isinstance(e, c.Answer) for e in cl.receive(SERVER, _resp(iport=81), 1.0, "192.168.1.2"))
    assert not any(isinstance(e, c.Answer) for e in cl.receive(SERVER, _resp(), 1.0, "192.168.1.9"))
    assert not any(isinstance(e, c.Answer) for e in cl.receive("10.9.9.9", _resp(), 1.0, "192.168.1.2"))
    evs = cl.receive(SERVER, _resp(), 1.0, "192.168.1.2")
    assert isinstance(evs[-1], c.Answer) and evs[-1].key == "k"
    assert cl.next_timer() is None


def test_garbage_is_dropped_silently() -> None:
    cl = c.PcpClient()
    cl.request("k", SERVER, _req(), now=0.0)
    for junk in (b"", b"\x02\x81", b"\xff" * 60, _resp()[:-4]):
        assert cl.receive(SERVER, junk, 1.0) == []
    assert "k" in cl.exchanges


def test_prefer_failure_race_ignores_other_port() -> None:
    """RFC 6887 §11.4: a success for another port answers not our PREFER_FAILURE request."""
    cl = c.PcpClient()
    cl.request("k", SERVER, _req(pf=True), now=0.0)
    assert not any(isinstance(e, c.Answer) for e in cl.receive(SERVER, _resp(eport=9999), 1.0))
    assert isinstance(cl.receive(SERVER, _resp(), 1.0)[-1], c.Answer)


def test_epoch_rules() -> None:
    """RFC 6887 §8.5 : a reset or a big jump means the server lost state."""
    cl = c.PcpClient()
    assert cl._epoch_valid(SERVER, 1000, 0.0)
    assert cl._epoch_valid(SERVER, 1010, 10.0)
    assert cl._epoch_valid(SERVER, 1009, 10.5)  # back by 1 s: tolerated
    assert not cl._epoch_valid(SERVER, 5, 20.0)  # restarted
    assert cl._epoch_valid(SERVER, 25, 40.0)
    assert not cl._epoch_valid(SERVER, 25 + 500, 50.0)  # server clock ran 50x faster


def test_epoch_loss_is_reported_on_any_response() -> None:
    cl = c.PcpClient()
    cl.request("a", SERVER, _req(), now=0.0)
    cl.receive(SERVER, _resp(epoch=5000), 1.0)
    cl.request("b", SERVER, _req(), now=100.0)
    evs = cl.receive(SERVER, _resp(epoch=3), 100.5)
    assert c.EpochLost(SERVER) in evs and isinstance(evs[-1], c.Answer)


def test_renewal_windows() -> None:
    """RFC 6887 §11.2.1: 1/2..5/8, then 3/4..13/16, then 7/8..29/32 of the lifetime."""
    rng = random.Random(3)
    for _ in range(200):
        assert 500 <= c.renewal_time(1000, 0, 0, rng) <= 625
        assert 750 <= c.renewal_time(1000, 0, 1, rng) <= 812.5
        assert 875 <= c.renewal_time(1000, 0, 2, rng) <= 906.25
    assert c.renewal_time(2**32 - 1, 0, 0, rng) <= 0.625 * 86400  # absurd lifetimes count as a day


def test_unsupported_version_ends_exchanges_and_holds_off() -> None:
    """RFC 6887 §9 : we speak version 2 only; a server proposing another
    version answers every exchange with it and is not asked again for min(30 min, Lifetime)."""
    import struct

    cl = c.PcpClient()
    cl.request("a", SERVER, _req(), now=0.0)
    cl.request("b", SERVER, _req(eport=9), now=0.0)
    nat_pmp = struct.pack("!BBHI", 0, 0x80, 1, 77)  # an 8-octet NAT-PMP "unsupported version"
    assert cl.receive("10.9.9.9", nat_pmp, 1.0) == []  # nothing asked there: ignored
    evs = cl.receive(SERVER, nat_pmp, 1.0)
    assert {e.key for e in evs if isinstance(e, c.Answer)} == {"a", "b"}
    assert all(isinstance(e, c.Answer) and e.response.result == pcp.Result.UNSUPP_VERSION
               and e.response.version == 0 for e in evs)
    again = cl.request("c", SERVER, _req(), now=2.0)
    assert [type(e) for e in again] == [c.Answer]  # held off: nothing transmitted
    later = c.PcpClient()
    later.refused[SERVER] = (10.0, pcp.decode_response(nat_pmp))
    assert isinstance(later.request("e", SERVER, _req(), now=10.0)[0], c.Transmit)


def test_announce_epoch_loss_is_flagged_and_unmatched_answers_ignored() -> None:
    """An unsolicited ANNOUNCE with an epoch that went back: EpochLost(announce=True), so the
    IWF waits 0-5 s (RFC 6887 §14.1.3); responses to nothing we sent are ignored (§8.3)."""
    cl = c.PcpClient()
    cl.request("a", SERVER, _req(), now=0.0)
    cl.receive(SERVER, _resp(epoch=5000), 1.0)
    ann = pcp.encode_response(pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, 2))
    evs = cl.receive(SERVER, ann, 2.0)
    assert evs[0] == c.EpochLost(SERVER, announce=True) and isinstance(evs[1], c.Unsolicited)
    assert cl.receive(SERVER, pcp.encode_response(pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, 3)), 3.0)[0] \
        == c.Unsolicited(SERVER, pcp.decode_response(
            pcp.encode_response(pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, 3))), None)  # valid epoch: no loss
    peer = pcp.encode_response(pcp.Response(pcp.Opcode.PEER, 0, 60, 4)) + b"\0" * 56
    assert cl.receive(SERVER, peer, 4.0) == []


def test_retry_time_follows_the_windows_then_backs_off() -> None:
    """RFC 6887 §11.2.1: after a failed renewal, the next window still >= 4 s away; once the
    lifetime is over, IRT doubling to MRT (§8.1.1), never closer than 4 s."""
    rng = random.Random(4)
    for _ in range(100):
        assert 750 <= c.retry_time(1000, 0, 1, 600.0, rng) <= 812.5
        assert 875 <= c.retry_time(1000, 0, 1, 850.0, rng) <= 906.25  # 3/4 window passed: the next one
        t = c.retry_time(1000, 0, 3, 1200.0, rng)
        assert 1200 + 4 <= t <= 1200 + 1.1 * 24
        assert c.retry_time(10, 0, 1, 9.0, rng) >= 13.0
        assert c.retry_time(1000, 0, 30, 2000.0, rng) <= 2000 + 1.1 * c.MRT


def test_short_errors() -> None:
    """RFC 6887 §7.4 classes; CANNOT_PROVIDE_EXTERNAL by its Lifetime (docs/requirements.md §18 item 9)."""
    def r(result: int, life: int) -> pcp.Response:
        return pcp.Response(pcp.Opcode.MAP, result, life, 0)
    assert c.is_short_error(r(7, 30)) and c.is_short_error(r(8, 30)) and c.is_short_error(r(10, 30))
    assert c.is_short_error(r(11, 30)) and not c.is_short_error(r(11, 1800))
    assert not c.is_short_error(r(2, 30)) and not c.is_short_error(r(3, 0))
