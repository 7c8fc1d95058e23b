"""The one guard around every handler of untrusted input, and log lines peers cannot forge.

Every handler that parses what a peer sent (HTTP/SOAP/GENA, SSDP, the admin socket,
natd's PCP relay) runs its work inside :meth:`Guard.run` (or catches ``Exception`` and
calls :meth:`Guard.unexpected`): whatever the input raises, the handler answers 4xx or
drops the input, frees what it holds, and the daemon lives on. An exception nobody
expected is logged with the peer, at most ``burst`` times per ``window`` seconds, so a
flood of one bad input cannot flood the log either. :class:`SafeFormatter` escapes
control characters in every log message, so no peer-supplied string (a request target
with a bare LF, a header) can start a line of its own.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """``text`` with every control character (CR, LF, NUL, ESC, ...) as a visible \\xNN escape."""
    if text.isprintable():  # the common case; every character _CONTROL matches is non-printable
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class SafeFormatter(logging.Formatter):
    """One record, one line: control characters in the message are escaped (tracebacks,
    appended after the message, keep their lines)."""

    _second, _stamp = -1, ""  # the last second formatted: one strftime per second, not per line

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(self.default_time_format, self.converter(second))
        msec = self.default_msec_format
        return msec % (self._stamp, record.msecs) if msec else self._stamp


class RateLimit:
    """At most ``burst`` events per ``window`` seconds; the rest are counted (time passed in)."""

    def __init__(self, burst: int = 5, window: float = 60.0) -> None:
        self.burst, self.window = burst, window
        self.start = -window
        self.used = 0
        self.suppressed = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """Whether one more event may be logged now, and how many were held back before it."""
        if now - self.start >= self.window:
            self.start, self.used = now, 0
        if self.used >= self.burst:
            self.suppressed += 1
            return False, 0
        self.used += 1
        held, self.suppressed = self.suppressed, 0
        return True, held


class Guard:
    """Logs unexpected exceptions of one input handler, rate limited, naming the peer."""

    def __init__(self, log: logging.Logger, what: str, burst: int = 5, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.what, self.clock = log, what, clock
        self.limit = RateLimit(burst, window)
        self.count = 0  # unexpected exceptions seen (logged or not)

    def unexpected(self, peer: object, exc: BaseException) -> None:
        """Log ``exc`` from ``peer``'s input once (rate limited), with its traceback."""
        self.count += 1
        ok, held = self.limit.allow(self.clock())
        if ok:
            more = f" ({held} more not logged)" if held else ""
            self.log.error("%s from %s: unexpected %s: %s%s", self.what, peer, type(exc).__name__,
                           str(exc)[:200], more, exc_info=exc)

    def run(self, peer: object, work: Callable[[], T], default: T) -> T:
        """``work()``, or ``default`` when it raised anything (logged as :meth:`unexpected`)."""
        try:
            return work()
        except Exception as exc:  # the guard: no input may escape its handler
            self.unexpected(peer, exc)
            return default
