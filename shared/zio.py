"""ZeroMQ sockets on the asyncio loop without zmq.asyncio: plain sockets, non-blocking calls,
``loop.add_reader`` on the socket's ``zmq.FD``.

``zmq.FD`` is edge-triggered: it becomes readable when the socket's state *may* have changed,
and any call on the socket (a send included) can consume that edge. So every wake-up (and every
send) re-checks ``zmq.EVENTS`` and drains until nothing is left; a drain that stops at its
budget schedules the next one itself, so one busy socket cannot starve the loop. This saves
zmq.asyncio's future, poller and task hops per message (the controld-natd round trip is most
of an AddPortMapping's cost otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import cast

import zmq

log = logging.getLogger("shared.zio")

BUDGET = 256  # messages handled per wake-up before yielding to the loop
MAX_QUEUED = 10_000  # outgoing messages held while the socket cannot send (its HWM is reached)

Frames = list[bytes]
# plain ints: pyzmq's IntFlag constants cost a microsecond per ``&`` (enum machinery), several per message
_EVENTS, _POLLIN, _POLLOUT, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)


class ZPump:
    """One socket on the running loop: ``on_message(frames)`` (sync) for each message received,
    :meth:`send` that never blocks (held in a bounded queue while the socket
    cannot take it)."""

    def __init__(self, sock: zmq.Socket, on_message: Callable[[Frames], None]) -> None:
        self.sock = sock
        self.on_message = on_message
        self.loop = asyncio.get_running_loop()
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._out: deque[Frames] = deque()
        self._scheduled = False
        self._closed = False
        self.loop.add_reader(self._fd, self._wake)
        self._schedule()  # messages that came before the reader was registered gave no edge

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        sock = self.sock
        for _ in range(BUDGET):
            events = cast(int, sock.getsockopt(_EVENTS))
            if self._out and events & _POLLOUT and self._flush():
                continue  # EVENTS again: the sends may have taken an edge (writable again, or a message)
            if not events & _POLLIN:
                return
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                continue
            try:
                self.on_message(frames)
            except Exception:  # one bad message must not stop the socket
                log.exception("handling a message failed")
            if self._closed:
                return
        self._schedule()  # more left: the loop runs its other callbacks first

    def _flush(self) -> bool:
        """Send what is held, in order, until the socket takes no more; True if anything went."""
        sent = False
        while self._out:
            try:
                self.sock.send_multipart(self._out[0], _NOBLOCK)
            except zmq.Again:
                break
            self._out.popleft()
            sent = True
        return sent

    def send(self, frames: Frames) -> bool:
        """Send now, or queue while the socket cannot take it; False if the queue is full (dropped)."""
        if self._closed:
            return False
        if not self._out:
            try:
                self.sock.send_multipart(frames, _NOBLOCK)
            except zmq.Again:
                self._out.append(frames)
            else:
                # ZeroMQ's I/O thread moves the message; woken by this send, it is often queued on
                # this CPU behind the loop's next callbacks. Yielding lets it go first (measured:
                # natd's reply reached controld ~100 us sooner with both on a busy 2-core machine).
                os.sched_yield()
            self._check()
            return True
        if len(self._out) >= MAX_QUEUED:
            return False
        self._out.append(frames)
        return True

    def _check(self) -> None:
        """After a send: the send may have taken the edge of a message that came meanwhile."""
        if cast(int, self.sock.getsockopt(_EVENTS)) & _POLLIN or self._out:
            self._schedule()

    def close(self) -> None:
        """Unregister and close the socket."""
        if not self._closed:
            self._closed = True
            if not self.loop.is_closed():
                self.loop.remove_reader(self._fd)
            self.sock.close()
