"""The UPnP HTTP server on loopback: its tolerance of a connection closed without a request
(docs/upnp.md "Tolerances": nothing is sent back, a debug line only), and the two root
devices' URLs (docs/upnp.md "Both IGD versions by default")."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import cast

import pytest

from controld.core.service import Iwf
from controld.core.stats import Stats
from controld.upnp.description import gateway
from controld.upnp.http import UpnpHttpServer
from controld.upnp.igd import IgdActions
from shared.deadlines import Deadlines


async def _exchange(data: bytes) -> bytes:
    gw = gateway("both", lambda k: k)
    no_core = cast(Iwf, SimpleNamespace(stats=Stats()))  # no action reaches the core here, only the counters
    server = UpnpHttpServer(gw, actions=IgdActions(no_core, gw), lan_subnets=lambda: ["127.0.0.0/8"])
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


def test_each_device_names_its_own_connection_service() -> None:
    l3f = "urn:schemas-upnp-org:service:Layer3Forwarding:1"
    body = (f'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
            f'<u:GetDefaultConnectionService xmlns:u="{l3f}"/></s:Body></s:Envelope>').encode()

    def ask(path: str) -> bytes:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nSOAPACTION: \"{l3f}#GetDefaultConnectionService\"\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        return asyncio.run(_exchange(head + body))

    assert b"uuid:uuid_wcd:WANConnectionDevice:1,urn:upnp-org:serviceId:WANIPConn1" in ask("/ctl/L3F")
    assert b"uuid:uuid_wcd2:WANConnectionDevice:2,urn:upnp-org:serviceId:WANIPConn1" in ask("/igd2/ctl/L3F")


def test_an_action_past_its_deadline_is_answered_408_and_cancelled() -> None:
    """The fast path's request deadline (a shared.deadlines queue): the waiting action is
    cancelled, as asyncio.timeout did, and the control point hears 408 rather than nothing."""
    wan = "urn:schemas-upnp-org:service:WANIPConnection:1"
    body = (f'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
            f'<u:GetSpecificPortMappingEntry xmlns:u="{wan}"><NewRemoteHost></NewRemoteHost>'
            f'<NewExternalPort>80</NewExternalPort><NewProtocol>TCP</NewProtocol>'
            f'</u:GetSpecificPortMappingEntry></s:Body></s:Envelope>').encode()
    head = (f"POST /ctl/WANIPCn HTTP/1.1\r\nHost: 127.0.0.1\r\nSOAPACTION: \"{wan}#GetSpecificPortMappingEntry\"\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    cancelled: list[bool] = []

    async def main() -> bytes:
        gw = gateway("both", lambda k: k)
        no_core = cast(Iwf, SimpleNamespace(stats=Stats()))
        server = UpnpHttpServer(gw, actions=IgdActions(no_core, gw), lan_subnets=lambda: ["127.0.0.0/8"])

        async def stuck(*_: object) -> dict[str, str | int]:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return {}

        server.actions.handle = stuck  # type: ignore[method-assign,assignment]  # an action that never ends
        server.request_deadlines = Deadlines(0.2)
        port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + body)
            await writer.drain()
            got = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await asyncio.sleep(0.05)
            return got
        finally:
            server.close()

    assert asyncio.run(main()).startswith(b"HTTP/1.1 408 ")
    assert cancelled == [True]
