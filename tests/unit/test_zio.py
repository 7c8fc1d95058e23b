"""shared/zio.py: plain ZeroMQ sockets on the loop, edge-triggered FD drained completely."""

from __future__ import annotations

import asyncio
import os
import tempfile

import zmq

from shared.zio import BUDGET, ZPump


async def _finish(done: asyncio.Future[None], ctx: zmq.Context, *pumps: ZPump) -> None:
    """Wait (bounded) for ``done``, then close the pumps and the context."""
    try:
        await asyncio.wait_for(done, 10)
    finally:
        for p in pumps:
            p.close()
        ctx.term()


def test_burst_larger_than_a_wake_up_is_all_answered() -> None:
    """More requests than one wake-up handles, sent before the server reads any: every one is
    answered (a missed edge would leave the rest unread until the next message)."""

    async def run(endpoint: str) -> list[bytes]:
        ctx = zmq.Context()
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.bind(endpoint)
        dealer.connect(endpoint)
        got: list[bytes] = []
        done = asyncio.get_running_loop().create_future()

        def echo(frames: list[bytes]) -> None:
            server.send([frames[0], b"re:" + frames[1]])

        server = ZPump(router, echo)

        def reply(frames: list[bytes]) -> None:
            got.append(frames[0])
            if len(got) == count and not done.done():
                done.set_result(None)

        client = ZPump(dealer, reply)
        for i in range(count):
            client.send([str(i).encode()])
        await _finish(done, ctx, client, server)
        return got

    count = 3 * BUDGET + 7
    with tempfile.TemporaryDirectory() as d:
        got = asyncio.run(run(f"ipc://{os.path.join(d, 's')}"))
    assert got == [f"re:{i}".encode() for i in range(count)]


def test_sends_wait_in_order_while_the_socket_cannot_take_them() -> None:
    """A DEALER with no peer yet and a high-water mark of 1: sends are held, in order, and go
    out once the peer is there (nothing dropped, nothing blocks the loop)."""

    async def run(endpoint: str) -> list[bytes]:
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.SNDHWM, 1)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # no queue before a peer is connected
        dealer.connect(endpoint)
        client = ZPump(dealer, lambda f: None)
        assert all(client.send([str(i).encode()]) for i in range(50))
        await asyncio.sleep(0.05)
        router = ctx.socket(zmq.ROUTER)
        router.bind(endpoint)
        got: list[bytes] = []
        done = asyncio.get_running_loop().create_future()

        def serve(frames: list[bytes]) -> None:
            got.append(frames[1])
            if len(got) == 50 and not done.done():
                done.set_result(None)

        server = ZPump(router, serve)
        await _finish(done, ctx, client, server)
        return got

    with tempfile.TemporaryDirectory() as d:
        got = asyncio.run(run(f"ipc://{os.path.join(d, 's')}"))
    assert got == [str(i).encode() for i in range(50)]
