"""natd's NAT1 data plane on the namespace test bed, real nftables and conntrack (issue #5).

The outside client is the ISP namespace (100.64.0.1) talking to the router's WAN address
100.64.0.2: NAT1 on its own, no NAT2 in the way. Every test looks at what a user sees:
bytes arriving on the LAN host, the source address it sees, the map elements, conntrack.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from shared import wire
from shared.const import PCP_CLIENT_PORT, PCP_SERVER_PORT
from tests.bed import testbed as tb
from tests.bed.natd import HOLD_SCRIPT, conntrack, elements, python, reaches, wait_until

pytestmark = pytest.mark.netns

LAN = tb.LAN_HOST_IP
WAN = tb.ROUTER_WAN_IP


def _ruleset(bed: tb.Testbed) -> str:
    return bed.run("cpe", ["nft", "list", "table", "ip", "igdpcp"]).stdout


def test_forward_is_one_map_element_snat_and_conntrack_cleanup(natd_only) -> None:
    """One forward = one fwd4 element (+ its snat4 element); rules never change with N;
    outbound from the mapped port leaves from the mapped WAN port (endpoint-independent);
    a delete also removes the forward's conntrack entries."""
    st, c = natd_only()
    bed = st.bed
    rules_before = _ruleset(bed).count("comment")
    assert c.call(wire.Bind(1, 6, LAN, 8000, 20000)) == wire.BindReply(WAN, 20000)
    assert elements(bed, "fwd4") == {("tcp", 20000): (LAN, 8000)}
    assert elements(bed, "snat4") == {(LAN, "tcp", 8000): (WAN, 20000)}
    assert _ruleset(bed).count("comment") == rules_before

    assert reaches(bed, "isp", WAN, 20000, 8000) is not None
    assert "dport=20000" in conntrack(bed)
    # The LAN host starts a flow from its mapped port: the outside sees WAN:20000.
    code = ("import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            "s.bind(('0.0.0.0',8000));s.settimeout(3);s.connect((sys.argv[1],9001));s.sendall(b'x');s.close()")
    out = bed.tcp_listen("isp", 9001)
    bed.run("lan", [python(), "-c", code, tb.ISP_INT_IP], check=False)
    assert out.received(3) == b"x" and tuple(out.peer()) == (WAN, 20000)

    assert c.call(wire.Unbind(1)) == wire.Ok()
    assert elements(bed, "fwd4") == {} and elements(bed, "snat4") == {}
    assert wait_until(lambda: "dport=20000" not in conntrack(bed), 2.0) is not None, conntrack(bed)
    assert reaches(bed, "isp", WAN, 20000, 8000, timeout=1.5) is None


def test_the_healer_repairs_a_changed_element_and_leaves_a_foreign_change_alone(natd_only) -> None:
    """A ruleset change that is not to natd's objects (a table of someone else's, as an fw4 reload
    makes) is checked element by element and left alone; one of natd's elements pointed elsewhere
    by hand, or one gone, is put back."""
    st, c = natd_only()
    bed = st.bed
    assert c.call(wire.Sync([wire.Binding(i, 6, LAN, 8000 + i, 20000 + i) for i in range(1, 201)]), timeout=30) \
        == wire.SyncReply(200, 0)
    restores = st.log("natd").count("changed under natd")
    bed.nft("cpe", "table inet someone_else {\n chain c {\n type filter hook input priority 10;\n }\n}\n")
    time.sleep(1.0)  # the monitor's event, the healer's debounce and check: well within a second
    assert st.log("natd").count("changed under natd") == restores
    bed.nft("cpe", "delete element ip igdpcp fwd4 { tcp . 20005, tcp . 20006 }\n"
                   f"add element ip igdpcp fwd4 {{ tcp . 20005 : {tb.LAN_HOST_IP} . 9999 }}\n")
    assert wait_until(lambda: (elements(bed, "fwd4").get(("tcp", 20005)), elements(bed, "fwd4").get(("tcp", 20006)))
                      == ((LAN, 8005), (LAN, 8006)), 3.0) is not None, elements(bed, "fwd4")
    assert "changed under natd (map elements changed)" in st.log("natd")
    assert len(elements(bed, "fwd4")) == 200 and len(elements(bed, "snat4")) == 200
    bed.nft("cpe", f"add element ip igdpcp fwd4 {{ tcp . 30000 : {tb.LAN_HOST_IP} . 1 }}\n")  # one too many
    assert wait_until(lambda: ("tcp", 30000) not in elements(bed, "fwd4"), 3.0) is not None


def test_hairpin_from_the_lan_reaches_the_mapped_server(natd_only) -> None:
    """A LAN host connecting to WAN:port reaches the mapped server, which sees the router
    (masquerade), so its answer comes back through NAT1."""
    def before(bed: tb.Testbed) -> None:
        # ctl is a second LAN host here; it has no default route of its own.
        bed.run("ctl", ["ip", "route", "add", WAN, "via", tb.ROUTER_LAN_IP])
        # Route (do not bridge) DNATed frames as an OpenWrt router does: with br_netfilter's
        # bridge-nf-call-iptables the server's own request would be bridged back to its port.
        bed.run("cpe", ["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"], check=False)

    st, c = natd_only(before=before)
    c.call(wire.Bind(1, 6, LAN, 8001, 20001))
    peer = reaches(st.bed, "ctl", WAN, 20001, 8001)
    assert peer is not None and peer[0] == tb.ROUTER_LAN_IP  # masqueraded: the answer returns via NAT1
    assert reaches(st.bed, "lan", WAN, 20001, 8001) is not None  # the server itself, via the router
    outside = reaches(st.bed, "isp", WAN, 20001, 8001)
    assert outside is not None and outside[0] == tb.ISP_INT_IP  # outside: no masquerade


def test_10k_forwards_flush_restore_and_no_residue(natd_only) -> None:
    """10,000 forwards by sync; `nft flush ruleset` -> restored within 2 s, traffic flows
    again; everything removed leaves exactly the empty start state and no conntrack."""
    st, c = natd_only()
    bed = st.bed
    baseline = _ruleset(bed)
    hosts = [f"192.168.1.{i}" for i in range(10, 13)] + [LAN]
    n = 10_000
    bindings = [wire.Binding(i + 1, 6 if i % 2 else 17, hosts[i % 4], 1000 + i, 20_000 + i) for i in range(n - 1)]
    last = wire.Binding(n, 6, LAN, 8002, 20_000 + n)
    bindings.append(last)
    assert c.call(wire.Sync(bindings), timeout=30) == wire.SyncReply(n, 0)
    # written as one netlink batch (natd.nft BULK_MIN): every key and value as nft reads them back
    names = {6: "tcp", 17: "udp"}
    assert elements(bed, "fwd4") == {(names[b.proto], b.wan_port): (b.lan_ip, b.lan_port) for b in bindings}
    assert elements(bed, "snat4") == {(b.lan_ip, names[b.proto], b.lan_port): (WAN, b.wan_port) for b in bindings}
    assert reaches(bed, "isp", WAN, last.wan_port, 8002) is not None

    bed.run("cpe", ["nft", "flush", "ruleset"])
    took = wait_until(lambda: len(elements(bed, "fwd4")) == n, 2.0, step=0.05)
    assert took is not None, st.log("natd")[-2000:]
    assert c.next_event("restored", 2.0) is not None
    assert reaches(bed, "isp", WAN, last.wan_port, 8002) is not None
    assert len(elements(bed, "snat4")) == n and len(elements(bed, "wan4")) == 1

    # One by one too, then everything away.
    for i in range(50):
        c.call(wire.Unbind(i + 1))
    assert len(elements(bed, "fwd4")) == n - 50
    assert c.call(wire.Sync([]), timeout=30) == wire.SyncReply(0, n - 50)
    assert _ruleset(bed) == baseline
    assert wait_until(lambda: f"dport={last.wan_port}" not in conntrack(bed), 2.0) is not None


def test_kill9_keeps_traffic_restart_adopts_without_duplicates(natd_only) -> None:
    """natd is SIGKILLed with forwards live: established and new flows keep working; the
    next natd adopts the kernel's forwards (no gap), and controld's re-sync changes nothing."""
    st, c = natd_only()
    bed = st.bed
    bindings = [wire.Binding(i + 1, 6, LAN, 3000 + i, 21_000 + i) for i in range(200)]
    c.call(wire.Sync(bindings))
    boot = c.call(wire.Hello()).boot_id
    before = (elements(bed, "fwd4"), elements(bed, "snat4"))

    listener = bed.tcp_listen("lan", 3199, timeout=20)
    hold = bed.popen("isp", [python(), "-c", HOLD_SCRIPT, WAN, "21199"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)
    assert hold.stdout.readline().strip() == "connected"
    st.kill("natd")
    assert reaches(bed, "isp", WAN, 21_000, 3000) is not None  # new flow, natd dead
    st.start_natd()
    hold.stdin.write("go\n")
    hold.stdin.flush()
    assert hold.wait(10) == 0
    assert listener.received(5) == b"before|after"  # the established flow never broke

    assert "adopted 200 forwards" in st.log("natd")
    assert (elements(bed, "fwd4"), elements(bed, "snat4")) == before
    hello = c.call(wire.Hello(), timeout=10)
    assert hello.boot_id != boot
    assert c.call(wire.Sync(bindings)) == wire.SyncReply(0, 0)
    assert (elements(bed, "fwd4"), elements(bed, "snat4")) == before


def test_wan_address_change_moves_bindings(natd_only) -> None:
    """natd's rtnetlink watch sees the new WAN address: an event to controld, and the forwards answer on it."""
    new = "100.64.0.3"
    st, c = natd_only(before=lambda bed: bed.run("cpe", ["sysctl", "-qw",
                                                           f"net.ipv4.conf.{tb.ROUTER_WAN_IF}.promote_secondaries=1"]))
    bed = st.bed
    c.call(wire.Bind(1, 6, LAN, 8003, 20003))
    time.sleep(0.2)  # let the SUB connection settle before the change
    bed.run("cpe", ["ip", "addr", "add", f"{new}/24", "dev", tb.ROUTER_WAN_IF])
    bed.run("cpe", ["ip", "addr", "del", f"{WAN}/24", "dev", tb.ROUTER_WAN_IF])
    ev = None
    for _ in range(5):  # bounded: skip the intermediate two-address event
        ev = c.next_event("wan", 3.0)
        if ev is None or ev.wan_ip == new:
            break
    assert ev is not None and ev.wan_ip == new, st.log("natd")[-1500:]
    assert wait_until(lambda: list(elements(bed, "wan4")) == [f'"{new}"'], 2.0) is not None
    assert elements(bed, "snat4") == {(LAN, "tcp", 8003): (new, 20003)}
    assert reaches(bed, "isp", new, 20003, 8003) is not None
    assert reaches(bed, "isp", WAN, 20003, 8003, timeout=1.0) is None


def test_unsolicited_announce_and_mapping_update_become_events(natd_only) -> None:
    """RFC 6887 §14.1: after natd relayed a request to the server, an
    ANNOUNCE the server sends to WAN:5350, and a MAP update for a binding, reach controld as
    pcp.rx events (the MAP mapped back to the LAN port); a stranger's packet does not."""
    import ipaddress

    from shared import pcp

    st, c = natd_only()
    bed = st.bed
    c.call(wire.Bind(1, 6, LAN, 8006, 20006))
    ann = pcp.encode_request(pcp.Request(pcp.Opcode.ANNOUNCE, 0, ipaddress.IPv4Address("0.0.0.0")))
    c.call(wire.PcpExchange(tb.ISP_INT_IP, ann))  # natd now knows 100.64.0.1 as its PCP server
    time.sleep(0.2)
    announce = pcp.encode_response(pcp.Response(pcp.Opcode.ANNOUNCE, pcp.Result.SUCCESS, 0, 5))
    bed.udp_send("isp", WAN, PCP_CLIENT_PORT, announce, bind=(tb.ISP_INT_IP, PCP_SERVER_PORT))
    ev = c.next_event("pcp.rx", 3.0)
    assert ev is not None and ev.server == tb.ISP_INT_IP and pcp.decode_response(ev.packet).epoch == 5
    update = pcp.encode_response(pcp.Response(
        pcp.Opcode.MAP, pcp.Result.SUCCESS, 600, 6,
        pcp.MapData(b"n" * 12, 6, 20006, 8080, ipaddress.IPv4Address(tb.NAT2_PUBLIC_IP))))
    bed.udp_send("isp", WAN, PCP_CLIENT_PORT, update, bind=(tb.ISP_INT_IP, PCP_SERVER_PORT))
    ev = c.next_event("pcp.rx", 3.0)
    assert ev is not None and (ev.mid, ev.lan_ip) == (1, LAN)
    answer = pcp.decode_response(ev.packet).map
    assert answer is not None and answer.internal_port == 8006
    bed.udp_send("isp", WAN, PCP_CLIENT_PORT, announce, bind=(tb.ISP_INT_IP, 5999))  # not from the PCP port
    assert c.next_event("pcp.rx", 1.0) is None


def test_sighup_verifies_and_restores_forwards_without_dropping_them(natd_only) -> None:
    """packaging's hotplug and procd reload send SIGHUP: natd re-checks and repairs, keeps running."""
    st, c = natd_only()
    bed = st.bed
    c.call(wire.Bind(1, 6, LAN, 8007, 20007))
    # SIGHUP's default action would end natd; it must re-verify instead (a damaged map here).
    bed.run("cpe", ["nft", "delete", "element", "ip", "igdpcp", "fwd4", "{ tcp . 20007 }"])
    st.procs["natd"].send_signal(1)
    assert wait_until(lambda: elements(bed, "fwd4") == {("tcp", 20007): (LAN, 8007)}, 3.0) is not None
    assert st.procs["natd"].poll() is None and "SIGHUP" in st.log("natd")
    assert reaches(bed, "isp", WAN, 20007, 8007) is not None
