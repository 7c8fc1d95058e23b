"""``igdpcp`` against a real admin socket served by the in-memory core (tests/unit/admin_fake.py)."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controld import cli
from controld.adminapi.backend import OPERATOR, Origin
from tests.unit.admin_fake import Served

ROOT = Path(__file__).resolve().parents[2]
IGDPCP = os.path.join(os.path.dirname(sys.executable), "igdpcp")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(str(tmp_path / "controld.sock"))
    b = s.backend
    s.call(lambda: b.seed(Origin.UPNP, "192.168.1.2", "TCP", 8080, 80, "web server"))
    s.call(lambda: b.seed(Origin.NATPMP, "192.168.1.30", "UDP", 51413, 51413, "torrent", remaining=59))
    try:
        yield s
    finally:
        s.close()


def igdpcp(served: Served, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    rc = cli.run([*argv, "--socket", served.path], out)
    return rc, out.getvalue()


def test_list_is_an_aligned_table(served: Served) -> None:
    rc, out = igdpcp(served, "list")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 3
    assert lines[0].split() == list(cli.LIST_HEADERS)
    assert lines[1].split() == ["1", "TCP", "198.20.0.1:8080", "100.64.0.2:20001", "192.168.1.2:80", "upnp",
                                "192.168.1.2", "1h00m", "active", "web", "server"]
    assert lines[2].split()[5:9] == ["natpmp", "192.168.1.30", "59s", "active"]
    for col in ("EXTERNAL", "NAT1", "INTERNAL", "ORIGIN", "LIFETIME", "STATE"):  # each column starts at one offset
        starts = {ln.index(tok) for ln, tok in zip(lines, [col, *(ln.split()[cli.LIST_HEADERS.index(col)]
                                                               for ln in lines[1:])], strict=True)}
        assert len(starts) == 1, col


def test_list_json(served: Served) -> None:
    rc, out = igdpcp(served, "list", "--json")
    got = json.loads(out)
    assert rc == 0 and [m["ext_port"] for m in got] == [8080, 51413] and got[1]["origin"] == "natpmp"


def test_status_text_and_json(served: Served) -> None:
    rc, out = igdpcp(served, "status")
    facts = {ln[:17].strip(): ln[17:] for ln in out.splitlines()}
    assert rc == 0
    assert facts["controld"] == "0.1.0, mode cascaded, secure mode on"
    assert facts["WAN address"] == "100.64.0.2" and facts["external address"] == "198.20.0.1"
    assert re.fullmatch(r"100\.64\.0\.1  epoch 12345  last answer [45]s ago", facts["PCP server"])
    assert facts["mappings"] == "2  (natpmp 1  upnp 1)"
    assert facts["requests"] == "pcp 3  upnp 12" and facts["errors"] == "upnp 718x2"
    assert facts["PCP RTT p50"] == "1.8 ms" and facts["renewals"] == "5" and facts["re-syncs"] == "1"
    assert facts["natd restarts"] == "0"
    rc, out = igdpcp(served, "status", "--json")
    assert json.loads(out)["counters"]["renewals"] == 5


def test_add_get_delete_flush(served: Served) -> None:
    rc, out = igdpcp(served, "add", "tcp", "2222", "192.168.1.5", "22", "--description", "ssh")
    assert rc == 0 and out.splitlines()[1].split()[:3] == ["3", "TCP", "198.20.0.1:2222"]
    assert "permanent" in out and "operator" in out
    rc, out = igdpcp(served, "get", "3", "--json")
    assert json.loads(out)["description"] == "ssh"
    assert igdpcp(served, "delete", "TCP", "2222") == (0, "deleted mapping 3 TCP 2222\n")
    assert igdpcp(served, "delete", "1") == (0, "deleted mapping 1 TCP 8080\n")
    assert igdpcp(served, "flush", "--host", "192.168.1.30") == (0, "removed 1 mappings\n")
    assert igdpcp(served, "list") == (0, "no mappings\n")
    assert igdpcp(served, "reload") == (0, "reloaded\n") and served.backend.reloads == 1


def test_refusal_is_one_line_and_status_1(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = igdpcp(served, "delete", "99")
    assert rc == cli.EXIT_REFUSED and out == ""
    assert capsys.readouterr().err == "igdpcp delete: not_found: no mapping 99\n"
    rc, out = igdpcp(served, "add", "TCP", "8080", "192.168.1.9", "80", "--json")
    assert rc == 1 and json.loads(out)["error"]["kind"] == "conflict"


def test_watch_prints_each_change(served: Served) -> None:
    out = io.StringIO()
    t = threading.Thread(target=cli.run, args=(["watch", "--count", "2", "--socket", served.path], out))
    t.start()
    b = served.backend
    for _ in range(200):  # wait until the watcher has subscribed
        if b.subscribers:
            break
        threading.Event().wait(0.02)
    served.call(lambda: b.seed(Origin.PCP, "192.168.1.7", "TCP", 7000, 70))
    served.run(b.host_left("192.168.1.7"))
    t.join(10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].split()[1:] == ["added", "mapping", "3", "TCP", "198.20.0.1:7000", "->", "192.168.1.7:70",
                                    "origin", "pcp", "owner", "192.168.1.7", "active", "(pcp)"]
    assert lines[1].split()[1:3] == ["removed", "mapping"] and lines[1].endswith("gone (host left)")


def test_watch_json(served: Served) -> None:
    out = io.StringIO()
    t = threading.Thread(target=cli.run, args=(["watch", "--json", "--count", "1", "--socket", served.path], out))
    t.start()
    b = served.backend
    for _ in range(200):
        if b.subscribers:
            break
        threading.Event().wait(0.02)
    served.run(b.delete(1, OPERATOR))
    t.join(10)
    ev = json.loads(out.getvalue())
    assert (ev["event"], ev["mapping"]["id"], ev["mapping"]["state"], ev["reason"]) == ("removed", 1, "gone",
                                                                                      "operator")


def test_daemon_down_one_line_no_traceback(tmp_path: Path) -> None:
    res = subprocess.run([IGDPCP, "status", "--socket", str(tmp_path / "none.sock")], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == cli.EXIT_UNREACHABLE and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "controld is not answering on" in res.stderr
    assert "Traceback" not in res.stderr


def test_dhcp_release_hook_reaches_the_admin_socket(served: Served) -> None:
    """packaging/hooks/dhcp-release runs `igdpcp host-left IP --socket PATH`, unchanged."""
    env = dict(os.environ, ACTION="remove", IPADDR="192.168.1.2", IGDPCP_ADMIN_SOCKET=served.path,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    res = subprocess.run(["sh", str(ROOT / "packaging/hooks/dhcp-release")], env=env, capture_output=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert served.backend.host_lefts == ["192.168.1.2"]
    assert [m.ext_port for m in served.backend.mappings.values()] == [51413]


def test_host_left_speaks_to_a_0_1_controld(tmp_path: Path) -> None:
    """During an upgrade the new CLI may meet the old daemon's line protocol."""
    path = str(tmp_path / "old.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    seen: list[bytes] = []

    def old_controld() -> None:
        for _ in range(2):
            conn, _ = srv.accept()
            line = conn.makefile("rb").readline()
            seen.append(line)
            conn.sendall(b"ok 2\n" if line.startswith(b"host-left ") else b"error expected: host-left <IPv4>\n")
            conn.close()

    t = threading.Thread(target=old_controld, daemon=True)
    t.start()
    out = io.StringIO()
    assert cli.run(["host-left", "192.168.1.2", "--socket", path], out) == 0
    t.join(5)
    srv.close()
    assert out.getvalue() == "ok 2\n" and seen[1] == b"host-left 192.168.1.2\n"


def test_hash_password_from_stdin() -> None:
    res = subprocess.run([IGDPCP, "hash-password"], input="correct horse\n", capture_output=True, text=True,
                         timeout=60)
    from controld.web.auth import verify
    assert res.returncode == 0 and verify("correct horse", res.stdout.strip())
    short = subprocess.run([IGDPCP, "hash-password"], input="short\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and "at least 8" in short.stderr
