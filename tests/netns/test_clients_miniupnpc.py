"""The miniupnpc Python binding (PyPI `miniupnpc`) on the LAN host against controld.

Real SSDP discovery (the binding's own M-SEARCH), selectigd, external IP, add, generic
and specific entry, delete; the mapping carries bytes from the Internet host.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.bed import testbed as tb
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

SCRIPT = r"""
import json, sys, miniupnpc
out = {}
u = miniupnpc.UPnP()
u.discoverdelay = 1000
out["discovered"] = u.discover()
out["igd"] = u.selectigd()
out["lanaddr"] = u.lanaddr
out["external"] = u.externalipaddress()
out["status"] = list(u.statusinfo())
out["connectiontype"] = u.connectiontype()
out["add"] = u.addportmapping(8200, "TCP", u.lanaddr, 8000, "binding test", "", 0)
out["entries"] = u.getportmappingnumberofentries()
out["generic0"] = list(u.getgenericportmapping(0) or [])
out["generic1"] = u.getgenericportmapping(1)
out["specific"] = list(u.getspecificportmapping(8200, "TCP") or [])
out["missing"] = u.getspecificportmapping(8201, "TCP")
out["bytes"] = [u.totalbytesent(), u.totalbytereceived(), u.totalpacketsent(), u.totalpacketreceived()]
try:
    u.addportmapping(8201, "TCP", "192.168.1.77", 8000, "foreign", "", 0)
    out["foreign"] = "accepted"
except Exception as e:
    out["foreign"] = str(e)
print(json.dumps(out))
sys.stdout.flush()
sys.stdin.readline()  # the test checks the data plane, then lets us delete
out = {"delete": u.deleteportmapping(8200, "TCP")}
try:
    u.deleteportmapping(8200, "TCP")
    out["again"] = "deleted"
except Exception as e:
    out["again"] = str(e)
out["generic_after"] = u.getgenericportmapping(0)
print(json.dumps(out))
"""


def test_miniupnpc_binding_full_cycle(make_stack) -> None:
    st: Stack = make_stack()
    import subprocess

    p = st.bed.popen("lan", [sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    first = json.loads(p.stdout.readline() or "{}")
    assert first, p.stderr.read() if p.stderr else ""
    assert first["discovered"] >= 1
    assert first["igd"].startswith("http://192.168.1.1:5000/ctl/WANIPCn")
    assert first["lanaddr"] == tb.LAN_HOST_IP
    assert first["external"] == tb.NAT2_PUBLIC_IP
    assert first["status"][0] == "Connected" and first["connectiontype"] == "IP_Routed"
    assert first["add"] is True and first["entries"] == 1
    assert first["generic0"][:5] == [8200, "TCP", [tb.LAN_HOST_IP, 8000], "binding test", "1"]
    assert first["generic1"] is None  # 713 -> None: the listing ends after the one entry
    assert first["specific"][:3] == [tb.LAN_HOST_IP, 8000, "binding test"]
    assert first["missing"] is None  # 714
    assert all(isinstance(x, int) and 0 <= x < 2**32 for x in first["bytes"])
    assert first["bytes"][0] > 0 and first["bytes"][2] > 0  # real WAN counters: PCP went out
    assert "606" in first["foreign"] or "not authorized" in first["foreign"].lower()

    listener = st.bed.tcp_listen("lan", 8000)
    time.sleep(0.1)
    assert st.bed.tcp_send("inet", tb.NAT2_PUBLIC_IP, 8200, b"via binding", timeout=3)
    assert listener.received(timeout=3) == b"via binding"

    p.stdin.write("\n")
    p.stdin.flush()
    second = json.loads(p.stdout.readline() or "{}")
    p.wait(10)
    assert second["delete"] is True
    assert "714" in second["again"] or "NoSuchEntry" in second["again"]
    assert second["generic_after"] is None
    assert st.nat1_forwards() == {}
