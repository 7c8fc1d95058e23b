"""The namespace test bed itself: routing, multicast, NAT2 as a PCP server, teardown."""

from __future__ import annotations

import ipaddress
import os
import signal
import struct
import subprocess
import time

import pytest

from shared.const import SSDP_GROUP, SSDP_PORT
from tests.bed import testbed as tb
from tests.bed.testbed import Testbed, list_namespaces

pytestmark = pytest.mark.netns

PCP_VERSION = 2
OP_ANNOUNCE = 0
OP_MAP = 1
PROTO_TCP = 6


def v4mapped(ip: str) -> bytes:
    """IPv4 address as the 16-byte IPv4-mapped IPv6 form PCP uses."""
    return ipaddress.IPv6Address(f"::ffff:{ip}").packed


def pcp_map_request(lifetime: int, nonce: bytes, internal_port: int, suggested_port: int,
                    client_ip: str = tb.ROUTER_WAN_IP, protocol: int = PROTO_TCP,
                    suggested_ip: str = "0.0.0.0") -> bytes:
    """RFC 6887 section 11.1 MAP request (24-byte header + 36-byte opcode data)."""
    assert len(nonce) == 12
    header = struct.pack("!BBHI16s", PCP_VERSION, OP_MAP, 0, lifetime, v4mapped(client_ip))
    opdata = nonce + struct.pack("!B3xHH16s", protocol, internal_port, suggested_port,
                                 v4mapped(suggested_ip))
    return header + opdata


def pcp_announce_request(client_ip: str = tb.ROUTER_WAN_IP) -> bytes:
    """RFC 6887 section 14.1 ANNOUNCE request (header only, lifetime 0)."""
    return struct.pack("!BBHI16s", PCP_VERSION, OP_ANNOUNCE, 0, 0, v4mapped(client_ip))


def parse_response(data: bytes) -> dict:
    """Common response header (RFC 6887 section 7.2), plus MAP opcode data if present."""
    version, op, _reserved, result, lifetime, epoch = struct.unpack("!BBBBII", data[:12])
    out = {"version": version, "r": bool(op & 0x80), "opcode": op & 0x7F, "result": result,
           "lifetime": lifetime, "epoch": epoch}
    if out["opcode"] == OP_MAP and len(data) >= 60:
        nonce = data[24:36]
        proto, int_port, ext_port, ext_ip = struct.unpack("!B3xHH16s", data[36:60])
        out.update(nonce=nonce, protocol=proto, internal_port=int_port,
                   external_port=ext_port, external_ip=ext_ip)
    return out


def pcp(bed: Testbed, request: bytes) -> bytes:
    """Send a PCP request from the router's WAN address to NAT2 and return the reply."""
    reply = bed.udp_exchange("cpe", tb.ISP_INT_IP, tb.PCP_PORT, request,
                             bind=(tb.ROUTER_WAN_IP, 0), timeout=2.0)
    assert reply is not None, "no PCP response from NAT2"
    return reply


def pcp_epoch(bed: Testbed) -> int:
    """NAT2's current epoch, from an ANNOUNCE exchange."""
    resp = parse_response(pcp(bed, pcp_announce_request()))
    assert resp["r"] and resp["opcode"] == OP_ANNOUNCE and resp["result"] == 0
    return resp["epoch"]


def map_8080(bed: Testbed, nonce: bytes, lifetime: int = 600) -> dict:
    resp = parse_response(pcp(bed, pcp_map_request(lifetime, nonce, 8080, 8080)))
    assert resp["result"] == 0, resp
    return resp


# ------------------------------------------------------------------------------ tests
def test_routing_through_both_nats(testbed: Testbed) -> None:
    # LAN -> Internet crosses NAT1 and NAT2: the inet host sees NAT2's public address.
    listener = testbed.tcp_listen("inet", 9000, timeout=5)
    assert testbed.tcp_send("lan", tb.INET_HOST_IP, 9000, b"through both NATs")
    assert listener.received(timeout=3) == b"through both NATs"
    peer = listener.peer()
    assert peer is not None and peer[0] == tb.NAT2_PUBLIC_IP

    # The Internet host has no route to the CGN range or the LAN.
    wan_listener = testbed.tcp_listen("cpe", 9001, timeout=5)
    lan_listener = testbed.tcp_listen("lan", 9002, timeout=5)
    assert not testbed.tcp_send("inet", tb.ROUTER_WAN_IP, 9001, b"x", timeout=2)
    assert not testbed.tcp_send("inet", tb.LAN_HOST_IP, 9002, b"x", timeout=2)
    assert wan_listener.received(timeout=0.2) == b"" and wan_listener.peer() is None
    assert lan_listener.received(timeout=0.2) == b"" and lan_listener.peer() is None

    # ctl sits on the LAN bridge (reaches the LAN host directly) but has no default route.
    ctl_listener = testbed.tcp_listen("lan", 9003, timeout=5)
    assert testbed.tcp_send("ctl", tb.LAN_HOST_IP, 9003, b"from ctl")
    assert ctl_listener.received(timeout=3) == b"from ctl"
    assert ctl_listener.peer() == (tb.CTL_IP, ctl_listener.peer()[1])  # type: ignore[index]
    assert not testbed.tcp_send("ctl", tb.INET_HOST_IP, 9000, b"x", timeout=2)


def test_ssdp_multicast_crosses_the_bridge(testbed: Testbed) -> None:
    msearch = f"M-SEARCH * HTTP/1.1\r\nHOST: {SSDP_GROUP}:{SSDP_PORT}\r\n\r\n".encode()
    in_ctl = testbed.udp_listen("ctl", SSDP_PORT, group=tb.SSDP_GROUP, timeout=5)
    testbed.udp_send("lan", SSDP_GROUP, SSDP_PORT, msearch, bind=(tb.LAN_HOST_IP, 0))
    assert in_ctl.received(timeout=3) == msearch
    assert in_ctl.peer()[0] == tb.LAN_HOST_IP  # type: ignore[index]

    notify = f"NOTIFY * HTTP/1.1\r\nHOST: {SSDP_GROUP}:{SSDP_PORT}\r\n\r\n".encode()
    in_lan = testbed.udp_listen("lan", SSDP_PORT, group=tb.SSDP_GROUP, timeout=5)
    testbed.udp_send("ctl", SSDP_GROUP, SSDP_PORT, notify, bind=(tb.CTL_IP, 0))
    assert in_lan.received(timeout=3) == notify
    assert in_lan.peer()[0] == tb.CTL_IP  # type: ignore[index]


def test_nat2_pcp_map_forward_and_delete(testbed: Testbed) -> None:
    nonce = os.urandom(12)
    reply = pcp(testbed, pcp_map_request(600, nonce, 8080, 8080))
    assert len(reply) == 60
    resp = parse_response(reply)
    assert resp["version"] == 2 and resp["r"] and resp["opcode"] == OP_MAP
    assert resp["result"] == 0
    assert resp["external_ip"] == v4mapped(tb.NAT2_PUBLIC_IP)
    assert resp["nonce"] == nonce
    assert resp["lifetime"] > 0
    assert resp["protocol"] == PROTO_TCP and resp["internal_port"] == 8080
    ext_port = resp["external_port"]
    assert ext_port == 8080  # the suggested port was free

    rule = tb.DnatRule("tcp", ext_port, tb.ROUTER_WAN_IP, 8080)
    assert rule in testbed.nat2_dnat_rules()

    # The Internet host reaches the router's WAN side through the mapping.
    listener = testbed.tcp_listen("cpe", 8080, host=tb.ROUTER_WAN_IP, timeout=5)
    assert testbed.tcp_send("inet", tb.NAT2_PUBLIC_IP, ext_port, b"via NAT2")
    assert listener.received(timeout=3) == b"via NAT2"
    assert listener.peer()[0] == tb.INET_HOST_IP  # type: ignore[index]

    # Delete: lifetime 0, same nonce, no suggestion.
    resp = parse_response(pcp(testbed, pcp_map_request(0, nonce, 8080, 0)))
    assert resp["result"] == 0 and resp["lifetime"] == 0 and resp["nonce"] == nonce
    assert rule not in testbed.nat2_dnat_rules()
    assert testbed.nat2_dnat_rules() == []
    listener = testbed.tcp_listen("cpe", 8080, host=tb.ROUTER_WAN_IP, timeout=5)
    assert not testbed.tcp_send("inet", tb.NAT2_PUBLIC_IP, ext_port, b"x", timeout=2)
    assert listener.received(timeout=0.2) == b""


def test_nat2_restart_loses_mappings(testbed: Testbed) -> None:
    map_8080(testbed, os.urandom(12))
    assert testbed.nat2_dnat_rules() == [tb.DnatRule("tcp", 8080, tb.ROUTER_WAN_IP, 8080)]
    # Let the epoch grow so that a reset is visible (PCP epochs count seconds).
    deadline = time.monotonic() + 5
    while (epoch_before := pcp_epoch(testbed)) < 2:
        assert time.monotonic() < deadline, "NAT2 epoch does not advance"
        time.sleep(0.25)
    old_pid = testbed.nat2_pid

    new_pid = testbed.restart_nat2()

    assert new_pid != old_pid and testbed.nat2_running()
    assert testbed.nat2_dnat_rules() == []
    assert pcp_epoch(testbed) < epoch_before
    listener = testbed.tcp_listen("cpe", 8080, host=tb.ROUTER_WAN_IP, timeout=5)
    assert not testbed.tcp_send("inet", tb.NAT2_PUBLIC_IP, 8080, b"x", timeout=2)
    assert listener.received(timeout=0.2) == b""
    # and it serves again
    map_8080(testbed, os.urandom(12))
    assert testbed.nat2_dnat_rules() == [tb.DnatRule("tcp", 8080, tb.ROUTER_WAN_IP, 8080)]


def test_nat2_lifetimes_are_configurable(make_testbed) -> None:
    bed = make_testbed(nat2_min_lifetime=10, nat2_max_lifetime=60)
    assert map_8080(bed, os.urandom(12), lifetime=3)["lifetime"] == 10
    assert map_8080(bed, os.urandom(12), lifetime=600)["lifetime"] == 60


def test_stop_and_kill_nat2(testbed: Testbed) -> None:
    pid = testbed.nat2_pid
    assert pid is not None
    testbed.stop_nat2()
    assert not testbed.nat2_running() and not tb.pid_alive(pid)
    assert testbed.udp_exchange("cpe", tb.ISP_INT_IP, tb.PCP_PORT, pcp_announce_request(),
                                bind=(tb.ROUTER_WAN_IP, 0), timeout=0.3) is None
    pid = testbed.start_nat2()
    assert pcp_epoch(testbed) <= 1
    testbed.kill_nat2()
    assert not testbed.nat2_running() and not tb.pid_alive(pid)
    testbed.stop_nat2()  # no-op when not running


def _prefix_namespaces(prefix: str) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(prefix + "-")]


def test_teardown_after_failing_body_leaves_nothing() -> None:
    bed = Testbed()
    stray: subprocess.Popen | None = None
    with pytest.raises(RuntimeError, match="deliberate"):
        try:
            bed.setup()
            bed.start_nat2()
            nat2_pid = bed.nat2_pid
            bed.tcp_listen("inet", 9000, timeout=30)
            # A process the bed does not track: teardown must find it via ip netns pids.
            stray = subprocess.Popen(["ip", "netns", "exec", bed.ns("lan"), "sleep", "60"],
                                     start_new_session=True)
            assert len(_prefix_namespaces(bed.prefix)) == 5
            raise RuntimeError("deliberate failure inside the test body")
        finally:
            bed.teardown()
    try:
        assert _prefix_namespaces(bed.prefix) == []
        assert bed.workdir is not None and not os.path.exists(bed.workdir)
        assert nat2_pid is not None and not tb.pid_alive(nat2_pid)
        assert stray is not None and stray.wait(timeout=5) in (-signal.SIGTERM, -signal.SIGKILL)
        bed.teardown()  # idempotent
    finally:
        if stray is not None and stray.poll() is None:
            stray.kill()
            stray.wait(timeout=5)


def test_teardown_after_failed_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: Testbed) -> None:
        raise RuntimeError("deliberate setup failure")

    monkeypatch.setattr(Testbed, "_setup_firewalls", boom)
    bed = Testbed()
    with pytest.raises(RuntimeError, match="deliberate setup failure"):
        with bed:
            pytest.fail("the body must not run")  # pragma: no cover
    assert _prefix_namespaces(bed.prefix) == []
    assert bed.workdir is not None and not os.path.exists(bed.workdir)
    bed.teardown()  # still idempotent
