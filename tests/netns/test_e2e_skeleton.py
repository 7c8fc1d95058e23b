"""Walking skeleton, end to end: real upnpc on the LAN host, real miniupnpd as NAT2,
natd and controld in the router (``router`` layout) or controld in its own namespace
(``split`` layout). Bytes must cross both NATs; a delete must remove both."""

from __future__ import annotations

import http.client
import re
import time

import pytest

from tests.bed import testbed as tb
from tests.bed.fixtures import soap_call
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

PAYLOAD = b"igdpcp: through NAT1 and NAT2"


def _entries(upnpc_l: str) -> list[str]:
    """The mapping lines of ``upnpc -l`` output (' 0 TCP  8080->192.168.1.2:8000 ...')."""
    return re.findall(r"^\s*\d+ (?:TCP|UDP)\s+\S+", upnpc_l, re.M)


@pytest.mark.parametrize("layout", ["router", "split"])
def test_upnpc_maps_through_both_nats(make_stack, layout: str) -> None:
    st: Stack = make_stack(layout=layout)
    bed = st.bed

    add = st.upnpc("-a", tb.LAN_HOST_IP, "8000", "8080", "TCP")
    assert add.returncode == 0, add.stdout + add.stderr
    assert f"external {tb.NAT2_PUBLIC_IP}:8080 TCP is redirected to internal {tb.LAN_HOST_IP}:8000" in add.stdout

    status = st.upnpc("-s")
    assert f"ExternalIPAddress = {tb.NAT2_PUBLIC_IP}" in status.stdout
    assert "Found valid IGD" in status.stdout

    # The path: NAT2 DNAT 198.20.0.1:8080 -> 100.64.0.2:Y, NAT1 DNAT 100.64.0.2:Y -> LAN host.
    nat1 = st.nat1_forwards()
    assert list(nat1.values()) == [(tb.LAN_HOST_IP, 8000)]
    (proto, nat1_port), = nat1
    assert tb.DnatRule("tcp", 8080, tb.ROUTER_WAN_IP, nat1_port) in bed.nat2_dnat_rules()
    assert bed.internet_reaches(8000, 8080, PAYLOAD)

    assert _entries(st.upnpc("-l").stdout) == [f" 0 TCP  8080->{tb.LAN_HOST_IP}:8000"]

    delete = st.upnpc("-d", "8080", "TCP")
    assert "returned : 0" in delete.stdout, delete.stdout
    assert st.nat1_forwards() == {}
    assert not [r for r in bed.nat2_dnat_rules() if r.ext_port == 8080]
    assert not bed.internet_reaches(8000, 8080, PAYLOAD)
    assert _entries(st.upnpc("-l").stdout) == []


def test_missing_and_malformed_arguments_get_402(make_stack) -> None:
    st: Stack = make_stack()
    base = {"NewRemoteHost": "", "NewExternalPort": "8081", "NewProtocol": "TCP", "NewInternalPort": "80",
            "NewInternalClient": tb.LAN_HOST_IP, "NewEnabled": "1", "NewPortMappingDescription": "x",
            "NewLeaseDuration": "0"}
    cases = [
        {k: v for k, v in base.items() if k != "NewInternalPort"},  # missing
        {**base, "NewExternalPort": "70000"},
        {**base, "NewProtocol": "SCTP"},
        {**base, "NewInternalClient": "not-an-ip"},
        {**base, "NewLeaseDuration": "-5"},
    ]
    for args in cases:
        status, body = soap_call(st, "AddPortMapping", args)
        assert status == 500 and b"<errorCode>402</errorCode>" in body, (args, body)
    # Not even XML: a fault, not a crash; and the daemon still answers afterwards.
    status, body = soap_call(st, "AddPortMapping", raw=b"<s:Envelope><unclosed>")
    assert status == 500 and b"<errorCode>402</errorCode>" in body
    status, body = soap_call(st, "GetExternalIPAddress", {})
    assert status == 200 and tb.NAT2_PUBLIC_IP.encode() in body
    assert st.nat1_forwards() == {}


def test_refused_upstream_leaves_no_nat1_binding(make_stack) -> None:
    """NAT2's policy (allow 1024-65535) refuses external port 80: the CP gets the RFC 6970
    error and natd keeps no NAT1 binding for it."""
    st: Stack = make_stack()
    add = st.upnpc("-a", tb.LAN_HOST_IP, "80", "80", "TCP")
    assert add.returncode != 0
    assert "718" in add.stdout or "501" in add.stdout, add.stdout
    assert st.nat1_forwards() == {}
    assert _entries(st.upnpc("-l").stdout) == []


def test_unreachable_nat2_gives_501_and_leaves_nothing(make_stack) -> None:
    st: Stack = make_stack(controld_args=["--pcp-timeout", "2"])
    st.bed.stop_nat2()
    t0 = time.monotonic()
    status, body = soap_call(st, "AddPortMapping", {
        "NewRemoteHost": "", "NewExternalPort": "8082", "NewProtocol": "UDP", "NewInternalPort": "8082",
        "NewInternalClient": tb.LAN_HOST_IP, "NewEnabled": "1", "NewPortMappingDescription": "x",
        "NewLeaseDuration": "0"})
    assert status == 500 and b"<errorCode>501</errorCode>" in body
    assert time.monotonic() - t0 < 10
    assert st.nat1_forwards() == {}
    # UPnP keeps answering while NAT2 is away.
    status, _ = soap_call(st, "GetStatusInfo", {})
    assert status == 200


def test_sigterm_exits_cleanly_and_says_byebye(make_stack) -> None:
    st: Stack = make_stack()
    time.sleep(0.6)  # let the start-up ssdp:alive pair go by: the listener keeps one datagram
    listener = st.bed.udp_listen("lan", 1900, group=tb.SSDP_GROUP)
    time.sleep(0.3)
    assert st.stop("controld") == 0
    assert b"ssdp:byebye" in listener.received(timeout=3)
    assert st.stop("natd") == 0


def test_description_is_served_and_host_must_be_ip(make_stack) -> None:
    st: Stack = make_stack()
    code = ("import http.client,sys;c=http.client.HTTPConnection(sys.argv[1],5000,timeout=5);"
            "c.request('GET','/rootDesc.xml',headers={'Host':sys.argv[2]});r=c.getresponse();"
            "print(r.status);print(r.read().decode())")
    ok = st.bed.run("lan", ["python3", "-c", code, st.controld_ip, f"{st.controld_ip}:5000"])
    assert ok.stdout.startswith("200") and "InternetGatewayDevice:1" in ok.stdout
    rebinding = st.bed.run("lan", ["python3", "-c", code, st.controld_ip, "evil.example:5000"])
    assert rebinding.stdout.startswith("403")
    assert http.client  # imported for type parity with soap_call
