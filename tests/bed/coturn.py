"""A real STUN server for the bed: coturn (Debian's, installed by scripts/setup) on the Internet host."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.bed import testbed as tb

TURNSERVER = shutil.which("turnserver")
STUN_PORT = 3478


def start_coturn(bed: tb.Testbed) -> None:
    """coturn as a plain STUN server (no TURN, no TLS, no CLI) on the Internet host."""
    if TURNSERVER is None:
        pytest.skip("turnserver not installed (coturn: scripts/setup)")
    work = bed.path("coturn")
    os.makedirs(work, exist_ok=True)
    log = open(os.path.join(work, "log"), "w")  # noqa: SIM115 - the process keeps writing to it
    bed.popen("inet", [TURNSERVER, "-n", "--stun-only", "--no-cli", "--no-tls", "--no-dtls",
                       "--listening-ip", tb.INET_HOST_IP, "--listening-port", str(STUN_PORT),
                       "--userdb", os.path.join(work, "turndb"), "--pidfile", os.path.join(work, "pid"),
                       "--log-file", "stdout", "--simple-log"], stdout=log, stderr=log)
    end = time.monotonic() + 10
    while time.monotonic() < end:  # bounded: until it listens
        out = bed.run("inet", ["ss", "-Hlun", f"sport = :{STUN_PORT}"], check=False).stdout
        if tb.INET_HOST_IP in out:
            return
        time.sleep(0.1)
    pytest.fail("coturn did not start: " + open(os.path.join(work, "log")).read()[-2000:])
