"""controld's side of the natd link: requests with ids and deadlines, events by subscription.

Plain ZeroMQ sockets on the loop (shared/zio.py): a reply resolves its waiting call straight
from the socket's reader callback, with no task or poller in between.

On tcp:// both sockets are CURVE clients (keys from ``--curve-dir``, made by
``igdpcp-natd --gen-keys``); natd refuses any other peer. ZeroMQ reconnects by itself
when natd restarts; the heartbeat's boot id tells the IWF to re-sync (Iwf.on_natd_event).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

import zmq

from shared import wire
from shared.daemon import curve_client, needs_curve
from shared.deadlines import Deadlines, expire
from shared.zio import Frames, ZPump

# first retry, back-off ceiling when natd is away: a connect() on a local socket ten times a second
# while natd is down finds a restarted natd, and re-syncs its forwards, within 0.1 s of its start
RECONNECT_MS = (100, 100)
MAX_TIMEOUT_LENGTHS = 8  # distinct call timeouts with a shared queue
MAX_EVENTS_QUEUED = 10_000  # events read but not yet handled (bounded; natd's heartbeat repeats)

log = logging.getLogger("controld.natd")


class NatdError(RuntimeError):
    """natd refused or failed a request, or did not answer in time."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class NatdLink:
    def __init__(self, rpc: str, events: str, on_event: Callable[[wire.Message], Awaitable[None]],
                 curve_dir: str | None = None) -> None:
        for ep in (rpc, events):
            if needs_curve(ep) and not curve_dir:
                raise SystemExit(f"controld: {ep} needs CURVE keys: pass --curve-dir (see igdpcp-natd --gen-keys)")
        self.ctx = zmq.Context()
        self.dealer = self._socket(zmq.DEALER, rpc, curve_dir)
        self.sub = self._socket(zmq.SUB, events, curve_dir, subscribe=True)
        self.on_event = on_event
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[wire.Message]] = {}
        self._timeouts: dict[float, Deadlines] = {}  # by length (shared.deadlines: no heap work per call)
        self._rpc: ZPump | None = None  # made on the running loop, by the first call or run()
        self._events: asyncio.Queue[wire.Message] | None = None

    def _socket(self, kind: int, endpoint: str, curve_dir: str | None, subscribe: bool = False) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS[0])
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MS[1])
        if subscribe:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        if needs_curve(endpoint) and curve_dir:
            curve_client(sock, curve_dir)
        sock.connect(endpoint)
        return sock

    def _pump(self) -> ZPump:
        if self._rpc is None:
            self._rpc = ZPump(self.dealer, self._reply)
        return self._rpc

    async def call(self, msg: wire.Message, timeout: float = 5.0) -> wire.Message:
        """Send a request and wait for its reply; natd's Error replies raise NatdError.

        The request carries its deadline, so natd never acts on it after we gave up.
        """
        rid = next(self._ids)
        fut: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        if not self._pump().send([wire.encode(msg, rid, int((time.time() + timeout) * 1000))]):
            raise NatdError("busy", f"too many requests to natd queued; {msg.OP} not sent")
        self._pending[rid] = fut
        deadline = self._deadlines(timeout).call_later(functools.partial(expire, fut))
        try:
            reply = await fut
        except TimeoutError:
            raise NatdError("timeout", f"natd did not answer {msg.OP} within {timeout} s") from None
        finally:
            deadline.cancel()
            self._pending.pop(rid, None)
        if isinstance(reply, wire.Error):
            raise NatdError(reply.code, reply.message)
        return reply

    def _deadlines(self, seconds: float) -> Deadlines:
        """The shared timeouts of one length (a handful of lengths are used; more get their own)."""
        d = self._timeouts.get(seconds)
        if d is None:
            d = Deadlines(seconds)
            if len(self._timeouts) < MAX_TIMEOUT_LENGTHS:
                self._timeouts[seconds] = d
        return d

    def _reply(self, frames: Frames) -> None:
        got = _decode(frames, "reply")
        if got is None:
            return
        msg, rid = got
        fut = self._pending.get(rid) if rid is not None else None
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _event(self, frames: Frames) -> None:
        got = _decode(frames, "event")
        if got is None:
            return
        msg = got[0]
        assert self._events is not None
        try:
            self._events.put_nowait(msg)
        except asyncio.QueueFull:
            log.warning("dropped %s event from natd: %d events not handled yet", msg.OP, MAX_EVENTS_QUEUED)

    async def run(self) -> None:
        """Receive replies and events until cancelled; events are handled one at a time, in order."""
        self._pump()
        self._events = asyncio.Queue(MAX_EVENTS_QUEUED)
        events = ZPump(self.sub, self._event)
        try:
            while True:
                msg = await self._events.get()
                try:
                    await self.on_event(msg)
                except Exception:  # one bad event must not stop the link
                    log.exception("handling %s event failed", msg.OP)
        finally:
            events.close()

    def close(self) -> None:
        for d in self._timeouts.values():
            d.close()
        if self._rpc is not None:
            self._rpc.close()
        self.dealer.close()
        self.sub.close()
        self.ctx.term()


def _decode(frames: Frames, what: str) -> tuple[wire.Message, int | None] | None:
    """A message from natd (its last frame), or None (logged) when it is not one."""
    try:
        return wire.decode(frames[-1])
    except wire.WireError as exc:
        log.warning("bad %s from natd: %s", what, exc)
        return None
