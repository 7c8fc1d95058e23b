"""A minimal Chrome DevTools Protocol client for the page tests: Debian's headless Chromium,
one browser per test module, a fresh browser context (own cookies) per page."""

from __future__ import annotations

import asyncio
import base64
import http.server
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-proxy-server", "--window-size=1100,720", "--hide-scrollbars", "--remote-debugging-port=0"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """A headless Chromium process and its DevTools endpoint."""

    def __init__(self, binary: str, timeout: float = 30.0) -> None:
        self.profile = tempfile.mkdtemp(prefix="igdpcp-chromium-")
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            try:
                with open(port_file) as f:
                    port, path = f.read().split("\n")[:2]
                self.ws_url = f"ws://127.0.0.1:{int(port)}{path}"
                return
            except (OSError, ValueError):
                time.sleep(0.1)
        self.close()
        raise RuntimeError("chromium did not open its DevTools port")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab in its own browser context, driven over the flattened CDP session."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession) -> None:
        self.ws, self.http = ws, session
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.session_id: str | None = None
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, browser: Browser) -> Page:
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(browser.ws_url, max_msg_size=64 * 1024 * 1024)
        page = cls(ws, http)
        ctx = await page.send("Target.createBrowserContext", browser_level=True)
        target = await page.send("Target.createTarget", browser_level=True, url="about:blank",
                                 browserContextId=ctx["browserContextId"])
        att = await page.send("Target.attachToTarget", browser_level=True, targetId=target["targetId"],
                              flatten=True)
        page.session_id = att["sessionId"]
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.put_nowait(data)

    async def send(self, method: str, browser_level: bool = False, **params: Any) -> dict[str, Any]:
        i = next(self.ids)
        msg: dict[str, Any] = {"id": i, "method": method, "params": params}
        if not browser_level and self.session_id:
            msg["sessionId"] = self.session_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_str(json.dumps(msg))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = await asyncio.wait_for(self.events.get(), max(0.01, deadline - time.monotonic()))
            if ev["method"] == name:
                return ev

    def _drain(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()

    async def goto(self, url: str) -> None:
        self._drain()
        await self.send("Page.navigate", url=url)
        await self.wait_event("Page.loadEventFired")

    async def eval(self, expr: str) -> Any:
        r = await self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def click_and_wait(self, selector: str) -> None:
        """Click (e.g. a submit button) and wait for the page it leads to."""
        self._drain()
        await self.eval(f"document.querySelector({json.dumps(selector)}).click()")
        await self.wait_event("Page.loadEventFired")

    async def screenshot(self, path: str) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        self.reader.cancel()
        await self.ws.close()
        await self.http.close()


def in_page(browser: Browser, fn: Callable[[Page], Awaitable[None]], timeout: float = 120) -> None:
    """Run ``fn`` on a fresh page (own browser context, own cookies) of ``browser``, bounded in time."""
    async def run() -> None:
        page = await Page.open(browser)
        try:
            await fn(page)
        finally:
            await page.close()
    asyncio.run(asyncio.wait_for(run(), timeout))


def other_site(target: str) -> http.server.HTTPServer:
    """Another site (another origin) on 127.0.0.1 whose page at once posts a delete, with a
    guessed CSRF token, to the router's page at ``target``; served from a daemon thread
    (``shutdown()`` and ``server_close()`` it after use)."""
    page = (f'<form id="f" method="post" action="{target}/igdpcp/delete">'
            '<input name="id" value="1"><input name="csrf" value="0123456789abcdef0123456789abcdef"></form>'
            "<script>document.getElementById('f').submit()</script>").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
