"""natd's PcpExchange request end to end on loopback: the reply controld gets for an answered
exchange, an unanswered one, one a newer request took over, and one shed at natd's bound.

A UDP socket on 127.0.0.1:5351 plays the PCP server (the real one, miniupnpd, is in the
namespace suites); natd's relay sends from 127.0.0.1 and its reply goes to a list instead of
the ROUTER socket."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared import pcp, wire
from shared.const import DISCARD_PORT, PCP_SERVER_PORT

SERVER = "127.0.0.1"


def _probe(nonce: bytes) -> bytes:
    """The discard-port probe: the one MAP natd relays without a binding or THIRD_PARTY."""
    data = pcp.MapData(nonce, 6, DISCARD_PORT, DISCARD_PORT, pcp.any_address(4))
    return pcp.encode_request(pcp.Request(pcp.Opcode.MAP, 120, ipaddress.IPv4Address("0.0.0.0"), data))


def _answer(request: bytes) -> bytes:
    req = pcp.decode_request(request)
    assert req.map is not None
    grant = pcp.MapData(req.map.nonce, 6, req.map.internal_port, 40_000, ipaddress.IPv4Address("198.51.100.7"))
    return pcp.encode_response(pcp.Response(pcp.Opcode.MAP, pcp.Result.SUCCESS, 120, 1000, grant))


class _Rpc:
    """Stands in for natd's ROUTER pump: what natd sent back, decoded."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, wire.Message, int | None]] = []
        self.arrived = asyncio.Event()

    def send(self, frames: list[bytes]) -> bool:
        msg, rid = wire.decode(frames[1])
        self.sent.append((frames[0], msg, rid))
        self.arrived.set()
        return True


async def _natd(monkeypatch: pytest.MonkeyPatch) -> Any:
    from natd import main, wan

    args = main.build_parser().parse_args(["--wan-if", "w", "--lan-if", "l", "--rpc", "ipc:///x",
                                           "--events", "ipc:///y"])
    d = main.Natd(args)
    d.ifs = wan.IfState(SERVER, None, (), ())
    monkeypatch.setattr(d.relay, "wan_if", None)  # no SO_BINDTODEVICE on loopback
    await d.relay.open(SERVER)
    d.rpc = _Rpc()  # type: ignore[assignment]  # (a list, not the ROUTER socket)
    return d


def _exchange(d: Any, ident: bytes, rid: int, nonce: bytes, wait_ms: int) -> None:
    d._serve([ident, wire.encode(wire.PcpExchange(SERVER, _probe(nonce), None, wait_ms), rid)])


async def _replies(d: Any, n: int, timeout: float = 2.0) -> list[tuple[bytes, wire.Message, int | None]]:
    async with asyncio.timeout(timeout):
        while len(d.rpc.sent) < n:
            d.rpc.arrived.clear()
            await d.rpc.arrived.wait()
    return d.rpc.sent


def _server() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((SERVER, PCP_SERVER_PORT))
    except OSError as exc:
        s.close()
        pytest.skip(f"cannot bind the stand-in PCP server: {exc}")
    s.settimeout(2.0)
    return s


@contextlib.asynccontextmanager
async def _bed(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[socket.socket, Any]]:
    """The stand-in server and a natd relaying to it; both closed however the test ends."""
    srv = _server()
    try:
        d = await _natd(monkeypatch)
    except BaseException:
        srv.close()
        raise
    try:
        yield srv, d
    finally:
        srv.close()
        d.relay.close()
        d.ctx.term()


def test_an_answered_exchange_replies_with_the_servers_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        async with _bed(monkeypatch) as (srv, d):
            _exchange(d, b"ctl", 7, b"a" * 12, 2000)
            request, peer = await asyncio.to_thread(srv.recvfrom, 1100)
            assert d.rpc.sent == []  # nothing before the answer
            srv.sendto(_answer(request), peer)
            [(ident, msg, rid)] = await _replies(d, 1)
            assert (ident, rid) == (b"ctl", 7)
            assert isinstance(msg, wire.PcpAnswer) and msg.packet is not None
            resp = pcp.decode_response(msg.packet)
            assert resp.map is not None and (resp.map.nonce, resp.map.external_port) == (b"a" * 12, 40_000)
            assert d.relay.waiting == {} and d._waits == set()  # nothing held after the reply

    asyncio.run(run())


def test_no_answer_in_time_and_a_superseded_exchange_reply_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        async with _bed(monkeypatch) as (srv, d):
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            _exchange(d, b"ctl", 1, b"b" * 12, 100)  # nobody answers
            [(_, msg, rid)] = await _replies(d, 1)
            assert (msg, rid) == (wire.PcpAnswer(), 1)
            assert 0.09 <= loop.time() - t0 < 1.0  # at its wait, not before, not at some later sweep
            assert d.relay.waiting == {} and d._waits == set()

            _exchange(d, b"ctl", 2, b"c" * 12, 2000)
            _exchange(d, b"ctl", 3, b"c" * 12, 2000)  # a retransmission: same key, takes over
            first = (await _replies(d, 2))[1]
            assert first[1:] == (wire.PcpAnswer(), 2)  # the older wait ends at once, without an answer
            await asyncio.to_thread(srv.recvfrom, 1100)
            request, peer = await asyncio.to_thread(srv.recvfrom, 1100)
            srv.sendto(_answer(request), peer)
            _, msg, rid = (await _replies(d, 3))[2]
            assert rid == 3 and isinstance(msg, wire.PcpAnswer) and msg.packet is not None
            assert d.relay.waiting == {} and d._waits == set()

    asyncio.run(run())


def test_an_exchange_over_the_bound_is_refused_busy_and_holds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from natd import main

    async def run() -> None:
        async with _bed(monkeypatch) as (srv, d):
            monkeypatch.setattr(main, "MAX_WAITS", 1)
            _exchange(d, b"ctl", 1, b"d" * 12, 2000)
            _exchange(d, b"ctl", 2, b"e" * 12, 2000)
            [(_, msg, rid)] = await _replies(d, 1)
            assert rid == 2 and isinstance(msg, wire.Error) and msg.code == "busy"
            assert len(d.relay.waiting) == 1 and len(d._waits) == 1  # only the first still waits

    asyncio.run(run())
