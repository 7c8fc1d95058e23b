"""controld/pcpserver/ratelimit.py: per-host token buckets with a bounded host table."""

from __future__ import annotations

import pytest

from controld.pcpserver.ratelimit import HostRateLimiter


def test_burst_then_rate() -> None:
    rl = HostRateLimiter(rate=2.0, burst=3, max_hosts=10)
    assert [rl.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("a", 0.4) is False  # 0.8 token
    assert rl.allow("a", 0.5) is True  # 1.0 token
    assert rl.allow("a", 100.0) and rl.allow("a", 100.0) and rl.allow("a", 100.0)  # refilled to burst only
    assert rl.allow("a", 100.0) is False


def test_hosts_are_independent() -> None:
    rl = HostRateLimiter(rate=1.0, burst=1, max_hosts=10)
    assert rl.allow("a", 0.0) and not rl.allow("a", 0.0)
    assert rl.allow("b", 0.0)


def test_host_table_bounded_least_recent_forgotten() -> None:
    rl = HostRateLimiter(rate=1.0, burst=1, max_hosts=2)
    rl.allow("a", 0.0)
    rl.allow("b", 0.0)
    rl.allow("a", 0.0)  # a is now the most recent
    rl.allow("c", 0.0)  # forgets b
    assert rl.allow("a", 0.0) is False  # still tracked: its bucket is empty
    assert rl.allow("b", 0.0) is True  # forgotten, so it starts afresh
    assert len(rl) == 2


def test_many_hosts_stay_bounded() -> None:
    rl = HostRateLimiter(rate=1.0, burst=1, max_hosts=100)
    for i in range(10_000):
        rl.allow(i, float(i))
    assert len(rl) == 100


def test_clock_stepping_back_does_not_refill() -> None:
    rl = HostRateLimiter(rate=1.0, burst=1, max_hosts=10)
    assert rl.allow("a", 100.0)
    assert not rl.allow("a", 50.0)
    assert not rl.allow("a", 100.5)
    assert rl.allow("a", 101.0)


@pytest.mark.parametrize(("rate", "burst", "hosts"), [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_rejects_nonsense_settings(rate: float, burst: int, hosts: int) -> None:
    with pytest.raises(ValueError):
        HostRateLimiter(rate, burst, hosts)
