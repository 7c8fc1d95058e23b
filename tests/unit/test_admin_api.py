"""The admin API over a real Unix socket against the in-memory core (tests/unit/admin_fake.py)."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controld.adminapi import client, protocol
from controld.adminapi.backend import BackendError, ErrorKind, Origin
from controld.adminapi.server import MAX_CLIENTS, SocketInUse, bind_socket
from tests.unit.admin_fake import Served


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(str(tmp_path / "run" / "controld.sock"))
    try:
        yield s
    finally:
        s.close()


def raw(path: str, data: bytes, timeout: float = 5.0) -> list[dict]:
    """Send bytes, read reply lines until the server closes or goes quiet."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    buf = b""
    while chunk := s.recv(65536):
        buf += chunk
    s.close()
    return [json.loads(line) for line in buf.splitlines()]


def test_every_command(served: Served) -> None:
    b = served.backend
    served.call(lambda: b.seed(Origin.UPNP, "192.168.1.2", "TCP", 8080, 80, "game"))
    st = client.call(served.path, "status")
    assert st["mode"] == "cascaded" and st["ext_ip"] == "198.20.0.1" and st["mappings"] == {"upnp": 1}
    assert st["counters"]["errors"] == {"upnp": {"718": 2}} and st["counters"]["pcp_rtt_p50_ms"] == 1.8
    [m] = client.call(served.path, "list")
    assert (m["id"], m["proto"], m["ext_port"], m["int_ip"], m["origin"], m["state"]) == \
        (1, "TCP", 8080, "192.168.1.2", "upnp", "active")
    assert client.call(served.path, "get", id=1) == m
    added = client.call(served.path, "add", proto="udp", ext_port=5000, int_ip="192.168.1.3", int_port=5001,
                        description="voip")
    assert (added["proto"], added["origin"], added["owner"], added["remaining"]) == ("UDP", "operator", "operator",
                                                                                    None)
    assert client.call(served.path, "delete", proto="UDP", ext_port=5000)["id"] == added["id"]
    assert client.call(served.path, "delete", id=1)["ext_port"] == 8080
    assert client.call(served.path, "list") == []
    for port in (1, 2, 3):
        client.call(served.path, "add", proto="TCP", ext_port=port, int_ip=f"192.168.1.{port % 2 + 1}", int_port=80)
    assert client.call(served.path, "flush", host="192.168.1.2") == {"removed": 2}
    assert client.call(served.path, "host-left", ip="192.168.1.3") == {"removed": 0}
    assert b.host_lefts == ["192.168.1.3"]
    assert client.call(served.path, "flush") == {"removed": 1}
    assert client.call(served.path, "reload") == {} and b.reloads == 1


@pytest.mark.parametrize("req, kind, words", [
    ({"cmd": "get", "id": 99}, "not_found", "no mapping 99"),
    ({"cmd": "get"}, "invalid", "missing id"),
    ({"cmd": "get", "id": "1"}, "invalid", "id must be an integer"),
    ({"cmd": "get", "id": True}, "invalid", "id must be an integer"),
    ({"cmd": "add", "proto": "SCTP", "ext_port": 1, "int_ip": "192.168.1.2", "int_port": 1}, "invalid", "TCP or UDP"),
    ({"cmd": "add", "proto": "TCP", "ext_port": 0, "int_ip": "192.168.1.2", "int_port": 1}, "invalid", "1..65535"),
    ({"cmd": "add", "proto": "TCP", "ext_port": 1, "int_ip": "host", "int_port": 1}, "invalid", "IPv4"),
    ({"cmd": "add", "proto": "TCP", "ext_port": 1, "int_ip": "192.168.1.2", "int_port": 1, "description": "a\nb"},
     "invalid", "printable"),
    ({"cmd": "delete"}, "invalid", "either id, or proto and ext_port"),
    ({"cmd": "delete", "id": 1, "proto": "TCP", "ext_port": 1}, "invalid", "either id"),
    ({"cmd": "delete", "proto": "TCP"}, "invalid", "either id"),
    ({"cmd": "flush", "host": "::1"}, "invalid", "IPv4"),
    ({"cmd": "status", "verbose": 1}, "invalid", "unknown argument 'verbose'"),
    ({"cmd": "rm"}, "unknown_command", "known: status, list"),
    ({"id": 1}, "bad_request", '"cmd"'),
    ([1], "bad_request", '"cmd"'),
])
def test_typed_errors(served: Served, req: object, kind: str, words: str) -> None:
    [reply] = raw(served.path, json.dumps(req).encode() + b"\n")
    assert reply["ok"] is False and reply["error"]["kind"] == kind and words in reply["error"]["message"]


def test_core_refusals_reach_the_client(served: Served) -> None:
    client.call(served.path, "add", proto="TCP", ext_port=80, int_ip="192.168.1.2", int_port=80)
    with pytest.raises(BackendError) as err:
        client.call(served.path, "add", proto="TCP", ext_port=80, int_ip="192.168.1.3", int_port=80)
    assert err.value.kind is ErrorKind.CONFLICT


def test_bad_json_then_good_on_one_connection(served: Served) -> None:
    replies = raw(served.path, b'{"cmd": \n\xff\xfe\n[[[[[[\n{"cmd": "list"}\n')
    assert [r["ok"] for r in replies] == [False, False, False, True]
    assert {r["error"]["kind"] for r in replies[:3]} == {"bad_request"}


def test_deeply_nested_json_is_refused_not_crashing(served: Served) -> None:
    [reply] = raw(served.path, b"[" * 2000 + b"]" * 2000 + b"\n")
    assert reply["error"]["kind"] == "bad_request"
    assert client.call(served.path, "list") == []


def test_oversized_line_is_refused_and_the_connection_closed(served: Served) -> None:
    replies = raw(served.path, b'{"cmd": "list", "x": "' + b"a" * (protocol.MAX_LINE * 4) + b'"}\n{"cmd":"list"}\n')
    assert [r["error"]["kind"] for r in replies] == ["too_large"]  # nothing after it is read
    assert client.call(served.path, "list") == []  # and the server still serves others


def test_many_clients_at_once(served: Served) -> None:
    results: list[object] = []

    def one(i: int) -> None:
        with client.Connection(served.path) as c:
            for _ in range(5):
                results.append(c.call("status")["mode"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(MAX_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["cascaded"] * (MAX_CLIENTS * 5)


def test_clients_over_the_limit_are_told_busy(served: Served) -> None:
    held = [client.Connection(served.path) for _ in range(MAX_CLIENTS)]
    try:
        for c in held:  # each is being served (not just queued in the backlog)
            assert c.call("list") == []
        [reply] = raw(served.path, b'{"cmd": "list"}\n')
        assert reply["error"]["kind"] == "busy"
    finally:
        for c in held:
            c.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the slots free up once those clients are gone
        try:
            assert client.call(served.path, "list") == []
            break
        except BackendError:
            time.sleep(0.05)
    else:
        pytest.fail("the server stayed busy after its clients left")


def test_watch_streams_changes_until_the_client_leaves(served: Served) -> None:
    b = served.backend
    with client.Connection(served.path) as c:
        assert c.call("watch") == {"watching": True}
        events = c.events(timeout=5)
        served.call(lambda: b.seed(Origin.PCP, "192.168.1.4", "UDP", 3478, 3478, "stun"))
        ev = next(events)
        assert (ev["event"], ev["mapping"]["ext_port"], ev["mapping"]["origin"], ev["reason"]) == \
            ("added", 3478, "pcp", "pcp")
        client.call(served.path, "host-left", ip="192.168.1.4")
        ev = next(events)
        assert (ev["event"], ev["mapping"]["state"], ev["reason"]) == ("removed", "gone", "host left")
        assert len(b.subscribers) == 1
    deadline = time.monotonic() + 5
    while b.subscribers and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b.subscribers == []  # the closed watcher is unsubscribed


def test_socket_mode_is_0660(served: Served) -> None:
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o660


def test_second_instance_never_unlinks_a_live_socket(served: Served, tmp_path: Path) -> None:
    inode = os.stat(served.path).st_ino
    with pytest.raises(SocketInUse):
        Served(served.path)
    assert os.stat(served.path).st_ino == inode
    assert client.call(served.path, "list") == []  # the first still answers


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)  # a socket file nobody listens on: a crashed controld's
    dead.close()
    s = Served(path)
    try:
        assert client.call(path, "list") == []
    finally:
        s.close()
    assert not os.path.exists(path)  # ours, so removed at close


def test_a_non_socket_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    path.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        bind_socket(str(path))
    assert path.read_text() == "not a socket"


def test_close_leaves_a_successors_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    first = Served(path)
    os.unlink(path)  # e.g. an operator removed it, and a second controld started
    second = Served(path)
    try:
        first.close()
        assert client.call(path, "list") == []  # the successor's socket is still there
    finally:
        second.close()
    assert not os.path.exists(path)


def test_daemon_down_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(client.Unreachable, match="not answering"):
        client.call(str(tmp_path / "none.sock"), "status")


def test_close_ends_watchers_and_removes_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    s = Served(path)
    with client.Connection(path) as c:
        c.call("watch")
        s.close()
        with pytest.raises(client.Unreachable, match="closed"):
            next(c.events(timeout=5))
    assert not os.path.exists(path)


def test_old_hooks_one_line_host_left_still_answers(served: Served) -> None:
    """controld 0.1's `host-left IP` line (hooks from before the admin API) -> `ok N`, then close."""
    b = served.backend
    served.call(lambda: b.seed(Origin.UPNP, "192.168.1.9", "TCP", 9000, 90, "x"))
    for line, answer in ((b"host-left 192.168.1.9\n", b"ok 1\n"),
                         (b"host-left 999.1.1.1\n", b"error an IPv4 address\n"),
                         (b"host-left 1.2.3.4 x\n", b"error expected: host-left <IPv4 address>\n")):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(served.path)
        s.sendall(line)
        assert s.recv(4096) == answer
        assert s.recv(4096) == b""  # closed after the one answer
        s.close()
    assert b.host_lefts == ["192.168.1.9"] and client.call(served.path, "list") == []
