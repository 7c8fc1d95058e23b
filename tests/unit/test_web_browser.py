"""The LAN page in Debian's headless Chromium (DevTools protocol): what a person sees and does.

Screenshots land in the test's tmp dir, and in $IGDPCP_SCREENSHOTS when set (docs/img/ holds
the ones tests/netns/test_operating_web.py took of the real controld on the bed). Skipped when
chromium is not installed; scripts/setup installs it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from controld.adminapi.backend import Origin
from controld.web import auth
from controld.web.handler import WebConfig
from tests.unit.admin_fake import FakeBackend
from tests.unit.cdp import Browser, Page, chromium_path, in_page, other_site
from tests.unit.web_dev import WebServed

CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup installs it)")
PASSWORD = "admin-pass-123"
ME = "127.0.0.1"  # the browser's address as the server sees it


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None
    b = Browser(CHROMIUM)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def site() -> Iterator[WebServed]:
    backend = FakeBackend()
    backend.seed(Origin.UPNP, ME, "TCP", 8080, 80, "NAS web interface", remaining=3600)
    backend.seed(Origin.NATPMP, ME, "UDP", 51413, 51413, "BitTorrent", remaining=7140)
    backend.seed(Origin.PCP, "192.168.1.30", "UDP", 3478, 3478, "game console")
    s = WebServed(backend, WebConfig(password_hash=auth.make_hash(PASSWORD, iterations=auth.MIN_ITERATIONS)))
    try:
        yield s
    finally:
        s.close()


def keep(shot: Path) -> None:
    if where := os.environ.get("IGDPCP_SCREENSHOTS"):
        shutil.copy(shot, Path(where) / shot.name)


def test_status_and_list_pages(browser: Browser, site: WebServed, tmp_path: Path) -> None:
    async def flow(page: Page) -> None:
        await page.goto(site.base + "/igdpcp/")
        facts = await page.eval("Object.fromEntries([...document.querySelectorAll('#status tr')]"
                                ".map(r => [r.cells[0] ? r.querySelector('th').textContent : '',"
                                " r.querySelector('td').textContent]))")
        assert facts["Your address"] == ME and facts["Internet address"] == "198.20.0.1"
        assert facts["Your forwards"] == "2" and facts["Mode"] == "cascaded"
        # the stylesheet applied (served as package data under the CSP)
        assert await page.eval("getComputedStyle(document.querySelector('header')).backgroundColor") == \
            "rgb(31, 78, 121)"
        await page.screenshot(str(tmp_path / "web-status.png"))
        await page.goto(site.base + "/igdpcp/mappings")
        rows = await page.eval("[...document.querySelectorAll('#mappings tbody tr')]"
                               ".map(r => [...r.cells].slice(0, 7).map(c => c.dataset.remaining || c.textContent))")
        assert rows == [["198.20.0.1:8080", "TCP", "127.0.0.1:80", "upnp (127.0.0.1)", "NAS web interface", "3600",
                         "active"],
                        ["198.20.0.1:51413", "UDP", "127.0.0.1:51413", "natpmp (127.0.0.1)", "BitTorrent", "7140",
                         "active"]]  # the console's forward is another host's: not shown
        await asyncio.sleep(1.5)  # app.js counts the lifetimes down
        left = await page.eval("document.querySelector('[data-remaining]').textContent")
        assert re.fullmatch(r"59m[0-5]\ds", left), left
        await page.screenshot(str(tmp_path / "web-mappings.png"))
        # the admin sees everything
        await page.goto(site.base + "/igdpcp/login")
        await page.eval(f"document.querySelector('#login input[name=password]').value = '{PASSWORD}'")
        await page.click_and_wait("#login button")
        assert await page.eval("document.querySelector('#flash').textContent") == "Logged in as admin."
        assert await page.eval("document.querySelectorAll('#mappings tbody tr').length") == 3
        await page.screenshot(str(tmp_path / "web-admin.png"))

    in_page(browser, flow)
    for name in ("web-status.png", "web-mappings.png", "web-admin.png"):
        shot = tmp_path / name
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        keep(shot)


def test_add_and_delete_through_the_page(browser: Browser, site: WebServed) -> None:
    backend = site.backend

    async def flow(page: Page) -> None:
        await page.goto(site.base + "/igdpcp/mappings")
        await page.eval("""(() => { const f = document.querySelector('#add');
            f.proto.value = 'UDP'; f.ext_port.value = '9000'; f.int_port.value = '9001';
            f.description.value = 'game server'; f.lifetime.value = '86400'; })()""")
        await page.click_and_wait("#add button")
        assert await page.eval("location.pathname") == "/igdpcp/mappings"
        assert await page.eval("document.querySelector('#flash').textContent") == \
            "Added: UDP 198.20.0.1:9000 to 127.0.0.1:9001."
        added = [m for m in backend.mappings.values() if m.ext_port == 9000]
        assert [(m.int_ip, m.int_port, m.origin, m.remaining) for m in added] == [(ME, 9001, Origin.WEB, 86400)]
        row = f"#mappings tr[data-id='{added[0].id}']"
        assert await page.eval(f"document.querySelector(\"{row}\").cells[4].textContent") == "game server"
        await page.eval("window.confirm = () => true")  # the delete button asks first
        await page.click_and_wait(f"{row} button")
        assert await page.eval("document.querySelector('#flash').textContent") == "Deleted: UDP 9000."
        assert await page.eval(f"document.querySelector(\"{row}\")") is None
        assert added[0].id not in backend.mappings
        # a refusal of the core is shown on the page
        await page.eval("""(() => { const f = document.querySelector('#add');
            f.proto.value = 'UDP'; f.ext_port.value = '3478'; f.int_port.value = '1'; })()""")
        await page.click_and_wait("#add button")
        assert await page.eval("document.querySelector('#flash').textContent") == "Not added: UDP 3478 is taken."

    in_page(browser, flow)


def test_csrf_and_cross_host_refused(browser: Browser, site: WebServed) -> None:
    backend = site.backend
    evil = other_site(site.base)

    async def flow(page: Page) -> None:
        await page.goto(site.base + "/igdpcp/mappings")  # the victim has a session
        # 1. the page's own form posted without its token (the CSP also stops injected fetch())
        await page.eval("""(() => { const f = document.querySelector('#add'); f.csrf.remove();
            f.ext_port.value = '7000'; f.int_port.value = '7000'; })()""")
        await page.click_and_wait("#add button")
        assert "security token" in await page.eval("document.querySelector('#refused').textContent")
        # 2. another site's auto-submitting form, with a guessed token
        await page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
        for _ in range(100):  # its script posts the form at once; wait for the router's answer
            if await page.eval("location.pathname + (document.querySelector('#refused') ? '!' : '')") == \
                    "/igdpcp/delete!":
                break
            await asyncio.sleep(0.1)
        assert "another site" in await page.eval("document.querySelector('#refused').textContent")
        # 3. a DNS name for the router (rebinding): refused
        await page.goto(f"http://localhost:{site.port}/igdpcp/mappings")
        assert "not a name" in await page.eval("document.querySelector('#refused').textContent")
        assert await page.eval("document.querySelector('#mappings')") is None

    try:
        in_page(browser, flow)
    finally:
        evil.shutdown()
        evil.server_close()
    assert sorted(backend.mappings) == [1, 2, 3]  # nothing was added or deleted
