"""STUN in natd (RFC 8489 Binding, docs/stun.md) against a real STUN server: coturn in the
Internet namespace, natd in the router behind the provider's NAT2 masquerade. natd must
report NAT2's public address, not its own WAN address, at start and after a WAN change."""

from __future__ import annotations

import time

import pytest

from shared import wire
from tests.bed import testbed as tb
from tests.bed.coturn import STUN_PORT, start_coturn

pytestmark = pytest.mark.netns


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
