"""natd's fw4 layout (chains and maps inside OpenWrt's `inet fw4`, from the packaging/fw4
include files) on the namespace test bed, and the IPv4-only guarantee in the inet family.

The router gets a stand-in for fw4's ruleset, rendered the way fw4 does it
(openwrt.md §4.1-4.2: "table inet fw4 / flush table inet fw4 / table inet fw4 {...}",
chain-post and table-post includes, forward policy drop), so a reload is the same
`nft -f` fw4 runs. Same natd code path as standalone, chosen by --layout fw4.
"""

from __future__ import annotations

import subprocess

import pytest

from natd.nft import Layout
from shared import testbed as tb
from shared import wire
from tests.test_natd_helpers import elements, here, natd_only, python, reaches, wait_until  # noqa: F401

pytestmark = pytest.mark.netns

LAN = tb.LAN_HOST_IP
WAN = tb.ROUTER_WAN_IP
WAN6, ISP6, LAN6, ROUTER_LAN6 = "fd00:64::2", "fd00:64::1", "fd00:1::2", "fd00:1::1"


def fw4_ruleset(inc: str) -> str:
    """fw4's shape, cut to what matters here: base chains, drop policy, include points."""
    return f"""table inet fw4
flush table inet fw4
table inet fw4 {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{tb.ROUTER_LAN_IF}" oifname "{tb.ROUTER_WAN_IF}" accept
        include "{inc}/chain-post/forward/*.nft"
    }}
    chain dstnat {{
        type nat hook prerouting priority dstnat; policy accept;
        include "{inc}/chain-post/dstnat/*.nft"
    }}
    chain srcnat {{
        type nat hook postrouting priority srcnat; policy accept;
        include "{inc}/chain-post/srcnat/*.nft"
    }}
    include "{inc}/table-post/*.nft"
}}
"""


def _fw4_and_ipv6(bed: tb.Testbed) -> None:
    path = bed.path("fw4.nft")
    with open(path, "w") as f:
        f.write(fw4_ruleset(here("..", "packaging", "fw4")))
    bed.run("cpe", ["nft", "-f", path])
    # IPv6 beside IPv4, forwarding on: a v6 packet could be forwarded if a rule let it.
    for ns, addr, dev in (("cpe", f"{WAN6}/64", tb.ROUTER_WAN_IF), ("isp", f"{ISP6}/64", tb.ISP_INT_IF),
                          ("lan", f"{LAN6}/64", tb.LAN_HOST_IF), ("cpe", f"{ROUTER_LAN6}/64", tb.ROUTER_LAN_IF)):
        bed.run(ns, ["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"])
    bed.run("cpe", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    bed.run("lan", ["ip", "-6", "route", "add", "default", "via", ROUTER_LAN6])
    bed.run("isp", ["ip", "-6", "route", "add", "fd00:1::/64", "via", WAN6])


def _reload_fw4(bed: tb.Testbed) -> None:
    bed.run("cpe", ["nft", "-f", bed.path("fw4.nft")])


def test_fw4_layout_forwards_survive_a_fw4_reload(natd_only) -> None:
    st, c = natd_only(natd_args=["--layout", "fw4"], before=_fw4_and_ipv6)
    bed = st.bed
    assert c.call(wire.Bind(1, 6, LAN, 8004, 20004)) == wire.BindReply(WAN, 20004)
    assert elements(bed, "fwd4", "fw4") == {("tcp", 20004): (LAN, 8004)}
    assert bed.run("cpe", ["nft", "list", "table", "ip", "igdpcp"], check=False).returncode != 0  # no own table
    # fw4's forward policy is drop: only natd's accept (reached by the include's jump) lets it in.
    assert reaches(bed, "isp", WAN, 20004, 8004) is not None

    _reload_fw4(bed)
    took = wait_until(lambda: elements(bed, "fwd4", "fw4") == {("tcp", 20004): (LAN, 8004)}
                      and "igdpcp forward" in bed.run("cpe", ["nft", "list", "chain", "inet", "fw4",
                                                              "igdpcp_forward"], check=False).stdout, 2.0)
    assert took is not None, st.log("natd")[-2000:]
    assert reaches(bed, "isp", WAN, 20004, 8004) is not None
    rules = bed.run("cpe", ["nft", "list", "chain", "inet", "fw4", "igdpcp_srcnat"]).stdout
    # the include's rules and natd's are the same: no duplicates
    assert rules.count("comment") == len(Layout.make("fw4").chains()["igdpcp_srcnat"])


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


def test_ipv6_packet_does_not_match_an_ipv4_forward(natd_only) -> None:
    """inet family: a v6 SYN to the router's v6 WAN address on a mapped port is not DNATed
    (the router itself refuses it); the same port over v4 reaches the LAN server."""
    st, c = natd_only(natd_args=["--layout", "fw4"], before=_fw4_and_ipv6)
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
