"""The UPnP HTTP server's tolerance of a connection closed without a request (docs/upnp.md
"Tolerances"): nothing is sent back and the event is logged at debug only, on loopback."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest

from controld.upnp.description import gateway
from controld.upnp.http import UpnpHttpServer
from controld.upnp.igd import IgdActions


async def _exchange(data: bytes) -> bytes:
    server = UpnpHttpServer(gateway("both", lambda k: k), actions=cast(IgdActions, None),
                            lan_subnets=lambda: ["127.0.0.0/8"])
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await asyncio.sleep(0.05)  # the server's side of the close is logged
        return got
    finally:
        server.close()


def test_connection_closed_without_a_byte_gets_nothing_and_no_info_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="controld.upnp.http")
    assert asyncio.run(_exchange(b"")) == b""
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "closed without a request" in caplog.records[0].getMessage()


def test_a_half_request_is_still_a_bad_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="controld.upnp.http")
    assert asyncio.run(_exchange(b"GET /rootDesc.xml HTTP/1.1\r\n")).startswith(b"HTTP/1.1 400 ")
    assert any(r.levelno == logging.INFO and "bad request" in r.getMessage() for r in caplog.records)


def test_both_descriptions_are_served_over_http() -> None:
    got = asyncio.run(_exchange(b"GET /igd2/rootDesc.xml HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert got.startswith(b"HTTP/1.1 200 ") and b"InternetGatewayDevice:2" in got
