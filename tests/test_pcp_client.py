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
        assert [type(e) for e in evs] == [c.Transmit] and evs[0].packet == first[0].packet
        sends.append(now)
    gaps = [b - a for a, b in zip(sends, sends[1:])]
    assert 2.7 <= gaps[0] <= 3.3
    for prev, nxt in zip(gaps, gaps[1:]):
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
    """RFC 6887 §8.5 (rfc6887-pcp §8.6): a reset or a big jump means the server lost state."""
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
