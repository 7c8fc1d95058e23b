"""Many timeouts of one length on one loop timer.

``asyncio.timeout()`` and ``loop.call_later()`` each push a TimerHandle on the loop's heap,
and a cancelled one stays there until its time comes. A request to the daemons sets two or
three such timeouts (its deadline, natd's answer, the HTTP linger) and nearly always cancels
them a millisecond later; at hundreds of requests a second that heap work was a visible share
of a request's CPU. Timeouts of one length expire in the order they were set, so one FIFO
holds them: setting and cancelling are O(1), cancelled ones at the head are dropped as new
ones come, and the loop timer is re-armed only when the oldest live one is due.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any


class Deadline:
    """One pending timeout; :meth:`cancel` as on a TimerHandle."""

    __slots__ = ("when", "callback")

    def __init__(self, when: float, callback: Callable[[], object] | None) -> None:
        self.when = when
        self.callback = callback

    def cancel(self) -> None:
        """It will not run (nothing happens if it ran already)."""
        self.callback = None


class Deadlines:
    """Timeouts of ``seconds`` each on the running loop, run in the order they were set."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._queue: deque[Deadline] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def call_later(self, callback: Callable[[], object]) -> Deadline:
        """Run ``callback`` (sync) ``seconds`` from now unless the returned deadline is cancelled."""
        loop = asyncio.get_running_loop()
        queue = self._queue
        while queue and queue[0].callback is None:  # bounded by what is live, not by the request rate
            queue.popleft()
        d = Deadline(loop.time() + self.seconds, callback)
        queue.append(d)
        if self._timer is None:
            self._timer = loop.call_at(queue[0].when, self._due)
        return d

    def _due(self) -> None:
        self._timer = None
        queue = self._queue
        now = asyncio.get_running_loop().time()
        while queue and (queue[0].callback is None or queue[0].when <= now):
            d = queue.popleft()
            callback, d.callback = d.callback, None
            if callback is not None:
                callback()
        if queue and self._timer is None:  # (a callback that set a new timeout armed it already)
            self._timer = asyncio.get_running_loop().call_at(queue[0].when, self._due)

    def __len__(self) -> int:
        """Timeouts held (some may be cancelled ones not dropped yet)."""
        return len(self._queue)

    def close(self) -> None:
        """Drop every pending timeout; none of them runs."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for d in self._queue:
            d.callback = None
        self._queue.clear()


def expire(fut: asyncio.Future[Any]) -> None:
    """A deadline's callback for a waiter on ``fut``: the await raises TimeoutError."""
    if not fut.done():
        fut.set_exception(TimeoutError())
