"""The rpcd plugin (luci-app-igdpcp) against a running admin socket, through rpcd's exec protocol,
and the LuCI status view fed with its real answers (node, with a small stand-in for LuCI's runtime).

Not run here: rpcd and ubus themselves, LuCI's real JS runtime and its theme, the ACL enforcement
and opkg/apk install of luci-app-igdpcp (no OpenWrt image on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controld import cli
from controld.adminapi.backend import Origin
from controld.web.auth import verify
from tests.unit.admin_fake import Served

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "packaging" / "luci-app-igdpcp"
PLUGIN = APP / "root/usr/libexec/rpcd/luci.igdpcp"
VIEWS = APP / "htdocs/luci-static/resources/view/igdpcp"
BIN = os.path.dirname(sys.executable)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(str(tmp_path / "controld.sock"))
    b = s.backend
    s.call(lambda: b.seed(Origin.UPNP, "192.168.1.2", "TCP", 8080, 80, "web <b>server</b>"))
    s.call(lambda: b.seed(Origin.PCP, "192.168.1.3", "UDP", 3478, 3478, "voice", remaining=None))
    try:
        yield s
    finally:
        s.close()


def plugin(socket: str, *argv: str, stdin: str = "") -> dict:
    """Run the plugin as rpcd does (uci absent here: the socket comes from the environment)."""
    env = dict(os.environ, IGDPCP_ADMIN_SOCKET=socket, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    res = subprocess.run(["sh", str(PLUGIN), *argv], input=stdin, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return json.loads(res.stdout)


def test_plugin_is_executable_and_lists_its_methods(tmp_path: Path) -> None:
    assert os.stat(PLUGIN).st_mode & 0o111
    assert plugin(str(tmp_path / "x.sock"), "list") == {"status": {}, "list": {}, "delete": {"id": 32},
                                                        "hash_password": {"password": ""}}


def test_plugin_status_list_delete(served: Served) -> None:
    st = plugin(served.path, "call", "status", stdin="{}")
    assert st["mode"] == "cascaded" and st["mappings"] == {"pcp": 1, "upnp": 1} and st["counters"]["renewals"] == 5
    got = plugin(served.path, "call", "list", stdin="{}")
    assert [(m["id"], m["ext_port"], m["origin"], m["remaining"]) for m in got["mappings"]] == \
        [(1, 8080, "upnp", 3600), (2, 3478, "pcp", None)]
    assert plugin(served.path, "call", "delete", stdin='{"id": 1}')["deleted"]["ext_port"] == 8080
    assert list(served.backend.mappings) == [2]
    assert plugin(served.path, "call", "delete", stdin='{"id": 1}') == \
        {"error": {"kind": "not_found", "message": "no mapping 1"}}
    assert plugin(served.path, "call", "delete", stdin='{"id": "1; rm -rf /"}')["error"]["kind"] == "invalid"
    assert plugin(served.path, "call", "delete", stdin="[1]")["error"]["kind"] == "bad_request"
    assert plugin(served.path, "call", "flush", stdin="{}")["error"]["kind"] == "unknown_command"
    assert list(served.backend.mappings) == [2]


def test_plugin_takes_the_socket_from_uci(tmp_path: Path) -> None:
    """On the router the path comes from `uci get igdpcp.controld.admin_socket` (here a stand-in uci)."""
    path = tmp_path / "a dir" / "controld.sock"
    s = Served(str(path))
    try:
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "uci").write_text(f'#!/bin/sh\n[ "$*" = "-q get igdpcp.controld.admin_socket" ] && echo "{path}"\n')
        (fake / "uci").chmod(0o755)
        env = dict(os.environ, IGDPCP_ADMIN_SOCKET="/nonexistent", PATH=f"{fake}{os.pathsep}{BIN}{os.pathsep}"
                   + os.environ.get("PATH", ""))
        res = subprocess.run(["sh", str(PLUGIN), "call", "list"], input="{}", env=env, capture_output=True,
                             text=True, timeout=60)
        assert json.loads(res.stdout) == {"mappings": []}, res.stdout + res.stderr
    finally:
        s.close()


def test_plugin_with_controld_down(tmp_path: Path) -> None:
    reply = plugin(str(tmp_path / "none.sock"), "call", "status", stdin="{}")
    assert reply["error"]["kind"] == "unreachable" and "not answering" in reply["error"]["message"]


def test_plugin_hashes_the_page_password(tmp_path: Path) -> None:
    reply = plugin(str(tmp_path / "x.sock"), "call", "hash_password", stdin='{"password": "long enough"}')
    assert verify("long enough", reply["hash"])
    assert plugin(str(tmp_path / "x.sock"), "call", "hash_password", stdin='{"password": "short"}')["error"]


def test_acl_and_menu_name_what_exists() -> None:
    acl = json.loads((APP / "root/usr/share/rpcd/acl.d/luci-app-igdpcp.json").read_text())["luci-app-igdpcp"]
    granted = set(acl["read"]["ubus"]["luci.igdpcp"]) | set(acl["write"]["ubus"]["luci.igdpcp"])
    assert granted == set(cli.RPCD_METHODS) and set(acl["read"]["ubus"]["luci.igdpcp"]) == {"status", "list"}
    menu = json.loads((APP / "root/usr/share/luci/menu.d/luci-app-igdpcp.json").read_text())
    views = {v["action"]["path"] for v in menu.values() if v["action"]["type"] == "view"}
    assert {f"igdpcp/{p.stem}" for p in VIEWS.glob("*.js")} == views
    for js in VIEWS.glob("*.js"):  # every rpc the views declare is a method the plugin has
        text = js.read_text()
        for part in text.split("method: '")[1:]:
            assert part.split("'")[0] in cli.RPCD_METHODS, js.name
    mk = (APP / "Makefile").read_text()
    assert "include ../../luci.mk" in mk and "+igdpcp" in mk


# A stand-in for the parts of LuCI's runtime the status view uses (luci-base's luci.js, cbi.js):
# E() builds plain nodes, cbi_update_table() keeps the rows, rpc.declare() answers from fixtures.
LUCI_STUB = r"""
const fs = require('fs');
const [viewFile, statusJson, listJson] = process.argv.slice(2);
String.prototype.format = function(...a) { let i = 0;
  return this.replace(/%[hsd]/g, m => { const v = String(a[i++]);
    return m === '%h' ? v.replace(/&/g, '&#38;').replace(/</g, '&#60;').replace(/>/g, '&#62;') : v; }); };
const E = (tag, attrs, kids) => Array.isArray(tag) ? { tag: '#fragment', attrs: {}, kids: attrs }
  : { tag, attrs: attrs || {}, kids: Array.isArray(kids) ? kids : (kids === undefined ? [] : [kids]) };
const tables = {};
const cbi_update_table = (table, rows, placeholder) => { tables[table.attrs.id] = rows; };
const answers = { status: JSON.parse(fs.readFileSync(statusJson)), list: JSON.parse(fs.readFileSync(listJson)) };
const rpc = { declare: d => () => Promise.resolve(answers[d.method]) };
const L = { bind: (fn, self, ...a) => fn.bind(self, ...a) };
const view = { extend: o => o };
const ui = { createHandlerFn: () => () => {}, addNotification: () => {} };
const dom = { content: () => {}, parent: () => null };
const poll = { add: () => {} };
const _ = s => s;
const text = n => typeof n === 'object' && n !== null ? n.kids.map(text).join('') : String(n);
const v = new Function('view', 'dom', 'poll', 'rpc', 'ui', 'E', '_', 'L', 'cbi_update_table',
                      fs.readFileSync(viewFile, 'utf8'))(view, dom, poll, rpc, ui, E, _, L, cbi_update_table);
v.load().then(data => { const root = v.render(data);
  const status = root.kids[1].kids[1].kids[0];
  console.log(JSON.stringify({
    status: status.kids.map(tr => [text(tr.kids[0]), text(tr.kids[1])]),
    mappings: tables.igdpcp_mappings.map(r => r.map(text)) })); });
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_luci_status_view_renders_the_plugins_answers(served: Served, tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps(plugin(served.path, "call", "status", stdin="{}")))
    (tmp_path / "list.json").write_text(json.dumps(plugin(served.path, "call", "list", stdin="{}")))
    (tmp_path / "stub.js").write_text(LUCI_STUB)
    res = subprocess.run(["node", str(tmp_path / "stub.js"), str(VIEWS / "status.js"), str(tmp_path / "status.json"),
                          str(tmp_path / "list.json")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    facts = dict(out["status"])
    assert facts["Mode"] == "cascaded, secure mode" and facts["External address"] == "198.20.0.1"
    assert facts["PCP server"].startswith("100.64.0.1, epoch 12345, last answer ")
    assert facts["Errors"] == "upnp 718×2" and facts["PCP RTT p50"] == "1.8 ms"
    assert out["mappings"] == [
        ["198.20.0.1:8080", "TCP", "100.64.0.2:20001", "192.168.1.2:80", "upnp", "192.168.1.2",
         "web &#60;b&#62;server&#60;/b&#62;", "1h00m", "active", "Delete"],
        ["198.20.0.1:3478", "UDP", "100.64.0.2:20002", "192.168.1.3:3478", "pcp", "192.168.1.3", "voice",
         "permanent", "active", "Delete"]]
