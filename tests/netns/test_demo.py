"""README command 1: the demo (`scripts/demo` = `python -m tests.bed demo`) proves the path
through both NATs and says so hop by hop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.bed import testbed as tb

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]


def _ours(out: str) -> list[str]:
    """The namespaces that still exist of the bed the demo named in its first line
    (other runs may build beds at the same time)."""
    prefix = out.split("test bed ", 1)[1].split()[0]
    return [ns for ns in tb.list_namespaces() if ns.startswith(prefix + "-")]


@pytest.mark.parametrize("layout", ["router", "split"])
def test_demo_prints_every_hop_and_cleans_up(layout: str) -> None:
    if tb.netns_available():
        pytest.skip(f"netns test bed: {tb.netns_available()}")
    res = subprocess.run([sys.executable, "-m", "tests.bed", "demo", "--layout", layout], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert f"external {tb.NAT2_PUBLIC_IP}:8080 TCP is redirected to internal {tb.LAN_HOST_IP}:8000" in out
    assert f"nft map igdpcp/fwd4: tcp {tb.ROUTER_WAN_IP}:8080 -> {tb.LAN_HOST_IP}:8000" in out
    assert "request  to 100.64.0.1: MAP tcp internal 100.64.0.2:8080" in out and "PREFER_FAILURE" in out
    assert f"response from 100.64.0.1: MAP SUCCESS external {tb.NAT2_PUBLIC_IP}:8080" in out
    assert f"miniupnpd DNAT: tcp {tb.NAT2_PUBLIC_IP}:8080 -> {tb.ROUTER_WAN_IP}:8080" in out
    assert "LAN host received 46 bytes" in out and "SUCCESS: an Internet host reached the LAN host" in out
    assert not _ours(out)  # everything it built is gone


def test_demo_keep_then_teardown_by_the_printed_command() -> None:
    if tb.netns_available():
        pytest.skip(f"netns test bed: {tb.netns_available()}")
    res = subprocess.run([sys.executable, "-m", "tests.bed", "demo", "--keep"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    hint = res.stdout.strip().splitlines()[-1].strip()
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        assert hint.startswith(".venv/bin/python -m tests.bed teardown ig"), res.stdout
        assert len(_ours(res.stdout)) == 5  # lan, ctl, cpe, isp, inet left running
    finally:
        prefix = hint.rsplit(" ", 1)[-1]
        down = subprocess.run([sys.executable, "-m", "tests.bed", "teardown", prefix], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and down.stdout.startswith("removed 5 namespaces"), down.stdout + down.stderr
    assert not _ours(res.stdout)
