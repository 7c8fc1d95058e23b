"""STUN in natd (RFC 8489 Binding, docs/stun.md) against a real STUN server: coturn in the
Internet namespace, natd in the router behind the provider's NAT2 masquerade. natd must
report NAT2's public address, not its own WAN address, at start and after a WAN change."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from shared import wire
from tests.bed import testbed as tb

pytestmark = pytest.mark.netns

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


def next_answer(c, timeout: float = 20.0, wan_ip: str | None = None) -> wire.StunResult:
    """The next StunResult (from ``wan_ip`` if given) within ``timeout``."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        ev = c.next_event("stun", timeout=left)
        if isinstance(ev, wire.StunResult) and (wan_ip is None or ev.wan_ip == wan_ip):
            return ev
    pytest.fail(f"no STUN result from natd within {timeout} s")


def test_natd_learns_nat2s_public_address_from_coturn(natd_only) -> None:
    st, c = natd_only(natd_args=["--stun-server", tb.INET_HOST_IP, "--stun-port", str(STUN_PORT)],
                      before=start_coturn)
    bed = st.bed
    first = next_answer(c)
    assert first.error == "" and first.server == tb.INET_HOST_IP
    # the Internet saw NAT2's address (the provider's masquerade), not natd's WAN address
    assert (first.wan_ip, first.external_ip) == (tb.ROUTER_WAN_IP, tb.NAT2_PUBLIC_IP)
    assert first.local_port and first.external_port

    # a late subscriber still learns it: natd repeats its last answer without a new probe
    assert next_answer(c, timeout=15).external_ip == tb.NAT2_PUBLIC_IP

    # a new WAN address: natd asks again at once, from the new address
    new_wan = "100.64.0.3"
    bed.run("cpe", ["ip", "addr", "flush", "dev", tb.ROUTER_WAN_IF])
    bed.run("cpe", ["ip", "addr", "add", f"{new_wan}/24", "dev", tb.ROUTER_WAN_IF])
    bed.run("cpe", ["ip", "route", "replace", "default", "via", tb.ISP_INT_IP])
    again = next_answer(c, timeout=20, wan_ip=new_wan)
    assert again.external_ip == tb.NAT2_PUBLIC_IP and again.error == ""
    assert "is seen as 198.20.0.1" in st.log("natd")
