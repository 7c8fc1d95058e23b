"""The real NAT-PMP client, Debian's natpmpc (libnatpmp), against the server logic.

natpmpc always talks to port 5351, so each run gets a network namespace of its own
(``unshare -n``, loopback only): nothing is bound where other tests run. Inside it, this
module (run as a script) serves the requests with ``pcp.handle_datagram`` and ``respond``
and fixed core outcomes, and runs natpmpc; the test reads what natpmpc prints.
"""

from __future__ import annotations

import ipaddress
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controld.pcpserver import pcp
from controld.pcpserver.events import (
    Address,
    AddressWanted,
    DeleteWanted,
    Done,
    Drop,
    Granted,
    MapWanted,
    Outcome,
    Refused,
    Reply,
    Wanted,
)
from shared.pcp import Result

EXT = ipaddress.IPv4Address("203.0.113.5")
ROOT = Path(__file__).resolve().parents[2]
needs = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("natpmpc") or not shutil.which("unshare"),
                           reason="needs root, natpmpc and unshare")


def outcome(event: Wanted, refuse: bool) -> Outcome:
    """A stand-in core: the public address, the suggested port (or 40000) granted as asked;
    with ``refuse``, mappings get NO_RESOURCES."""
    if refuse and not isinstance(event, AddressWanted):
        return Refused(Result.NO_RESOURCES)
    if isinstance(event, AddressWanted):
        return Address(EXT)
    if isinstance(event, MapWanted):
        return Granted(EXT, event.suggested_port or 40000, event.lifetime)
    assert isinstance(event, DeleteWanted)
    return Done()


def serve_and_run(mode: str, args: list[str], seconds: float = 20.0) -> int:
    """In the private namespace: answer on 127.0.0.1:5351 while natpmpc ``args`` runs;
    each event is printed as ``event <type> <protocol> <internal port>`` for the test."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 5351))
        client = subprocess.Popen(["natpmpc", "-g", "127.0.0.1", *args])
        while client.poll() is None and time.monotonic() - started < seconds:
            if not select.select([sock], [], [], 0.2)[0]:
                continue
            data, peer = sock.recvfrom(2048)
            handled = pcp.handle_datagram(data, ipaddress.IPv4Address(peer[0]), peer[1],
                                          int(time.monotonic() - started))
            if isinstance(handled, Reply):
                sock.sendto(handled.payload, peer)
            elif not isinstance(handled, Drop):
                print("event", type(handled).__name__, getattr(handled, "protocol", "-"),
                      getattr(handled, "internal_port", "-"), flush=True)
                answer = pcp.respond(handled, outcome(handled, mode == "refuse"), int(time.monotonic() - started))
                sock.sendto(answer, peer)
        if client.poll() is None:
            client.kill()
        return client.wait(timeout=5)


def natpmpc(*args: str, mode: str = "grant") -> str:
    """natpmpc's output and exit status in a fresh network namespace."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(["unshare", "-n", sys.executable, __file__, mode, *args], capture_output=True, text=True,
                         timeout=60, env=env, cwd=ROOT)
    return f"{run.stdout}{run.stderr}\nexit {run.returncode}"


@needs
def test_natpmpc_reads_our_public_address_rfc6886_3_2() -> None:
    out = natpmpc()
    assert "Public IP address : 203.0.113.5" in out and "exit 0" in out, out
    assert "event AddressWanted - -" in out


@needs
def test_natpmpc_maps_and_reads_our_answer_rfc6886_3_3() -> None:
    out = natpmpc("-a", "1234", "80", "tcp", "3600")
    assert "Mapped public port 1234 protocol TCP to local port 80 liftime 3600" in out and "exit 0" in out, out
    assert "event MapWanted 6 80" in out


@needs
def test_natpmpc_delete_all_rfc6886_3_4() -> None:
    out = natpmpc("-a", "0", "0", "udp", "0")
    assert "Mapped public port 0 protocol UDP to local port 0 liftime 0" in out and "exit 0" in out, out
    assert "event DeleteWanted 17 0" in out  # every UDP mapping of this host


@needs
def test_natpmpc_sees_our_refusal_result_code_rfc6886_3_5() -> None:
    out = natpmpc("-a", "1234", "80", "udp", "60", mode="refuse")
    assert "Public IP address : 203.0.113.5" in out and "Mapped public port" not in out, out
    assert "OUT OF RESOURCES" in out.upper() and "exit 0" not in out, out


if __name__ == "__main__":
    sys.exit(serve_and_run(sys.argv[1], sys.argv[2:]))
