"""controld/pcpserver/epoch.py: our epoch (RFC 6887 §8.5, RFC 6886 §3.6) and the paced
announcements after a reset (RFC 6887 §14.1.3, RFC 6886 §3.2.1). Time is passed in."""

from __future__ import annotations

import ipaddress

from controld.pcpserver.epoch import Announcer, EpochRecord, ServerEpoch
from tests.bed import pcp_client as c

EXT = ipaddress.IPv4Address("203.0.113.5")


def test_epoch_counts_seconds_from_start_rfc6887_8_5() -> None:
    epoch = ServerEpoch(1000.0)
    assert [epoch.seconds(t) for t in (1000.0, 1000.9, 1001.0, 1123.5)] == [0, 0, 1, 123]


def test_epoch_never_negative_or_over_32_bits() -> None:
    epoch = ServerEpoch(1000.0)
    assert epoch.seconds(990.0) == 0
    assert epoch.seconds(1000.0 + 2**33) == 0xFFFFFFFF


def test_reset_starts_again_at_0_after_state_loss_rfc6887_8_5_rfc6886_3_6() -> None:
    epoch = ServerEpoch(0.0)
    assert epoch.seconds(500.0) == 500
    epoch.reset(500.0)
    assert epoch.seconds(510.0) == 10


def test_restart_with_state_kept_goes_on_counting_through_downtime_rfc6887_8_5() -> None:
    before = ServerEpoch(0.0)
    saved = before.record(300.0, wall=1_700_000_000.0)
    assert saved == EpochRecord(300, 1_700_000_000.0)
    # the new process's monotonic clock starts near 0; 40 s of wall time passed while down
    after = ServerEpoch.after_restart(5.0, 1_700_000_040.0, saved, state_kept=True)
    assert after.seconds(5.0) == 340
    assert after.seconds(15.0) == 350


def test_restart_that_lost_state_starts_at_0_rfc6887_8_5() -> None:
    saved = EpochRecord(300, 1_700_000_000.0)
    assert ServerEpoch.after_restart(5.0, 1_700_000_040.0, saved, state_kept=False).seconds(5.0) == 0
    assert ServerEpoch.after_restart(5.0, 1_700_000_040.0, None, state_kept=True).seconds(5.0) == 0


def test_restart_with_wall_clock_gone_back_starts_at_0() -> None:
    saved = EpochRecord(300, 1_700_000_000.0)
    assert ServerEpoch.after_restart(5.0, 1_699_999_000.0, saved, state_kept=True).seconds(5.0) == 0


def _run(ann: Announcer, start: float, until: float) -> list[tuple[float, list]]:
    """Drive the announcer as the event loop would; bounded."""
    sent = []
    for _ in range(100):
        due = ann.next_deadline()
        if due is None or due > until:
            break
        sent.append((due, ann.on_timer(due)))
    return sent


def test_announcements_ten_copies_250ms_then_doubling_rfc6887_14_1_3_rfc6886_3_2_1() -> None:
    epoch = ServerEpoch(0.0)
    ann = Announcer(epoch)
    assert ann.next_deadline() is None and ann.on_timer(5.0) == []
    ann.lose_state(100.0, EXT)
    sent = _run(ann, 100.0, 10_000.0)
    times = [t for t, _ in sent]
    assert len(times) == 10 and times[0] == 100.0
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.25 and all(b >= 2 * a for a, b in zip(gaps, gaps[1:], strict=False))
    assert ann.next_deadline() is None
    for _, datagrams in sent:
        assert [(d.host, d.port) for d in datagrams] == [("224.0.0.1", 5350), ("224.0.0.1", 5350)]


def test_announcement_bytes_carry_the_reset_epoch_rfc6887_14_1_3() -> None:
    epoch = ServerEpoch(0.0)
    ann = Announcer(epoch)
    ann.lose_state(1000.0, EXT)  # epoch was 1000; now 0 again
    ann.on_timer(1000.0)
    ann.on_timer(1000.25)
    ann.on_timer(1000.75)
    pcp_copy, natpmp_copy = ann.on_timer(1001.75)
    a = c.parse_pcp(pcp_copy.payload)
    assert (a.opcode, a.result, a.lifetime, a.epoch) == (0, 0, 0, 1)  # epoch of this copy's own time
    n = c.parse_natpmp(natpmp_copy.payload)
    assert (n.opcode, n.result, n.epoch, n.address) == (128, 0, 1, EXT)


def test_late_timer_never_shortens_a_gap() -> None:
    ann = Announcer(ServerEpoch(0.0))
    ann.lose_state(0.0, EXT)
    ann.on_timer(0.0)
    ann.on_timer(3.0)  # woke 2.75 s late
    assert ann.next_deadline() == 3.5


def test_early_timer_sends_nothing() -> None:
    ann = Announcer(ServerEpoch(0.0))
    ann.lose_state(0.0, EXT)
    ann.on_timer(0.0)
    assert ann.on_timer(0.1) == []


def test_no_nat_pmp_copy_without_an_address_and_switches() -> None:
    ann = Announcer(ServerEpoch(0.0), ipv6=True)
    ann.lose_state(0.0, None)
    assert [d.host for d in ann.on_timer(0.0)] == ["224.0.0.1", "ff02::1"]
    only_natpmp = Announcer(ServerEpoch(0.0), pcp=False, repeats=1)
    only_natpmp.lose_state(0.0, EXT)
    assert len(only_natpmp.on_timer(0.0)) == 1 and only_natpmp.next_deadline() is None


def test_new_loss_restarts_the_schedule_and_epoch() -> None:
    epoch = ServerEpoch(0.0)
    ann = Announcer(epoch)
    ann.lose_state(10.0, EXT)
    _run(ann, 10.0, 12.0)
    ann.lose_state(50.0, ipaddress.IPv4Address("203.0.113.6"))
    assert ann.next_deadline() == 50.0 and epoch.seconds(50.0) == 0
    assert len(_run(ann, 50.0, 10_000.0)) == 10
