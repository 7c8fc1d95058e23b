"""README command 1: `igdpcp demo` proves the path through both NATs and says so hop by hop."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared import testbed as tb

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("layout", ["router", "split"])
def test_demo_prints_every_hop_and_cleans_up(layout: str) -> None:
    if tb.netns_available():
        pytest.skip(f"netns test bed: {tb.netns_available()}")
    before = set(tb.list_namespaces())
    igdpcp = os.path.join(os.path.dirname(sys.executable), "igdpcp")
    res = subprocess.run([igdpcp, "demo", "--layout", layout], capture_output=True, text=True, timeout=120)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert f"external {tb.NAT2_PUBLIC_IP}:8080 TCP is redirected to internal {tb.LAN_HOST_IP}:8000" in out
    assert f"nft map igdpcp/fwd4: tcp {tb.ROUTER_WAN_IP}:8080 -> {tb.LAN_HOST_IP}:8000" in out
    assert "request  to 100.64.0.1: MAP tcp internal 100.64.0.2:8080" in out and "PREFER_FAILURE" in out
    assert f"response from 100.64.0.1: MAP SUCCESS external {tb.NAT2_PUBLIC_IP}:8080" in out
    assert f"miniupnpd DNAT: tcp {tb.NAT2_PUBLIC_IP}:8080 -> {tb.ROUTER_WAN_IP}:8080" in out
    assert "LAN host received 46 bytes" in out and "SUCCESS: an Internet host reached the LAN host" in out
    assert set(tb.list_namespaces()) == before  # everything it built is gone
