"""WAN address change in cascaded mode (RFC 6970 §5.10, docs/requirements.md IWF-81): natd moves NAT1
to the new address, controld stays cascaded and re-creates every mapping upstream from the
new address within seconds; the old NAT2 mapping (keyed on the old address) can only expire,
so the mapping may come back on another external port, and the table says which."""

from __future__ import annotations

import re
import time

import pytest

from tests.bed import testbed as tb
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

NEW_WAN = "100.64.0.3"


def _ext_port(st: Stack) -> int | None:
    m = re.search(r"^\s*0 TCP\s+(\d+)->192\.168\.1\.2:8000", st.upnpc("-l").stdout, re.M)
    return int(m.group(1)) if m else None


def test_wan_renumbering_recreates_mappings_from_the_new_address(make_stack) -> None:
    st: Stack = make_stack()
    bed = st.bed
    assert st.upnpc("-a", tb.LAN_HOST_IP, "8000", "8080", "TCP").returncode == 0
    bed.run("cpe", ["sysctl", "-qw", f"net.ipv4.conf.{tb.ROUTER_WAN_IF}.promote_secondaries=1"])
    bed.run("cpe", ["ip", "addr", "add", f"{NEW_WAN}/24", "dev", tb.ROUTER_WAN_IF])
    bed.run("cpe", ["ip", "addr", "del", f"{tb.ROUTER_WAN_IP}/24", "dev", tb.ROUTER_WAN_IF])
    bed.run("cpe", ["ip", "route", "replace", "default", "via", tb.ISP_INT_IP])

    deadline = time.monotonic() + 8
    rule = None
    while time.monotonic() < deadline and rule is None:  # bounded wait for the re-created mapping
        rule = next((r for r in bed.nat2_dnat_rules() if r.int_ip == NEW_WAN and r.int_port != 9), None)
        time.sleep(0.2)
    assert rule is not None, bed.nat2_dnat_rules()
    assert "WAN 100.64.0.3 is private and no PCP server answered" not in st.log("controld")
    assert _ext_port(st) == rule.ext_port  # the table tells the truth about the new port
    assert f"ExternalIPAddress = {tb.NAT2_PUBLIC_IP}" in st.upnpc("-s").stdout

    listener = bed.tcp_listen("lan", 8000)
    time.sleep(0.2)
    assert bed.tcp_send("inet", tb.NAT2_PUBLIC_IP, rule.ext_port, b"renumbered", timeout=3)
    assert listener.received(timeout=3) == b"renumbered"
