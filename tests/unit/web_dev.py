"""A tiny asyncio HTTP/1.1 server for controld/web's handler, for the browser tests and by hand:

    .venv/bin/python -m tests.unit.web_dev [PORT]   # a fake core with a few mappings, on 127.0.0.1

One request per connection (Connection: close), as the UPnP HTTP server does.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from controld.adminapi.backend import Origin
from controld.web.handler import HttpRequest, WebApp, WebConfig
from tests.unit.admin_fake import FakeBackend

REASONS = {200: "OK", 301: "Moved Permanently", 303: "See Other", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
           415: "Unsupported Media Type", 429: "Too Many Requests", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable"}


async def serve_one(app: WebApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for ln in lines[1:]:
            if ":" in ln:
                k, v = ln.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0") or 0)
        body = await asyncio.wait_for(reader.readexactly(min(n, 65536)), 5) if n else b""
        peer = writer.get_extra_info("peername")[0]
        resp = await app.handle(HttpRequest(method, target, headers, body, peer, time.monotonic()))
        out = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Status')}",
               f"Content-Length: {len(resp.body)}", "Connection: close"]
        out += [f"{k}: {v}" for k, v in resp.headers]
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + resp.body)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, ConnectionError):
        pass
    finally:
        writer.close()


class WebServed:
    """The page over HTTP on 127.0.0.1 in a thread of its own."""

    def __init__(self, backend: FakeBackend, config: WebConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.backend = backend
        self.app = WebApp(backend, config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(lambda r, w: serve_one(self.app, r, w), host, port)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        self.base = f"http://{host}:{self.port}"

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def main() -> None:
    from controld.web.auth import make_hash

    b = FakeBackend()
    b.seed(Origin.UPNP, "127.0.0.1", "TCP", 8080, 80, "web server")
    b.seed(Origin.PCP, "192.168.1.30", "UDP", 3478, 3478, "voice")
    cfg = WebConfig(password_hash=make_hash("admin-password"))
    s = WebServed(b, cfg, port=int(sys.argv[1]) if len(sys.argv) > 1 else 8088)
    print(f"{s.base}/igdpcp/  (admin password: admin-password); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        s.close()


if __name__ == "__main__":
    main()
