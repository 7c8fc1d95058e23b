"""Per-host token buckets, bounded: one LAN host cannot flood the core or NAT2 through us.

Time is passed in; the number of hosts tracked is capped and the least recently seen host
is forgotten first (a forgotten host starts again with a full bucket).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class HostRateLimiter:
    """``rate`` requests a second on average, bursts of ``burst``, for at most ``max_hosts``."""

    def __init__(self, rate: float, burst: int, max_hosts: int) -> None:
        if rate <= 0 or burst < 1 or max_hosts < 1:
            raise ValueError("rate, burst and max_hosts must be positive")
        self.rate = rate
        self.burst = burst
        self.max_hosts = max_hosts
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def allow(self, host: Hashable, now: float) -> bool:
        """Spend one token of ``host``'s bucket if it has one; False means drop or NO_RESOURCES."""
        bucket = self._buckets.get(host)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[host] = bucket
            while len(self._buckets) > self.max_hosts:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(host)
            # a clock that steps back refills nothing rather than draining the bucket
            bucket.tokens = min(float(self.burst), bucket.tokens + max(0.0, now - bucket.stamp) * self.rate)
            bucket.stamp = max(bucket.stamp, now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def __len__(self) -> int:
        return len(self._buckets)
