"""The core's sans-I/O upstream deadlines and mode choice: time is passed in, nothing sleeps."""

from __future__ import annotations

import random

from controld.core.upstream import (
    RECOVERY_MAX_BACKOFF,
    EpochPollDue,
    MappingDue,
    RedecideDue,
    UpstreamTimers,
    choose_mode,
    is_private,
    needs_probe,
    recovery_due,
)


def test_one_deadline_per_mapping_and_superseded_entries_never_fire() -> None:
    t = UpstreamTimers()
    assert t.next_deadline() is None and t.on_timer(1e9) == []
    t.schedule(1, 100.0)
    t.schedule(2, 50.0)
    t.schedule(1, 30.0, attempt=2)  # replaces mapping 1's deadline at 100
    assert t.next_deadline() == 30.0
    assert t.on_timer(29.9) == []
    assert t.on_timer(30.0) == [MappingDue(1, 2)]
    assert t.next_deadline() == 50.0  # the superseded 100 s entry for mapping 1 is gone for good
    t.drop(2)
    assert t.next_deadline() is None and t.on_timer(1000.0) == []


def test_redecide_and_epoch_poll_fire_once_until_rearmed() -> None:
    t = UpstreamTimers()
    t.redecide_at, t.epoch_poll_at = 60.0, 30.0
    t.schedule(7, 45.0)
    assert t.next_deadline() == 30.0
    assert t.on_timer(30.0) == [EpochPollDue()]
    assert t.on_timer(61.0) == [RedecideDue(), MappingDue(7, 0)]
    assert t.on_timer(1000.0) == [] and t.next_deadline() is None  # the owner re-arms what repeats


def test_heap_stays_bounded_under_rescheduling() -> None:
    t = UpstreamTimers()
    for i in range(10_000):
        t.schedule(i % 10, float(i))
    assert len(t.heap) <= 2 * len(t.due) + 65 and len(t.due) == 10


def test_mode_choice() -> None:
    """RFC 6970 §5.4, §5.5 (docs/requirements.md IWF-12, IWF-13)."""
    assert choose_mode("nat1-only", "100.64.0.2", True, True) == "nat1-only"
    assert choose_mode("auto", "1.2.3.4", None, True) == "nat1-only"  # public WAN: classic IGD
    assert choose_mode("auto", None, None, True) == "nat1-only"
    assert choose_mode("auto", "100.64.0.2", True, False) == "cascaded"
    assert choose_mode("auto", "100.64.0.2", False, True) == "cascaded"  # told: stays, answers "unavailable"
    assert choose_mode("auto", "100.64.0.2", False, False) == "nat1-only"
    assert choose_mode("no-nat1", "100.64.0.2", False, False) == "no-nat1"
    assert not needs_probe("auto", "1.2.3.4") and needs_probe("auto", "10.0.0.2") and needs_probe("cascaded", None)
    assert is_private("100.64.1.1") and is_private("192.168.1.1") and is_private(None)
    assert not is_private("1.2.3.4")


def test_recovery_backs_off_from_4s_to_the_cap() -> None:
    rng = random.Random(1)
    waits = [recovery_due(1000.0, a, rng) - 1000.0 for a in range(20)]
    assert 4.0 <= waits[0] <= 5.0 and 8.0 <= waits[1] <= 10.0
    assert all(w <= RECOVERY_MAX_BACKOFF * 1.25 for w in waits) and waits[-1] >= RECOVERY_MAX_BACKOFF
