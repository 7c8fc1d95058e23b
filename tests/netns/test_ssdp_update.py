"""LAN address change: ssdp:update with NEXTBOOTID, then service at the new address (issue #3,
UDA 1.1 §1.2.4). controld runs in its own namespace so its LAN leg can be renumbered."""

from __future__ import annotations

import time

import pytest

from tests.bed import testbed as tb
from tests.bed.stack import HTTP_PORT, Stack

pytestmark = pytest.mark.netns

NEW_IP = "192.168.1.4"


def _headers(data: bytes) -> dict[str, str]:
    lines = data.decode("latin-1").split("\r\n")
    return {k.strip().upper(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:]) if k}


def test_address_change_sends_update_and_moves_service(make_stack) -> None:
    st: Stack = make_stack(layout="split")
    time.sleep(0.6)  # let the start-up ssdp:alive pair go by: the listener keeps one datagram
    listener = st.bed.udp_listen("lan", 1900, group=tb.SSDP_GROUP, timeout=15)
    time.sleep(0.2)
    # Renumber: the new address first (kept when the old primary goes), then drop the old one.
    st.bed.run("ctl", ["sysctl", "-qw", f"net.ipv4.conf.{tb.CTL_IF}.promote_secondaries=1"])
    st.bed.run("ctl", ["ip", "addr", "add", f"{NEW_IP}/24", "dev", tb.CTL_IF])
    st.bed.run("ctl", ["ip", "addr", "del", f"{tb.CTL_IP}/24", "dev", tb.CTL_IF])
    h = _headers(listener.received(timeout=15))
    assert h.get("NTS") == "ssdp:update", h
    assert int(h["NEXTBOOTID.UPNP.ORG"]) == int(h["BOOTID.UPNP.ORG"]) + 1
    assert h["LOCATION"] == f"http://{NEW_IP}:{HTTP_PORT}/rootDesc.xml"
    status = st.bed.run("lan", ["upnpc", "-u", h["LOCATION"], "-s"], check=False, timeout=30)
    assert f"ExternalIPAddress = {tb.NAT2_PUBLIC_IP}" in status.stdout, status.stdout
