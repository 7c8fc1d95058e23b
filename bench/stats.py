"""Latency statistics for the benchmark: pure functions over lists of seconds."""

from __future__ import annotations

import math
from collections.abc import Sequence


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of ``values`` by nearest rank (q in [0, 1]); 0.0 for no values."""
    if not values:
        return 0.0
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    s = sorted(values)
    rank = max(1, math.ceil(q * len(s) - 1e-9))  # the epsilon keeps 0.5 * 100 at rank 50, not 51
    return s[min(len(s), rank) - 1]


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / mean / max in milliseconds and the total in seconds of one series of operations."""
    n = len(seconds)
    total = float(sum(seconds))
    return {"n": n, "p50_ms": 1e3 * quantile(seconds, 0.5), "p99_ms": 1e3 * quantile(seconds, 0.99),
            "mean_ms": 1e3 * total / n if n else 0.0, "max_ms": 1e3 * max(seconds, default=0.0),
            "total_s": total}


def minus(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Element-wise ``a - b`` over the common length (our share = whole latency - NAT2's round trip)."""
    return [x - y for x, y in zip(a, b, strict=False)]


def cpu_per_1k(cpu_seconds: float, operations: int) -> float | None:
    """CPU seconds spent per 1000 operations (None when nothing was done)."""
    return 1000.0 * cpu_seconds / operations if operations else None
