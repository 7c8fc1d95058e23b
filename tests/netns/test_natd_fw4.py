"""natd's fw4 layout against fw4's real default ruleset, on the namespace test bed.

The router loads tests/data/fw4-default.nft (OpenWrt fw4's generated default ruleset: input
and forward policy drop, ``srcnat_wan`` masquerade) adapted to the bed: its interface names,
no flowtable and no conntrack helpers, a guest zone beside lan and wan, and packaging/fw4's
include files spliced in where fw4 includes /usr/share/nftables.d/ (table-pre/table-post,
chain-pre/chain-post). A ``fw4 reload`` is the same ``nft -f`` of that text (its first lines
flush the table); a restart deletes the table first. Assertions are on packets.
"""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from natd.nft import Layout
from shared import pcp, wire
from tests.bed import testbed as tb
from tests.bed.fw4 import GUEST_IF, INCLUDES, fw4_ruleset, include_files
from tests.bed.natd import elements, python, reaches, wait_until

pytestmark = pytest.mark.netns

LAN = tb.LAN_HOST_IP
WAN = tb.ROUTER_WAN_IP
WAN6, ISP6, LAN6, ROUTER_LAN6 = "fd00:64::2", "fd00:64::1", "fd00:1::2", "fd00:1::1"
GUEST_HOST_IF = "eth0"
ROUTER_GUEST_IP, GUEST_HOST_IP = "192.168.2.1", "192.168.2.2"
OTHER_ISP_IP = "100.64.0.9"  # a second host on the provider side that is not the PCP server

def _guest_ns(bed: tb.Testbed) -> str:
    return f"{bed.prefix}-gst"


def _guest(bed: tb.Testbed, argv: list[str], check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", _guest_ns(bed), *argv], capture_output=True, text=True,
                          timeout=timeout, check=check)


def _bed_for_fw4(bed: tb.Testbed) -> None:
    """fw4 in place of the bed's stand-in masquerade, a guest host, IPv6 beside IPv4."""
    bed.run("cpe", ["nft", "delete", "table", "ip", tb.ROUTER_FW_TABLE])
    gns = _guest_ns(bed)
    subprocess.run(["ip", "netns", "add", gns], check=True)
    bed.run("cpe", ["ip", "link", "add", GUEST_IF, "index", "30", "type", "veth", "peer", "name", GUEST_HOST_IF,
                    "index", "31", "netns", gns])
    bed.run("cpe", ["ip", "addr", "add", f"{ROUTER_GUEST_IP}/24", "dev", GUEST_IF])
    bed.run("cpe", ["ip", "link", "set", GUEST_IF, "up"])
    for argv in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", GUEST_HOST_IF, "up"],
                 ["ip", "addr", "add", f"{GUEST_HOST_IP}/24", "dev", GUEST_HOST_IF],
                 ["ip", "route", "add", "default", "via", ROUTER_GUEST_IP]):
        _guest(bed, argv)
    bed.run("isp", ["ip", "addr", "add", f"{OTHER_ISP_IP}/24", "dev", tb.ISP_INT_IF])
    with open(bed.path("fw4.nft"), "w") as f:
        f.write(fw4_ruleset())
    bed.run("cpe", ["nft", "-f", bed.path("fw4.nft")])
    for ns, addr, dev in (("cpe", f"{WAN6}/64", tb.ROUTER_WAN_IF), ("isp", f"{ISP6}/64", tb.ISP_INT_IF),
                          ("lan", f"{LAN6}/64", tb.LAN_HOST_IF), ("cpe", f"{ROUTER_LAN6}/64", tb.ROUTER_LAN_IF)):
        bed.run(ns, ["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"])
    bed.run("cpe", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    bed.run("lan", ["ip", "-6", "route", "add", "default", "via", ROUTER_LAN6])
    bed.run("isp", ["ip", "-6", "route", "add", "fd00:1::/64", "via", WAN6])
    # Operationally up before the first packet (see Testbed._wait_links_up).
    assert wait_until(lambda: "LOWER_UP" in _guest(bed, ["ip", "link", "show", GUEST_HOST_IF]).stdout
                      and ",UP" in bed.run("cpe", ["ip", "link", "show", GUEST_IF]).stdout, 5.0) is not None


@pytest.fixture
def fw4_natd(natd_only):  # noqa: F811
    """natd --layout fw4 on a router running fw4's default ruleset; the guest namespace goes too."""
    beds: list[tb.Testbed] = []

    def before(bed: tb.Testbed) -> None:
        beds.append(bed)
        _bed_for_fw4(bed)

    try:
        yield natd_only(natd_args=["--layout", "fw4"], before=before)
    finally:
        for bed in beds:
            subprocess.run(["ip", "netns", "del", _guest_ns(bed)], check=False, capture_output=True)


def _fw4_reload(bed: tb.Testbed) -> None:
    bed.run("cpe", ["nft", "-f", bed.path("fw4.nft")])


def _fw4_restart(bed: tb.Testbed) -> None:
    bed.run("cpe", ["nft", "delete", "table", "inet", "fw4"])
    _fw4_reload(bed)


def _our_rules(bed: tb.Testbed, chain: str) -> str:
    return bed.run("cpe", ["nft", "list", "chain", "inet", "fw4", chain], check=False).stdout


def test_the_loaded_ruleset_is_fw4s_with_our_includes_in_fw4s_places(fw4_natd) -> None:
    st, _c = fw4_natd
    rules = st.bed.run("cpe", ["nft", "list", "table", "inet", "fw4"]).stdout

    def chain(name: str) -> list[str]:
        body = rules.split(f"\tchain {name} {{\n", 1)[1].split("\n\t}", 1)[0]
        return [x.strip() for x in body.splitlines() if x.strip() and not x.strip().startswith("type ")]

    # srcnat: our jump first, before fw4's jump to the masquerade; input: right after loopback.
    assert chain("srcnat")[0].startswith("jump igdpcp_srcnat") and "jump srcnat_wan" in chain("srcnat")[1]
    assert chain("input")[1].startswith("jump igdpcp_input") and '"lo" accept' in chain("input")[0]
    # dstnat/forward: after fw4's own rules, before forward's final reject.
    assert chain("forward")[-2].startswith("jump igdpcp_forward") and chain("forward")[-1] == "jump handle_reject"
    assert chain("dstnat")[-1].startswith("jump igdpcp_dstnat")
    assert "masquerade" in "".join(chain("srcnat_wan")) and "policy drop" in rules.split("chain forward {")[1][:200]


def test_forwards_pass_fw4s_drop_policy_and_survive_reload_restart_and_stop(fw4_natd) -> None:
    st, c = fw4_natd
    bed = st.bed
    assert c.call(wire.Bind(1, 6, LAN, 8004, 20004)) == wire.BindReply(WAN, 20004)
    assert elements(bed, "fwd4", "fw4") == {("tcp", 20004): (LAN, 8004)}
    assert bed.run("cpe", ["nft", "list", "table", "ip", "igdpcp"], check=False).returncode != 0  # no own table
    # fw4's forward policy is drop: only natd's accept (reached by the include's jump) lets it in.
    assert reaches(bed, "isp", WAN, 20004, 8004) is not None

    for what, action in (("fw4 reload", _fw4_reload), ("fw4 restart", _fw4_restart)):
        action(bed)
        took = wait_until(lambda: elements(bed, "fwd4", "fw4") == {("tcp", 20004): (LAN, 8004)}
                          and "igdpcp forward" in _our_rules(bed, "igdpcp_forward"), 2.0)
        assert took is not None, (what, st.log("natd")[-2000:])
        assert reaches(bed, "isp", WAN, 20004, 8004) is not None, what
        # The include's rules and natd's are the same text: no duplicates.
        assert _our_rules(bed, "igdpcp_srcnat").count("comment") == len(
            Layout.make("fw4").chains()["igdpcp_srcnat"]), what

    # A stop closes every port (as miniupnpd's does); the chains stay for the next start.
    assert st.stop("natd") == 0
    assert elements(bed, "fwd4", "fw4") == {} and elements(bed, "snat4", "fw4") == {}
    assert reaches(bed, "isp", WAN, 20004, 8004, timeout=1.0) is None
    assert "stop: closed 1 forwards" in st.log("natd")


def test_lan_host_sending_from_a_mapped_port_keeps_it_through_fw4s_masquerade(fw4_natd) -> None:
    """Our SNAT runs before fw4's srcnat_wan masquerade (chain-pre): the Internet sees the
    mapped WAN port, not the LAN port masquerade would keep."""
    st, c = fw4_natd
    bed = st.bed
    c.call(wire.Bind(1, 17, LAN, 8006, 20006))
    c.call(wire.Bind(2, 6, LAN, 8007, 20007))
    udp = bed.udp_listen("isp", 7006, timeout=5)
    bed.udp_send("lan", tb.ISP_INT_IP, 7006, b"from the mapped port", bind=("0.0.0.0", 8006))
    assert udp.received(3) == b"from the mapped port"
    assert udp.peer() == (WAN, 20006)
    tcp = bed.tcp_listen("isp", 7007, timeout=5)
    out = bed.run("lan", [python(), "-c", BOUND_CONNECT, tb.ISP_INT_IP, "7007", "8007"]).stdout.strip()
    assert out == "connected" and tcp.peer(3) == (WAN, 20007)
    # Unmapped source ports still leave through fw4's masquerade.
    other = bed.udp_listen("isp", 7008, timeout=5)
    bed.udp_send("lan", tb.ISP_INT_IP, 7008, b"x", bind=("0.0.0.0", 8100))
    assert other.received(3) == b"x" and other.peer() == (WAN, 8100)


def test_guest_zone_host_cannot_reach_a_lan_host_through_the_wan_address(fw4_natd) -> None:
    """DNAT and the forward accept match WAN ingress only: a guest's SYN to WANaddr:port stays
    addressed to the router, whose guest input policy rejects it."""
    st, c = fw4_natd
    bed = st.bed
    c.call(wire.Bind(1, 6, LAN, 8009, 20009))
    listener = bed.tcp_listen("lan", 8009, timeout=6)
    guest = _guest(bed, [python(), "-c", CONNECT, WAN, "20009", "guest"]).stdout.strip()
    assert guest == "refused", guest
    assert listener.received(1.0) == b""
    # The guest host is otherwise fine: it reaches the provider side through fw4's masquerade.
    up = bed.tcp_listen("isp", 7009, timeout=6)
    assert _guest(bed, [python(), "-c", CONNECT, tb.ISP_INT_IP, "7009", "out"]).stdout.strip() == "connected"
    peer = up.peer(3)
    assert peer is not None and peer[0] == WAN
    # And the WAN still reaches the forward.
    assert reaches(bed, "isp", WAN, 20009, 8009) is not None


def test_traffic_from_a_mapped_port_into_another_zone_keeps_its_source(fw4_natd) -> None:
    """The SNAT to the mapped WAN port is for WAN egress only: lan -> guest traffic from a
    mapped port reaches the guest host from the LAN host's own address and port."""
    st, c = fw4_natd
    bed = st.bed
    c.call(wire.Bind(1, 17, LAN, 8010, 20010))
    srv = subprocess.Popen(["ip", "netns", "exec", _guest_ns(bed), python(), "-c", UDP_PEER, "7010"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        bed.udp_send("lan", GUEST_HOST_IP, 7010, b"to the guest", bind=("0.0.0.0", 8010))
        assert srv.communicate(timeout=10)[0].strip() == f"{LAN} 8010 to the guest"
    finally:
        srv.kill()
    # ... while towards the WAN the same socket leaves from the mapped port
    udp = bed.udp_listen("isp", 7011, timeout=5)
    bed.udp_send("lan", tb.ISP_INT_IP, 7011, b"out", bind=("0.0.0.0", 8010))
    assert udp.received(3) == b"out" and udp.peer() == (WAN, 20010)


def test_pcp_announce_gets_in_from_the_pcp_server_only(fw4_natd) -> None:
    """fw4's input policy drops udp 5350 from the WAN; natd's set of PCP servers (the ones it
    talks to) lets their ANNOUNCE in (RFC 6887 §14.1.3), nobody else's, also after a reload."""
    st, c = fw4_natd
    bed = st.bed
    announce = pcp.encode_response(pcp.Response(pcp.Opcode.ANNOUNCE, pcp.Result.SUCCESS, 0, 5))

    def arrives(src: str) -> bool:
        got = bed.udp_listen("cpe", pcp.ANNOUNCE_PORT, host=WAN, timeout=3)
        bed.udp_send("isp", WAN, pcp.ANNOUNCE_PORT, announce, bind=(src, pcp.SERVER_PORT))
        ok = got.received(1.5) == announce
        got.close()
        return ok

    assert not arrives(tb.ISP_INT_IP)  # natd has not talked to it yet: dropped like anyone's
    req = pcp.encode_request(pcp.Request(pcp.Opcode.ANNOUNCE, 0, ipaddress.IPv4Address("0.0.0.0")))
    assert isinstance(c.call(wire.PcpExchange(tb.ISP_INT_IP, req)), wire.PcpAnswer)
    assert wait_until(lambda: list(elements(bed, "pcp4", "fw4")) == [f'"{tb.ISP_INT_IP}"'], 2.0) is not None
    assert arrives(tb.ISP_INT_IP)
    assert not arrives(OTHER_ISP_IP)
    _fw4_reload(bed)
    assert wait_until(lambda: list(elements(bed, "pcp4", "fw4")) == [f'"{tb.ISP_INT_IP}"'], 2.0) is not None
    assert arrives(tb.ISP_INT_IP) and not arrives(OTHER_ISP_IP)


def test_include_files_name_only_what_natd_declares() -> None:
    """The jumps' positions: srcnat/input in chain-pre, dstnat/forward in chain-post."""
    lay = Layout.make("fw4")
    found = {(pos, chain) for pos, chain, _ in include_files(INCLUDES) if chain}
    assert found == {(lay.include_position(b), b) for b in lay.jumps()}
    assert found == {("chain-pre", "srcnat"), ("chain-pre", "input"), ("chain-post", "dstnat"),
                     ("chain-post", "forward")}


V6_LISTEN = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1]))); s.listen(4); s.settimeout(8)
print("ready", flush=True)
try:
    while True:
        c, peer = s.accept()
        print(peer[0], c.recv(100).decode(), flush=True)
except OSError:
    pass
"""

CONNECT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    s.sendall(sys.argv[3].encode()); s.close(); print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError as exc:
    print("failed", exc)
"""

UDP_PEER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(5)
print("ready", flush=True)
try:
    data, peer = s.recvfrom(100)
    print(peer[0], peer[1], data.decode(), flush=True)
except OSError as exc:
    print("nothing", exc)
"""

BOUND_CONNECT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2, source_address=("", int(sys.argv[3])))
    s.sendall(b"x"); s.close(); print("connected")
except OSError as exc:
    print("failed", exc)
"""


def test_ipv6_packet_does_not_match_an_ipv4_forward(fw4_natd) -> None:
    """inet family: a v6 SYN to the router's v6 WAN address on a mapped port is not DNATed
    (fw4's wan input policy refuses it); the same port over v4 reaches the LAN server."""
    st, c = fw4_natd
    bed = st.bed
    c.call(wire.Bind(1, 6, LAN, 8005, 20005))
    srv = bed.popen("lan", [python(), "-c", V6_LISTEN, "8005"], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        v6 = bed.run("isp", [python(), "-c", CONNECT, WAN6, "20005", "six"]).stdout.strip()
        v4 = bed.run("isp", [python(), "-c", CONNECT, WAN, "20005", "four"]).stdout.strip()
        assert (v6, v4) == ("refused", "connected")
        srv.terminate()
        out = srv.communicate(timeout=10)[0]
    finally:
        srv.kill()
    assert "four" in out and "six" not in out, out
