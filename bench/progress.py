"""A plain progress bar on stderr for long phases (no dependency; quiet when stderr is not a tty)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress("adds", total) as p: ... p.step()``: one redrawn line, at most 10 redraws a second."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.label, self.total, self.width = label, max(total, 1), width
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._t0 = time.monotonic()
        self._last = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def render(self, now: float | None = None) -> str:
        """The bar as text: label, bar, count, elapsed and estimated time left."""
        now = time.monotonic() if now is None else now
        frac = min(1.0, self.done / self.total)
        filled = int(frac * self.width)
        elapsed = now - self._t0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        return (f"{self.label:<22} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.done}/{self.total} {elapsed:6.1f}s left {eta:6.1f}s")

    def step(self, k: int = 1) -> None:
        """Count ``k`` more done; redraw if due."""
        self.done += k
        now = time.monotonic()
        if self._tty and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self.stream.write("\r" + self.render(now))
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tty:
            self.stream.write("\r" + self.render() + "\n")
        else:  # a log file gets one line per phase
            self.stream.write(self.render() + "\n")
        self.stream.flush()
