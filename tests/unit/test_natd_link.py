"""controld's natd link on plain ZeroMQ sockets (shared/zio.py) against a ROUTER/PUB pair on ipc."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest
import zmq

from controld.natd_link import NatdError, NatdLink
from shared import wire
from shared.zio import ZPump


def test_calls_events_garbage_and_timeout() -> None:
    """500 calls at once each get their own reply; a garbage reply is ignored; events arrive in
    order; with natd silent a call ends in NatdError("timeout")."""

    async def run(d: str) -> tuple[int, list[int]]:
        rpc, events = f"ipc://{os.path.join(d, 'r')}", f"ipc://{os.path.join(d, 'e')}"
        ctx = zmq.Context()
        router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
        router.bind(rpc)
        pub.bind(events)

        def serve(frames: list[bytes]) -> None:
            env = wire.decode_envelope(frames[1])
            server.send([frames[0], b"\xc1 not msgpack"])  # hostile: logged and dropped
            server.send([frames[0], wire.encode(wire.HelloReply(str(env.rid), None, None, [], []), env.rid)])

        server = ZPump(router, serve)
        heard: list[int] = []

        async def on_event(msg: wire.Message) -> None:
            assert isinstance(msg, wire.Heartbeat)
            heard.append(msg.bindings)

        link = NatdLink(rpc, events, on_event)
        task = asyncio.create_task(link.run())
        try:
            replies = await asyncio.gather(*(link.call(wire.Hello()) for _ in range(500)))
            ids = {r.boot_id for r in replies if isinstance(r, wire.HelloReply)}
            for _ in range(100):  # bounded: the SUB joins within a few beats
                pub.send_multipart([b"heartbeat", wire.encode(wire.Heartbeat("b", 0))])
                await asyncio.sleep(0.01)
                if heard:
                    break
            for n in range(1, 6):
                pub.send_multipart([b"heartbeat", wire.encode(wire.Heartbeat("b", n))])
            for _ in range(100):
                if heard[-1:] == [5]:
                    break
                await asyncio.sleep(0.01)
            server.close()
            with pytest.raises(NatdError) as exc:
                await link.call(wire.Hello(), timeout=0.2)
            assert exc.value.code == "timeout"
        finally:
            task.cancel()
            link.close()
            pub.close()
            ctx.term()
        return len(ids), [n for n in heard if n]

    with tempfile.TemporaryDirectory() as d:
        distinct, heard = asyncio.run(run(d))
    assert distinct == 500
    assert heard == [1, 2, 3, 4, 5]
