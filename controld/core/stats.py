"""Counters the core keeps for operators (docs/operating.md, "Counters"), bounded and O(1).

Each fact is counted where it happens: front ends count the requests they receive and
the error codes they answer; the service counts PCP round trips, renewals, NAT1 syncs
and natd restarts. :meth:`Stats.snapshot` is what ``igdpcp status`` shows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

RTT_WINDOW = 128  # the PCP RTT median is over this many recent exchanges
MAX_CODES = 64  # distinct error codes kept per origin (codes are few; bounded all the same)


@dataclass
class Stats:
    """Monotonic counters since controld started."""

    requests: dict[str, int] = field(default_factory=dict)  # origin -> requests received
    errors: dict[str, dict[str, int]] = field(default_factory=dict)  # origin -> code -> answers
    rtts: deque[float] = field(default_factory=lambda: deque(maxlen=RTT_WINDOW))  # seconds
    renewals: int = 0  # PCP renewals (and re-creations) sent for live mappings
    resyncs: int = 0  # full NAT1 syncs sent to natd
    natd_restarts: int = 0  # natd boot-id changes seen

    def request(self, origin: str) -> None:
        """A front end received one request."""
        self.requests[origin] = self.requests.get(origin, 0) + 1

    def error(self, origin: str, code: int | str) -> None:
        """A front end answered one request with error ``code`` (its own code)."""
        codes = self.errors.setdefault(origin, {})
        key = str(code)
        if key in codes or len(codes) < MAX_CODES:
            codes[key] = codes.get(key, 0) + 1

    def rtt(self, seconds: float) -> None:
        """One PCP exchange's round trip."""
        self.rtts.append(seconds)

    def rtt_p50_ms(self) -> float | None:
        """The median round trip of the recent exchanges, in ms; None before the first."""
        if not self.rtts:
            return None
        import statistics  # only when the stats are asked for (it imports decimal and fractions)

        return round(statistics.median(self.rtts) * 1000, 2)
