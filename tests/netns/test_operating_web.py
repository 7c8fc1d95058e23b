"""The LAN page served by the real controld, in Debian's headless Chromium on the LAN host;
and the rpcd plugin's JSON against the same running controld (docs/operating.md).

The browser runs in the LAN namespace: the thread that drives it enters that namespace
(setns), so Chromium, its DevTools socket and the page's requests all live on the LAN host.
Screenshots land in the test's tmp dir and in $IGDPCP_SCREENSHOTS when set (docs/img/).
"""

from __future__ import annotations

import asyncio
import ctypes
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from controld.web import auth
from tests.bed import testbed as tb
from tests.bed.stack import HTTP_PORT, Stack
from tests.bed.upnp import add
from tests.unit.cdp import Browser, Page, chromium_path, in_page, other_site

CHROMIUM = chromium_path()
pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup installs it)")]
PASSWORD = "bed-admin-pass"
CLONE_NEWNET = 0x40000000
ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "packaging/luci-app-igdpcp/root/usr/libexec/rpcd/luci.igdpcp"
PAYLOAD = b"igdpcp: a forward the LAN host made on the page"


def in_lan(bed: tb.Testbed, fn: Callable[[Page], Awaitable[None]], shots: Path | None = None) -> None:
    """Run ``fn`` on a fresh page of a Chromium started inside the bed's LAN namespace."""
    failure: list[BaseException] = []

    def thread() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{bed.ns('lan')}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:  # this thread only: the test process stays put
                    raise OSError(ctypes.get_errno(), "setns into the LAN namespace")
            finally:
                os.close(fd)
            assert CHROMIUM is not None
            browser = Browser(CHROMIUM)
            try:
                in_page(browser, fn)
            finally:
                browser.close()
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)

    t = threading.Thread(target=thread)
    t.start()
    t.join(180)
    assert not t.is_alive(), "the browser flow did not finish"
    if failure:
        raise failure[0]


def keep(shot: Path) -> None:
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if where := os.environ.get("IGDPCP_SCREENSHOTS"):
        shutil.copy(shot, Path(where) / shot.name)


def nat2_tcp(bed: tb.Testbed) -> dict[int, tuple[str, int]]:
    return {r.ext_port: (r.int_ip, r.int_port) for r in bed.nat2_dnat_rules() if r.proto == "tcp"}


def admin_call(st: Stack, cmd: str, **args: object) -> Any:
    res = subprocess.run([sys.executable, "-m", "shared.cli", cmd, "--json", "--socket", st.admin_socket,
                          *(str(v) for v in args.values())], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


async def flash(page: Page) -> str:
    return str(await page.eval("(document.querySelector('#flash') || document.querySelector('#refused'))"
                               ".textContent"))


def test_the_page_on_the_real_controld(make_stack, tmp_path: Path) -> None:
    hashed = auth.make_hash(PASSWORD, iterations=auth.MIN_ITERATIONS)
    st: Stack = make_stack(controld_args=["--web-password-hash", hashed])
    bed = st.bed
    base = f"http://{st.controld_ip}:{HTTP_PORT}"
    assert add(st, 8080, 8000)[0] == 200  # a UPnP mapping of the LAN host
    other = admin_call(st, "add", proto="TCP", ext_port=9090, int_ip="192.168.1.5", int_port=9000)
    assert isinstance(other, dict)
    # the description names the page (presentationURL)
    desc = bed.run("lan", ["python3", "-c", "import urllib.request,sys;"
                           "print(urllib.request.urlopen(sys.argv[1],timeout=5).read().decode())", st.root_url])
    assert f"<presentationURL>{base}/igdpcp/</presentationURL>" in desc.stdout
    added: dict[str, object] = {}

    async def look_and_add(page: Page) -> None:
        await page.goto(base + "/igdpcp/")
        facts = await page.eval("Object.fromEntries([...document.querySelectorAll('#status tr')]"
                                ".map(r => [r.querySelector('th').textContent, r.querySelector('td').textContent]))")
        assert facts["Your address"] == tb.LAN_HOST_IP and facts["Internet address"] == tb.NAT2_PUBLIC_IP
        assert facts["Mode"] == "cascaded" and facts["Your forwards"] == "1"
        await page.screenshot(str(tmp_path / "web-status.png"))
        await page.goto(base + "/igdpcp/mappings")
        await page.eval("""(() => { const f = document.querySelector('#add');
            f.proto.value = 'TCP'; f.ext_port.value = '7070'; f.int_port.value = '7000';
            f.description.value = 'game server'; f.lifetime.value = '3600'; })()""")
        await page.click_and_wait("#add button")
        assert await flash(page) == f"Added: TCP {tb.NAT2_PUBLIC_IP}:7070 to {tb.LAN_HOST_IP}:7000."
        rows = await page.eval("[...document.querySelectorAll('#mappings tbody tr')]"
                               ".map(r => [...r.cells].slice(0, 5).map(c => c.textContent))")
        assert rows == [[f"{tb.NAT2_PUBLIC_IP}:8080", "TCP", f"{tb.LAN_HOST_IP}:8000", f"upnp ({tb.LAN_HOST_IP})",
                         "iwf"],
                        [f"{tb.NAT2_PUBLIC_IP}:7070", "TCP", f"{tb.LAN_HOST_IP}:7000", f"web ({tb.LAN_HOST_IP})",
                         "game server"]]  # the other host's forward is not shown
        added["id"] = await page.eval("document.querySelectorAll('#mappings tbody tr')[1].dataset.id")
        await page.screenshot(str(tmp_path / "web-mappings.png"))

    in_lan(bed, look_and_add)
    keep(tmp_path / "web-status.png")
    keep(tmp_path / "web-mappings.png")
    [web] = [m for m in admin_call(st, "list") if m["ext_port"] == 7070]
    assert (web["origin"], web["owner"], str(web["id"])) == ("web", tb.LAN_HOST_IP, added["id"])
    assert nat2_tcp(bed)[7070] == (tb.ROUTER_WAN_IP, web["nat1_port"])
    assert st.nat1_forwards()[("tcp", web["nat1_port"])] == (tb.LAN_HOST_IP, 7000)
    assert bed.internet_reaches(7000, 7070, PAYLOAD)

    servers: list[http.server.HTTPServer] = []  # made inside the LAN namespace, in the browser's thread

    async def refusals_and_delete(page: Page) -> None:
        await page.goto(base + "/igdpcp/mappings")
        # another host's forward, named by id: refused by the core's ownership rule
        await page.eval(f"""(() => {{ const f = document.querySelector("#mappings tr[data-id='{added['id']}'] form");
            f.querySelector('input[name=id]').value = '{other['id']}'; }})()""")
        await page.eval("window.confirm = () => true")
        await page.click_and_wait(f"#mappings tr[data-id='{added['id']}'] button")
        assert await flash(page) == f"Not deleted: mapping {other['id']} belongs to another host."
        # a forward to another address: refused
        await page.eval("""(() => { const f = document.querySelector('#add'); const i = document.createElement('input');
            i.name = 'int_ip'; i.value = '192.168.1.5'; f.appendChild(i);
            f.ext_port.value = '7071'; f.int_port.value = '7000'; })()""")
        await page.click_and_wait("#add button")
        assert (await flash(page)).startswith("Not added: this page forwards only to your own address")
        # the form without its CSRF token
        await page.eval("""(() => { const f = document.querySelector('#add'); f.csrf.remove();
            f.ext_port.value = '7072'; f.int_port.value = '7000'; })()""")
        await page.click_and_wait("#add button")
        assert "security token" in await flash(page)
        # another site's auto-submitting form (cross-site POST)
        srv = other_site(base)
        servers.append(srv)
        await page.goto(f"http://127.0.0.1:{srv.server_address[1]}/")
        for _ in range(100):  # bounded wait for the router's answer to the posted form
            if await page.eval("location.pathname + (document.querySelector('#refused') ? '!' : '')") == \
                    "/igdpcp/delete!":
                break
            await asyncio.sleep(0.1)
        # refused either way: another site's page carries no cookie (SameSite=Strict), and its Origin is foreign
        refused = await flash(page)
        assert "another site" in refused or "session has expired" in refused, refused
        # delete its own forward through the page
        await page.goto(base + "/igdpcp/mappings")
        await page.eval("window.confirm = () => true")
        await page.click_and_wait(f"#mappings tr[data-id='{added['id']}'] button")
        assert await flash(page) == "Deleted: TCP 7070."

    try:
        in_lan(bed, refusals_and_delete)
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
    assert 7070 not in nat2_tcp(bed) and ("tcp", web["nat1_port"]) not in st.nat1_forwards()
    assert sorted(m["ext_port"] for m in admin_call(st, "list")) == [8080, 9090]
    assert not bed.internet_reaches(7000, 7070, PAYLOAD, timeout=1.5)

    async def admin(page: Page) -> None:
        await page.goto(base + "/igdpcp/login")
        await page.eval(f"document.querySelector('#login input[name=password]').value = '{PASSWORD}'")
        await page.click_and_wait("#login button")
        assert await flash(page) == "Logged in as admin."
        assert await page.eval("document.querySelectorAll('#mappings tbody tr').length") == 2
        await page.screenshot(str(tmp_path / "web-admin.png"))
        await page.eval("window.confirm = () => true")
        await page.click_and_wait(f"#mappings tr[data-id='{other['id']}'] button")
        assert await flash(page) == "Deleted: TCP 9090."

    in_lan(bed, admin)
    keep(tmp_path / "web-admin.png")
    assert 9090 not in nat2_tcp(bed)
    status = admin_call(st, "status")
    assert isinstance(status, dict)
    assert status["counters"]["requests"]["web"] >= 3 and status["counters"]["errors"]["web"] == {"denied": 1}
    assert status["counters"]["requests"]["operator"] >= 2

    # the rpcd plugin (luci-app-igdpcp) against the same controld, as rpcd runs it
    env = dict(os.environ, IGDPCP_ADMIN_SOCKET=st.admin_socket,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))

    def plugin(*argv: str, stdin: str = "{}") -> dict:
        res = subprocess.run(["sh", str(PLUGIN), *argv], input=stdin, env=env, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        return json.loads(res.stdout)

    rs = plugin("call", "status")
    assert (rs["mode"], rs["ext_ip"], rs["mappings"]) == ("cascaded", tb.NAT2_PUBLIC_IP, {"upnp": 1})
    [row] = plugin("call", "list")["mappings"]
    assert (row["ext_port"], row["origin"], row["owner"]) == (8080, "upnp", tb.LAN_HOST_IP)
    assert plugin("call", "delete", stdin=json.dumps({"id": row["id"]}))["deleted"]["ext_port"] == 8080
    assert plugin("call", "list")["mappings"] == [] and 8080 not in nat2_tcp(bed)
    assert plugin("call", "delete", stdin=json.dumps({"id": row["id"]})) == \
        {"error": {"kind": "not_found", "message": f"no mapping {row['id']}"}}
