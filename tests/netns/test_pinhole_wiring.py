"""UPnP WANIPv6FirewallControl:1 wired to natd's pinholes, end to end (docs/upnp.md "IPv6 pinholes").

The LAN host's ``upnpc -A`` / ``-D`` (miniupnpc 2.2.4: AddPinhole, DeletePinhole) on the IGD:2
device opens and closes a hole in natd's own IPv6 firewall (``--ipv6-firewall own``): bytes
from the Internet host reach the LAN host's global address only while it is open, and the
kernel's set holds the element only then. Secure mode is on (the default): the LAN host calls
from its IPv4 address and natd's neighbour table ties it to its IPv6 one (docs/pinholes.md
"Policy"); another LAN host's address is refused. One bed and one stack for the module.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator

import msgpack
import pytest

from natd.client import NatdClient
from shared import wire
from tests.bed import pcp_client as pc
from tests.bed import testbed as tb
from tests.bed.fixtures import ipv6_stack
from tests.bed.fw4 import fw4_ruleset
from tests.bed.natd import wait_until
from tests.bed.stack import HTTP_PORT, Stack

pytestmark = pytest.mark.netns

IGD2 = f"http://{tb.ROUTER_LAN_IP}:{HTTP_PORT}/igd2/rootDesc.xml"
LAN6 = tb.LAN_HOST_IP6
OTHER6 = "2001:db8:1::3"  # the ctl namespace: another host on the router's LAN bridge
NEW_PREFIX, NEW_ROUTER6, NEW_HOST6 = "2001:db8:2::/64", "2001:db8:2::1", "2001:db8:2::2"


@pytest.fixture(scope="module")
def st() -> Iterator[Stack]:
    """natd (own IPv6 firewall) and controld (defaults: secure mode) on one IPv6 bed."""

    def other_host(bed: tb.Testbed) -> None:
        bed.run("ctl", ["ip", "-6", "addr", "add", f"{OTHER6}/64", "dev", tb.CTL_IF, "nodad"])

    yield from ipv6_stack(other_host, nat2=True, natd_args=["--ipv6-firewall", "own"])



def elements(bed: tb.Testbed) -> set[tuple]:
    """natd's any-remote pinhole set as the kernel holds it."""
    res = bed.run("cpe", ["nft", "-j", "list", "set", "ip6", "igdpcp", "pin6"], check=False)
    assert res.returncode == 0, res.stderr
    return {tuple(e["elem"]["val"]["concat"]) for item in json.loads(res.stdout)["nftables"]
            for e in item.get("set", {}).get("elem", [])}


def upnpc(st: Stack, *args: str) -> str:
    return st.bed.run("lan", ["upnpc", "-u", IGD2, *args], check=False, timeout=30).stdout


def add_pinhole(st: Stack, client: str, port: int) -> str:
    """``upnpc -A`` from the LAN host (its IPv4 address); the Pinhole ID, or fails with upnpc's output."""
    out = upnpc(st, "-A", "empty", "0", client, str(port), "TCP", "600")
    found = re.search(r"Pinhole ID = (\d+)", out)
    assert found, out + st.log("controld")[-1500:]
    return found.group(1)


def test_secure_mode_opens_a_pinhole_to_the_callers_own_ipv6_address(st: Stack) -> None:
    bed = st.bed
    assert not bed.tcp_in6(8080)  # natd's default drop
    uid = add_pinhole(st, LAN6, 8080)  # from 192.168.1.2, for 2001:db8:1::2: one MAC in the router's table
    assert elements(bed) == {(LAN6, "tcp", 8080)}
    assert bed.tcp_in6(8080)
    assert not bed.tcp_in6(8081)  # only the port asked for
    # natd restarts (its stop closes every pinhole): controld sees the new boot id and re-syncs
    st.stop("natd")
    st.start_natd()
    assert wait_until(lambda: elements(bed) == {(LAN6, "tcp", 8080)}, 10, 0.2) is not None, st.log("controld")
    assert bed.tcp_in6(8080)
    # both restart: controld re-sends its stored rows at start
    st.stop("controld")
    st.stop("natd")
    st.start_natd()
    st.start_controld()
    assert wait_until(lambda: elements(bed) == {(LAN6, "tcp", 8080)}, 10, 0.2) is not None, st.log("controld")
    assert bed.tcp_in6(8080)
    out = upnpc(st, "-D", uid)
    assert "failed" not in out.lower(), out
    assert elements(bed) == set()
    assert not bed.tcp_in6(8080)
    # a privileged port: refused by the core's policy, nothing reaches natd
    assert "606" in upnpc(st, "-A", "empty", "0", LAN6, "80", "TCP", "600")
    assert elements(bed) == set()


def test_secure_mode_refuses_a_pinhole_to_another_lan_hosts_address(st: Stack) -> None:
    out = upnpc(st, "-A", "empty", "0", OTHER6, "8090", "TCP", "600")
    assert "606" in out, out
    assert elements(st.bed) == set()
    # natd solicited the other host and found its own link-layer address, not the caller's
    neighbours = st.bed.run("cpe", ["ip", "neigh", "show", "dev", tb.ROUTER_LAN_IF]).stdout
    macs = {line.split()[0]: line.split()[2] for line in neighbours.splitlines() if "lladdr" in line}
    assert macs[OTHER6] != macs[tb.LAN_HOST_IP], neighbours


def test_a_lan_prefix_added_and_removed_live_opens_and_closes_its_pinholes(st: Stack) -> None:
    bed = st.bed
    bed.run("lan", ["ip", "-6", "addr", "add", f"{NEW_HOST6}/64", "dev", tb.LAN_HOST_IF, "nodad"])
    bed.run("isp", ["ip", "-6", "route", "add", NEW_PREFIX, "via", tb.ROUTER_WAN_IP6])
    bed.run("cpe", ["ip", "-6", "addr", "add", f"{NEW_ROUTER6}/64", "dev", tb.ROUTER_LAN_IF, "nodad"])
    assert wait_until(lambda: NEW_PREFIX in st.log("controld"), 5.0) is not None, st.log("controld")[-1500:]
    uid = add_pinhole(st, NEW_HOST6, 8100)
    assert elements(bed) == {(NEW_HOST6, "tcp", 8100)}
    assert bed.tcp_in6(8100, NEW_HOST6)
    bed.run("cpe", ["ip", "-6", "addr", "del", f"{NEW_ROUTER6}/64", "dev", tb.ROUTER_LAN_IF])
    assert wait_until(lambda: elements(bed) == set(), 3.0) is not None, st.log("natd")[-1500:]
    gone = f"pinhole {uid} TCP [*]:* -> [{NEW_HOST6}]:8100 closed: its address left the LAN prefixes"
    assert wait_until(lambda: gone in st.log("controld"), 3.0) is not None, st.log("controld")[-1500:]
    assert "606" in upnpc(st, "-A", "empty", "0", NEW_HOST6, "8101", "TCP", "600")
    assert elements(bed) == set()
    assert "704" in upnpc(st, "-D", uid)  # NoSuchEntry: controld forgot it too


def test_natd_answers_same_host_from_the_neighbour_table_and_types_its_refusals(st: Stack) -> None:
    c = NatdClient(st.rpc)
    try:
        assert c.call(wire.SameHost(tb.LAN_HOST_IP, LAN6)) == wire.SameHostReply(True)
        assert c.call(wire.SameHost(LAN6, OTHER6)) == wire.SameHostReply(False)
        assert c.call(wire.SameHost(tb.LAN_HOST_IP, "2001:db8:99::2")) == wire.SameHostReply(False)  # not LAN
        bads: list[dict[str, object]] = [{"a": "192.168.1.2", "b": "me"}, {"a": "192.168.1.2"},
                                         {"a": 1, "b": LAN6}, {"a": "192.168.1.2", "b": LAN6, "mac": "aa"}]
        for i, bad in enumerate(bads):
            c.send_raw(msgpack.packb({"v": 2, "op": "neigh.same_host", "id": 40 + i, **bad}))
            reply, rid = wire.decode(c.recv_raw(5) or b"")
            assert isinstance(reply, wire.Error) and reply.code == "bad-field" and rid == 40 + i, reply
        assert c.call(wire.SameHost(LAN6, tb.LAN_HOST_IP)) == wire.SameHostReply(True)  # natd answers on
    finally:
        c.close()


def test_fw4_layout_upnp_and_pcp_pinholes_pass_fw4s_drop_and_close(make_testbed) -> None:
    """The same front ends in the fw4 layout (docs/pinholes.md "Where pinholes live"): on fw4's real
    default ruleset, a UPnP pinhole and a PCP-over-IPv6 one each let bytes through fw4's wan-to-lan
    reject, sit in fw4's own table, and closing them brings the reject back."""
    bed = make_testbed(start_nat2=False, ipv6=True)
    bed.run("cpe", ["nft", "delete", "table", "ip", tb.ROUTER_FW_TABLE])
    with open(bed.path("fw4.nft"), "w") as f:
        f.write(fw4_ruleset())
    bed.run("cpe", ["nft", "-f", bed.path("fw4.nft")])
    fw4 = Stack(bed, mode="nat1-only", natd_args=["--layout", "fw4"])
    try:
        fw4.start()

        def held() -> set[tuple]:
            out = bed.run("cpe", ["nft", "-j", "list", "set", "inet", "fw4", "igdpcp_pin6"]).stdout
            return {tuple(e["elem"]["val"]["concat"]) for item in json.loads(out)["nftables"]
                    for e in item.get("set", {}).get("elem", [])}

        assert not bed.tcp_in6(8450) and not bed.tcp_in6(8451)  # fw4: inbound IPv6 from wan is rejected
        uid = add_pinhole(fw4, LAN6, 8450)
        nonce = pc.new_nonce()
        raw = bed.run("lan", [sys.executable, pc.__file__, "ask", tb.ROUTER_LAN_IP6,
                              pc.map_request(LAN6, nonce, 6, 8451, 600).hex(), "--source", LAN6]).stdout.strip()
        assert raw and pc.parse_pcp(bytes.fromhex(raw)).result == 0, fw4.log("controld")[-2000:]
        assert held() == {(LAN6, "tcp", 8450), (LAN6, "tcp", 8451)}
        assert bed.tcp_in6(8450) and bed.tcp_in6(8451)
        upnpc(fw4, "-D", uid)
        assert held() == {(LAN6, "tcp", 8451)}
        bed.run("lan", [sys.executable, pc.__file__, "ask", tb.ROUTER_LAN_IP6,
                        pc.map_request(LAN6, nonce, 6, 8451, 0).hex(), "--source", LAN6])
        assert held() == set()
        assert not bed.tcp_in6(8450) and not bed.tcp_in6(8451)
    finally:
        fw4.close()
