"""natd/stun.py on loopback: a real coturn answers; a silent port ends in a bounded 'no answer'."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from natd import stun


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_probe_against_coturn_on_loopback(tmp_path: Path) -> None:
    turn = shutil.which("turnserver")
    if turn is None:
        pytest.skip("turnserver not installed (coturn: scripts/setup)")
    port = _free_udp_port()
    proc = subprocess.Popen([turn, "-n", "--stun-only", "--no-cli", "--no-tls", "--no-dtls", "--listening-ip",
                             "127.0.0.1", "--listening-port", str(port), "--userdb", str(tmp_path / "db"),
                             "--pidfile", str(tmp_path / "pid"), "--log-file", "stdout"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = None
        for _ in range(50):  # bounded: coturn needs a moment to listen
            r = asyncio.run(stun.probe("127.0.0.1", "127.0.0.1", port, rto=0.1, tries=2))
            if r.external_ip:
                break
            time.sleep(0.1)
        assert r is not None and r.error == "" and r.external_ip == "127.0.0.1"
        assert r.external_port == r.local_port  # no NAT on loopback: the port is kept
    finally:
        proc.terminate()
        proc.wait(10)


def test_silent_server_gives_a_bounded_no_answer() -> None:
    t0 = time.monotonic()
    r = asyncio.run(stun.probe("127.0.0.1", "127.0.0.1", _free_udp_port(), rto=0.02, tries=3))
    assert r.external_ip is None and r.error == "no answer after 3 tries" and time.monotonic() - t0 < 5


def test_unresolvable_server_is_an_error_not_a_crash() -> None:
    r = asyncio.run(stun.probe("127.0.0.1", "name.invalid", 3478, rto=0.02, tries=1))
    assert r.external_ip is None and r.error
