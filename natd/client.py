"""A small synchronous client of natd's ZeroMQ API, for tools, benchmarks and tests.

controld uses the asyncio client in controld/natd_link.py; this one blocks, which is
what a command-line tool or a test wants. Same schema (shared.wire), same CURVE keys.
"""

from __future__ import annotations

import itertools
import time

import zmq

from shared import wire
from shared.daemon import curve_client, needs_curve


class NatdCallError(RuntimeError):
    """natd answered with an Error reply (``code`` as sent) or not at all (``timeout``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class NatdClient:
    """DEALER for requests (and a SUB for events when ``events`` is given)."""

    def __init__(self, rpc: str, events: str | None = None, curve_dir: str | None = None,
                 timeout: float = 10.0) -> None:
        self.ctx = zmq.Context()
        self.timeout = timeout
        self.dealer = self._sock(zmq.DEALER, rpc, curve_dir)
        self.sub = None
        if events:
            self.sub = self._sock(zmq.SUB, events, curve_dir)
            self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._ids = itertools.count(1)

    def _sock(self, kind: int, endpoint: str, curve_dir: str | None) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if needs_curve(endpoint) and curve_dir:
            curve_client(sock, curve_dir)
        sock.connect(endpoint)
        return sock

    def send_raw(self, *frames: bytes) -> None:
        """Send arbitrary frames (hostile-input tests)."""
        self.dealer.send_multipart(list(frames))

    def recv_raw(self, timeout: float | None = None) -> bytes | None:
        """The next reply frame, or None after ``timeout`` seconds."""
        if not self.dealer.poll(int(1000 * (self.timeout if timeout is None else timeout))):
            return None
        return self.dealer.recv()

    def call(self, msg: wire.Message, timeout: float | None = None, deadline_ms: int | None = None) -> wire.Message:
        """Send one request and return its reply; an Error reply raises NatdCallError."""
        rid = next(self._ids)
        timeout = self.timeout if timeout is None else timeout
        if deadline_ms is None:
            deadline_ms = int((time.time() + timeout) * 1000)
        self.dealer.send(wire.encode(msg, rid, deadline_ms))
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:  # bounded: skips stale replies of earlier calls
            data = self.recv_raw(left)
            if data is None:
                break
            reply, got = wire.decode(data)
            if got != rid:
                continue
            if isinstance(reply, wire.Error):
                raise NatdCallError(reply.code, reply.message)
            return reply
        raise NatdCallError("timeout", f"natd did not answer {msg.OP} within {timeout} s")

    def next_event(self, op: str | None = None, timeout: float = 5.0) -> wire.Message | None:
        """The next event (of type ``op`` if given) within ``timeout`` seconds, else None."""
        assert self.sub is not None, "no events endpoint"
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not self.sub.poll(int(left * 1000) + 1):
                return None
            msg, _ = wire.decode(self.sub.recv_multipart()[-1])
            if op is None or msg.OP == op:
                return msg
        return None

    def close(self) -> None:
        self.dealer.close()
        if self.sub is not None:
            self.sub.close()
        self.ctx.term()
