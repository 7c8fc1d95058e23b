"""`igdpcp` against a running controld on the namespace bed (docs/operating.md): what an operator sees.

One bed for the whole story (status, list, an operator's permanent forward reachable from the
Internet host through NAT1 and NAT2, delete, flush, watch, the old hook line, a second
controld refused, the daemon down), so the module stays a few seconds long.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.bed import testbed as tb
from tests.bed.stack import Stack
from tests.bed.upnp import add, wait_for

pytestmark = pytest.mark.netns

PAYLOAD = b"igdpcp operator forward: through NAT2 and NAT1"


def igdpcp(st: Stack, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The real CLI (shared/cli.py) on the router's admin socket."""
    return subprocess.run([sys.executable, "-m", "shared.cli", *args, "--socket", st.admin_socket],
                          capture_output=True, text=True, timeout=timeout, check=False)


def js(st: Stack, *args: str) -> Any:
    res = igdpcp(st, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def nat2_tcp(bed: tb.Testbed) -> dict[int, tuple[str, int]]:
    """miniupnpd's TCP DNAT rules on NAT2: {external port: (internal ip, internal port)}."""
    return {r.ext_port: (r.int_ip, r.int_port) for r in bed.nat2_dnat_rules() if r.proto == "tcp"}


def test_operator_cli_end_to_end(make_stack) -> None:
    # a rule that binds LAN hosts (as the shipped rules do for ports below 1024), not the operator
    st: Stack = make_stack(controld_args=["--permission", "deny 9443 0.0.0.0/0 0-65535",
                                          "--permission", "allow 1024-65535 0.0.0.0/0 1024-65535"])
    bed = st.bed
    status, body = add(st, 8080, 8000)  # a UPnP control point on the LAN host
    assert status == 200, body

    # list: the UPnP mapping with its origin, owner and both bindings
    [m] = js(st, "list")
    assert (m["proto"], m["ext_ip"], m["ext_port"], m["int_ip"], m["int_port"], m["origin"], m["owner"],
            m["state"], m["remaining"]) == ("TCP", tb.NAT2_PUBLIC_IP, 8080, tb.LAN_HOST_IP, 8000, "upnp",
                                            tb.LAN_HOST_IP, "active", None)
    assert m["nat1_ip"] == tb.ROUTER_WAN_IP and st.nat1_forwards()[("tcp", m["nat1_port"])] == (tb.LAN_HOST_IP, 8000)
    text = igdpcp(st, "list").stdout.splitlines()
    assert text[0].split()[:9] == ["ID", "PROTO", "EXTERNAL", "NAT1", "INTERNAL", "ORIGIN", "OWNER", "LIFETIME",
                                   "STATE"]
    assert text[1].split()[:9] == [str(m["id"]), "TCP", f"{tb.NAT2_PUBLIC_IP}:8080",
                                   f"{tb.ROUTER_WAN_IP}:{m['nat1_port']}", f"{tb.LAN_HOST_IP}:8000", "upnp",
                                   tb.LAN_HOST_IP, "permanent", "active"]

    # status: mode, addresses, the PCP server's epoch, counters
    st_ = js(st, "status")
    assert isinstance(st_, dict)
    assert (st_["mode"], st_["wan_ip"], st_["ext_ip"], st_["pcp_server"], st_["mappings"]) == \
        ("cascaded", tb.ROUTER_WAN_IP, tb.NAT2_PUBLIC_IP, tb.ISP_INT_IP, {"upnp": 1})
    assert isinstance(st_["pcp_epoch"], int) and abs(st_["pcp_last_answer"] - time.time()) < 60
    c = st_["counters"]
    assert c["requests"]["upnp"] >= 1 and c["resyncs"] >= 1 and c["natd_restarts"] == 0
    assert c["pcp_rtt_p50_ms"] is not None and 0 < c["pcp_rtt_p50_ms"] < 2000
    shown = igdpcp(st, "status").stdout
    assert "mode cascaded" in shown and tb.NAT2_PUBLIC_IP in shown and "PCP RTT p50" in shown

    # watch, running while the operator adds and deletes
    watch = subprocess.Popen([sys.executable, "-m", "shared.cli", "watch", "--json", "--socket", st.admin_socket],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # subscribed
        # add: an operator's permanent forward
        added = js(st, "add", "TCP", "9090", tb.LAN_HOST_IP, "9000", "--description", "permanent web")
        assert isinstance(added, dict)
        assert (added["origin"], added["owner"], added["remaining"], added["ext_port"]) == \
            ("operator", "operator", None, 9090)
        assert nat2_tcp(bed)[9090] == (tb.ROUTER_WAN_IP, added["nat1_port"])
        assert st.nat1_forwards()[("tcp", added["nat1_port"])] == (tb.LAN_HOST_IP, 9000)
        assert bed.internet_reaches(9000, 9090, PAYLOAD)
        assert add(st, 9443, 9443)[0] == 500  # the rules refuse the LAN host ...
        low = js(st, "add", "TCP", "9443", tb.LAN_HOST_IP, "9443")  # ... not the operator (admin rights)
        assert isinstance(low, dict) and low["ext_port"] == 9443
        # a taken port: refused with one line and exit status 1
        res = igdpcp(st, "add", "TCP", "9090", "192.168.1.5", "9001")
        assert res.returncode == 1 and res.stderr.startswith("igdpcp add: conflict: "), res.stderr
        assert len(res.stderr.splitlines()) == 1

        # delete by id: gone from NAT1 (nft) and NAT2 (miniupnpd's rules), and unreachable
        gone = js(st, "delete", str(added["id"]))
        assert isinstance(gone, dict) and gone["id"] == added["id"]
        assert ("tcp", added["nat1_port"]) not in st.nat1_forwards()
        assert 9090 not in nat2_tcp(bed)
        assert not bed.internet_reaches(9000, 9090, PAYLOAD, timeout=1.5)
        assert igdpcp(st, "delete", str(added["id"])).returncode == 1  # not_found now

        # flush: every mapping, everywhere
        assert js(st, "flush") == {"removed": 2}
        assert js(st, "list") == [] and st.nat1_forwards() == {}
        assert not {8080, 9443} & nat2_tcp(bed).keys()
        time.sleep(0.5)
    finally:
        watch.terminate()
        out, _ = watch.communicate(timeout=10)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    seen = [(e["event"], e["mapping"]["ext_port"], e["mapping"]["origin"]) for e in events if "mapping" in e]
    assert ("added", 9090, "operator") in seen and ("removed", 9090, "operator") in seen, seen
    assert ("removed", 8080, "upnp") in seen and ("added", 9443, "operator") in seen, seen
    assert [e["reason"] for e in events if e.get("event") == "removed" and e["mapping"]["ext_port"] == 9090] == \
        ["operator"]
    log = st.log("controld")
    assert "admin: add" in log and f"removed mapping {added['id']} TCP" in log
    assert "origin operator" in log and "origin upnp" in log  # each log line names the mapping's origin
    assert js(st, "reload") == {}  # as SIGHUP: re-read, mappings kept
    assert wait_for(lambda: "reload: configuration re-read" in st.log("controld"), 5)

    # an old DHCP hook's one-line protocol still answers
    add(st, 8081, 8001)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(st.admin_socket)
    s.sendall(f"host-left {tb.LAN_HOST_IP}\n".encode())
    assert s.recv(100) == b"ok 1\n"
    s.close()
    assert wait_for(lambda: 8081 not in nat2_tcp(bed), 10)

    # a second controld on the same admin socket refuses to start, with one line, touching nothing
    argv = [*st.argv["controld"], "--lan-if", tb.ROUTER_LAN_IF, "--rpc", st.rpc, "--events", st.events,
            "--state-dir", bed.path("state2"), "--http-port", "5001", "--admin-socket", st.admin_socket]
    second = bed.run("cpe", argv, check=False, timeout=30)
    assert second.returncode != 0
    assert second.stderr.strip().splitlines()[-1] == \
        f"controld: another controld is running (its admin socket {st.admin_socket} answers); not starting"
    assert js(st, "status")  # the first one still answers on its socket

    # the daemon down: one line and exit status 3, no traceback
    st.stop("controld")
    res = igdpcp(st, "status")
    assert res.returncode == 3 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"igdpcp status: controld is not answering on {st.admin_socket}")
    assert len(res.stderr.splitlines()) == 1
