"""RFC 6970 interworking end to end against real miniupnpd as NAT2 (namespace test bed).

What a user sees is asserted: bytes from the Internet host arriving on the LAN host,
UPnP error codes, natd's NAT1 map, miniupnpd's DNAT rules, controld's table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shared import pcp
from tests.bed import testbed as tb
from tests.bed.fixtures import soap_call
from tests.bed.stack import Stack
from tests.bed.upnp import HOOKS, WANIP2, add, listing, wait_for
from tests.bed.upnp import error_code as _code
from tests.bed.upnp import out_value as _value

pytestmark = pytest.mark.netns

PAYLOAD = b"igdpcp iwf: through NAT2 and NAT1"
OTHER_SUBSCRIBER = "100.64.0.7"  # a second CGN customer on NAT2's inside (docs/requirements.md IWF-51)

def nat2_ports(bed: tb.Testbed) -> dict[int, tuple[str, int]]:
    """NAT2's (miniupnpd's) TCP DNAT rules: {external port: (internal ip, internal port)}."""
    return {r.ext_port: (r.int_ip, r.int_port) for r in bed.nat2_dnat_rules() if r.proto == "tcp"}


def other_subscriber_maps(bed: tb.Testbed, ext_port: int) -> None:
    """A second CGN subscriber takes NAT2's ``ext_port`` with its own PCP MAP."""
    bed.run("cpe", ["ip", "addr", "add", f"{OTHER_SUBSCRIBER}/32", "dev", tb.ROUTER_WAN_IF])
    import ipaddress

    req = pcp.Request(pcp.Opcode.MAP, 600, ipaddress.IPv4Address(OTHER_SUBSCRIBER),
                      pcp.MapData(os.urandom(12), pcp.PROTO_TCP, ext_port, ext_port))
    raw = bed.udp_exchange("cpe", tb.ISP_INT_IP, pcp.SERVER_PORT, pcp.encode_request(req),
                           bind=(OTHER_SUBSCRIBER, 0), timeout=3)
    assert raw is not None
    resp = pcp.decode_response(raw)
    assert resp.result == pcp.Result.SUCCESS and resp.map is not None and resp.map.external_port == ext_port
    assert nat2_ports(bed)[ext_port] == (OTHER_SUBSCRIBER, ext_port)


def test_renewal_keeps_infinite_lease_and_expiry_removes_everywhere(make_stack) -> None:
    """NAT2 grants 6 s: an IGD:1 lease 0 lives on by renewals (docs/requirements.md IWF-68, IWF-69, IWF-74);
    a 5 s lease ends and is removed from NAT1, NAT2 and the table (§12 notes); the lease the
    CP sees never exceeds what NAT2 granted."""
    from tests.bed.upnp import Sink
    from tests.bed.upnp import props as _props

    st: Stack = make_stack(bed_kwargs={"nat2_min_lifetime": 2, "nat2_max_lifetime": 6})
    bed = st.bed
    sink = Sink(bed, 4000)
    subscribe = ("import http.client,sys;c=http.client.HTTPConnection(sys.argv[1],5000,timeout=5);"
                 "c.request('SUBSCRIBE','/evt/WANIPCn',headers={'NT':'upnp:event','TIMEOUT':'Second-600',"
                 "'CALLBACK':'<http://%s:4000/e>'%sys.argv[2]});print(c.getresponse().status)")
    assert bed.run("lan", ["python3", "-c", subscribe, st.controld_ip, tb.LAN_HOST_IP]).stdout.strip() == "200"
    assert sink.event() is not None  # the initial event
    status, body = add(st, 8080, 8000)
    assert status == 200, body
    status, body = add(st, 8090, 8001, lease=5)
    assert status == 200, body
    assert set(nat2_ports(bed)) == {8080, 8090}
    status, body = soap_call(st, "GetSpecificPortMappingEntry",
                             {"NewRemoteHost": "", "NewExternalPort": "8090", "NewProtocol": "TCP"})
    assert status == 200 and 1 <= int(_value(body, "NewLeaseDuration") or 0) <= 5
    status, body = soap_call(st, "GetSpecificPortMappingEntry",
                             {"NewRemoteHost": "", "NewExternalPort": "8080", "NewProtocol": "TCP"})
    assert status == 200 and _value(body, "NewLeaseDuration") == "0"  # infinite, kept by renewals

    # The 5 s lease ends: gone from NAT2, NAT1 and every listing.
    assert wait_for(lambda: 8090 not in nat2_ports(bed) and len(st.nat1_forwards()) == 1, 9)
    assert [e[0] for e in listing(st)] == [8080]
    assert "lease ended: mapping 2" in st.log("controld")
    # GENA: the expiry was evented to the subscriber (PortMappingNumberOfEntries 2 -> 1).
    counts = []
    for _ in range(6):  # bounded: each add, the expiry, perhaps an address event
        ev = sink.event(timeout=2)
        if ev is None:
            break
        counts.append(_props(ev["body"]).get("PortMappingNumberOfEntries"))
    assert "2" in counts and counts[counts.index("2") + 1:].count("1") >= 1, counts
    # Three NAT2 lifetimes later the infinite one is still there, renewed, and reachable.
    time.sleep(max(0.0, 13 - 9))
    assert st.log("controld").count("renewed mapping 1 ") >= 2
    assert 8080 in nat2_ports(bed)
    assert bed.internet_reaches(8000, 8080, PAYLOAD)


def test_conflicts_probe_range_delete_and_host_release(make_stack) -> None:
    """Port held by another subscriber: 718 for AddPortMapping, another port for AddAny
    (docs/requirements.md IWF-42 to IWF-51); GetSpecific probes NAT2 and leaves nothing (IWF-56 to IWF-60);
    DeletePortMappingRange deletes one by one (IWF-62, IWF-66); the DHCP-release hook
    removes a host's mappings (IWF-79, IWF-80)."""
    st: Stack = make_stack(controld_args=["--igd-version", "2"])
    bed = st.bed
    other_subscriber_maps(bed, 8080)

    status, body = add(st, 8080, 8000)
    assert status == 500 and _code(body) == 718, body
    assert st.nat1_forwards() == {}  # nothing left behind by the refused request

    status, body = add(st, 8080, 8000, any_port=True)
    assert status == 200, body
    got = int(_value(body, "NewReservedPort") or 0)
    assert got not in (0, 8080) and nat2_ports(bed)[got][0] == tb.ROUTER_WAN_IP
    assert bed.internet_reaches(8000, got, PAYLOAD)

    # GetSpecific: the other subscriber's port and a free one both give 714; the probe is gone.
    for port in (8080, 9100):
        status, body = soap_call(st, "GetSpecificPortMappingEntry",
                                 {"NewRemoteHost": "", "NewExternalPort": str(port), "NewProtocol": "TCP"},
                                 service=WANIP2)
        assert status == 500 and _code(body) == 714, body
    assert 9100 not in nat2_ports(bed) and not [p for p, (ip, ip_port) in nat2_ports(bed).items() if ip_port == 9]
    status, body = soap_call(st, "GetSpecificPortMappingEntry",
                             {"NewRemoteHost": "", "NewExternalPort": str(got), "NewProtocol": "TCP"})
    assert status == 200 and _value(body, "NewInternalPort") == "8000"

    for port in (9001, 9002, 9003):
        assert add(st, port, port)[0] == 200
    status, body = soap_call(st, "DeletePortMappingRange", {"NewStartPort": "9000", "NewEndPort": "9002",
                                                            "NewProtocol": "TCP", "NewManage": "0"}, service=WANIP2)
    assert status == 200, body
    ports = nat2_ports(bed)
    assert 9001 not in ports and 9002 not in ports and 9003 in ports
    assert sorted(e[0] for e in listing(st)) == sorted([got, 9003])
    status, body = soap_call(st, "DeletePortMappingRange", {"NewStartPort": "9000", "NewEndPort": "9002",
                                                            "NewProtocol": "TCP", "NewManage": "0"}, service=WANIP2)
    assert status == 500 and _code(body) == 730
    status, body = soap_call(st, "DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": "9002",
                                                       "NewProtocol": "TCP"})
    assert status == 500 and _code(body) == 714

    # The LAN host's DHCP lease is released: the shipped hook tells controld.
    env = dict(os.environ, ACTION="remove", IPADDR=tb.LAN_HOST_IP, IGDPCP_ADMIN_SOCKET=st.admin_socket,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    res = subprocess.run(["sh", os.path.join(HOOKS, "dhcp-release")], env=env, capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert listing(st) == []
    assert st.nat1_forwards() == {}
    assert set(nat2_ports(bed)) == {8080}  # only the other subscriber's mapping is left


def test_nat2_restart_recovers_within_10s(make_stack) -> None:
    """NAT2 loses all state (new epoch, ANNOUNCE): the mapping is back with its port and
    reachable from the Internet within 10 s (RFC 6887 §8.5, §14.1; docs/requirements.md IWF-82, IWF-84).
    miniupnpd announces its restart to port 5351, where natd does not listen: the solicited
    ANNOUNCE (epoch poll) finds it."""
    st: Stack = make_stack(controld_args=["--pcp-epoch-poll", "2"])
    t_nat2 = time.monotonic()
    bed = st.bed
    assert add(st, 8080, 8000)[0] == 200
    assert add(st, 8081, 8001, proto="UDP")[0] == 200
    before = nat2_ports(bed)
    # A restart is only visible once the epoch has run > 1 s (RFC 6887 §8.5 tolerates 1 s back).
    time.sleep(max(0.0, 3.0 - (time.monotonic() - t_nat2)))
    bed.restart_nat2()
    t0 = time.monotonic()
    assert nat2_ports(bed) == {}
    assert wait_for(lambda: nat2_ports(bed) == before, 10), st.log("controld")[-2000:]
    assert bed.internet_reaches(8000, 8080, PAYLOAD)
    assert time.monotonic() - t0 < 10
    assert "lost its state" in st.log("controld")
    assert {r.ext_port for r in bed.nat2_dnat_rules() if r.proto == "udp"} == {8081}


def test_nat2_unreachable_gives_501_then_retry_succeeds(make_stack) -> None:
    """docs/requirements.md IWF-13: 501 well before the 30 s UPnP deadline, UPnP keeps answering,
    and the control point's retry completes once NAT2 is back."""
    st: Stack = make_stack(controld_args=["--pcp-timeout", "3"])
    bed = st.bed
    bed.stop_nat2()
    t0 = time.monotonic()
    status, body = add(st, 8080, 8000)
    assert status == 500 and _code(body) == 501
    assert time.monotonic() - t0 < 6
    assert soap_call(st, "GetStatusInfo", {})[0] == 200
    assert st.nat1_forwards() == {}
    bed.start_nat2()
    status, body = add(st, 8080, 8000)
    assert status == 200, body
    assert bed.internet_reaches(8000, 8080, PAYLOAD)


def test_controld_kill9_keeps_table_and_upstream_ownership(make_stack) -> None:
    """controld crashes twice, once mid-request: the table survives, every mapping is
    re-asserted with its stored nonce (NAT2 would refuse another nonce: NOT_AUTHORIZED),
    deletes still work upstream, and no NAT1 binding is left without a mapping
    (docs/requirements.md IWF-29, IWF-32; §18 item 6)."""
    st: Stack = make_stack(controld_args=["--pcp-service-wait", "0.5", "--pcp-timeout", "8"])
    bed = st.bed
    assert add(st, 8080, 8000)[0] == 200
    assert add(st, 8082, 8002, lease=3600)[0] == 200
    rules, nat1 = nat2_ports(bed), st.nat1_forwards()

    # A request in flight when controld dies: its NAT1 binding exists, NAT2 never answered.
    bed.stop_nat2()
    pending = bed.popen("lan", ["upnpc", "-u", st.root_url, "-a", tb.LAN_HOST_IP, "8003", "8083", "TCP"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: len(st.nat1_forwards()) == 3, 5)
    st.kill("controld")
    pending.wait(30)
    bed.start_nat2()  # lease file kept: NAT2 still has our two mappings, with our nonces

    st.start_controld()
    assert wait_for(lambda: st.log("controld").count("renewed mapping") >= 2, 10), st.log("controld")[-2000:]
    assert st.nat1_forwards() == nat1  # the in-flight one's binding is gone
    assert nat2_ports(bed) == rules
    assert sorted(e[0] for e in listing(st)) == [8080, 8082]
    assert "NOT_AUTHORIZED" not in st.log("controld")
    assert bed.internet_reaches(8000, 8080, PAYLOAD)

    st.kill("controld")
    st.start_controld()
    status, body = soap_call(st, "DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": "8082",
                                                       "NewProtocol": "TCP"})
    assert status == 200, body  # NAT2 accepted the stored nonce
    assert set(nat2_ports(bed)) == {8080}
    assert list(st.nat1_forwards().values()) == [(tb.LAN_HOST_IP, 8000)]


def test_no_nat1_mode_maps_with_third_party(make_testbed) -> None:
    """A routed LAN behind the provider NAT (docs/requirements.md IWF-2a, 33, 39): MAP with
    THIRD_PARTY naming the LAN host, no NAT1 binding; miniupnpd allows it with
    pcp_allow_thirdparty and a permission line for the LAN."""
    bed = make_testbed()
    bed.stop_nat2()
    base = bed.nat2_config()
    bed.nat2_config = lambda: base.replace("deny 0-65535", f"allow 1024-65535 {tb.LAN_SUBNET} 1-65535\ndeny 0-65535")
    bed.start_nat2()
    bed.run("isp", ["ip", "route", "add", tb.LAN_SUBNET, "via", tb.ROUTER_WAN_IP])
    st = Stack(bed, mode="no-nat1")
    try:
        st.start()
        status, body = add(st, 8080, 8000)
        assert status == 200, body
        assert nat2_ports(bed)[8080] == (tb.LAN_HOST_IP, 8000)
        assert st.nat1_forwards() == {}
        assert bed.internet_reaches(8000, 8080, PAYLOAD)
        status, body = soap_call(st, "GetExternalIPAddress", {})
        assert _value(body, "NewExternalIPAddress") == tb.NAT2_PUBLIC_IP
        status, body = soap_call(st, "DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": "8080",
                                                           "NewProtocol": "TCP"})
        assert status == 200, body
        assert 8080 not in nat2_ports(bed)
    finally:
        st.close()
