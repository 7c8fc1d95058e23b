"""The UPnP HTTP server hands the page's paths to the page (controld/upnp/http.py), after its own
LAN-only and Host checks, with form bodies up to 8 KB; the description names the page."""

from __future__ import annotations

import asyncio

from controld.upnp.description import Device
from controld.upnp.http import WEB_MAX_BODY, UpnpHttpServer
from controld.web.handler import HttpRequest, HttpResponse


def exchange(lan: list[str], raw: bytes) -> tuple[bytes, list[HttpRequest]]:
    """One request to a server on 127.0.0.1 whose LAN is ``lan``; (the answer, what the page got)."""
    seen: list[HttpRequest] = []

    async def page(req: HttpRequest) -> HttpResponse:
        seen.append(req)
        return HttpResponse(200, [("Content-Type", "text/plain"), ("Set-Cookie", "x=1")], b"page")

    async def main() -> bytes:
        device = Device("u1", "u2", "u3")
        device.present_at("http://127.0.0.1:1/igdpcp/")
        server = UpnpHttpServer(device, None, lambda: lan, None, web=("/igdpcp", page))  # type: ignore[arg-type]
        port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw.replace(b"PORT", str(port).encode()))
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:  # dropped without an answer
                answer = b""
            writer.close()
            return answer
        finally:
            server.close()
    return asyncio.run(asyncio.wait_for(main(), 20)), seen


LAN = ["127.0.0.0/8"]


def test_page_paths_reach_the_page_with_headers_body_and_client() -> None:
    answer, [req] = exchange(LAN, b"POST /igdpcp/add?x=1 HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n"
                                  b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 5\r\n\r\na=b&c")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Set-Cookie: x=1\r\n" in answer and answer.endswith(b"page")
    assert (req.method, req.target, req.body, req.client) == ("POST", "/igdpcp/add?x=1", b"a=b&c", "127.0.0.1")
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    answer, [req] = exchange(LAN, b"GET /igdpcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert req.target == "/igdpcp" and answer.endswith(b"page")


def test_the_servers_own_checks_come_first() -> None:
    answer, seen = exchange(LAN, b"GET /igdpcp/ HTTP/1.1\r\nHost: router.lan\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 ") and seen == []  # a DNS name: rebinding
    answer, seen = exchange(["10.0.0.0/8"], b"GET /igdpcp/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer == b"" and seen == []  # not from the LAN: dropped
    big = WEB_MAX_BODY + 1
    answer, seen = exchange(LAN, b"POST /igdpcp/add HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                            + str(big).encode() + b"\r\n\r\n")  # refused on its length, unread
    assert answer.startswith(b"HTTP/1.1 413 ") and seen == []
    answer, seen = exchange(LAN, b"GET /igdpcpx HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ") and seen == []  # only the page's own path


def test_description_names_the_page() -> None:
    device = Device("u1", "u2", "u3", igd_version=2)
    device.present_at("http://192.168.1.1:5000/igdpcp/")
    for view in (device, device.view("")):
        assert b"<presentationURL>http://192.168.1.1:5000/igdpcp/</presentationURL></device></root>" in \
            view.root_xml()
    assert device.view("Microsoft-Windows/6.1 UPnP/1.0").root_xml().count(b"<presentationURL>") == 1  # IGD:1 view
