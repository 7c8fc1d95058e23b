"""controld's side of the natd link: requests with ids and deadlines, events by subscription."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from shared import wire

log = logging.getLogger("controld.natd")


class NatdError(RuntimeError):
    """natd refused or failed a request, or did not answer in time."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class NatdLink:
    def __init__(self, rpc: str, events: str, on_event: Callable[[wire.Message], Awaitable[None]]) -> None:
        self.ctx = zmq.asyncio.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
        self.dealer.connect(rpc)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(events)
        self.on_event = on_event
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[wire.Message]] = {}

    async def call(self, msg: wire.Message, timeout: float = 5.0) -> wire.Message:
        """Send a request and wait for its reply; natd's Error replies raise NatdError."""
        rid = next(self._ids)
        fut: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.dealer.send(wire.encode(msg, rid))
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise NatdError("timeout", f"natd did not answer {msg.OP} within {timeout} s") from None
        finally:
            self._pending.pop(rid, None)
        if isinstance(reply, wire.Error):
            raise NatdError(reply.code, reply.message)
        return reply

    async def _replies(self) -> None:
        while True:
            data = await self.dealer.recv()
            try:
                msg, rid = wire.decode(data)
            except wire.WireError as exc:
                log.warning("bad reply from natd: %s", exc)
                continue
            fut = self._pending.get(rid) if rid is not None else None
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def _events(self) -> None:
        while True:
            frames = await self.sub.recv_multipart()
            try:
                msg, _ = wire.decode(frames[-1])
            except wire.WireError as exc:
                log.warning("bad event from natd: %s", exc)
                continue
            try:
                await self.on_event(msg)
            except Exception:  # one bad event must not stop the link
                log.exception("handling %s event failed", msg.OP)

    async def run(self) -> None:
        """Receive replies and events until cancelled."""
        await asyncio.gather(self._replies(), self._events())

    def close(self) -> None:
        self.dealer.close()
        self.sub.close()
        self.ctx.term()
