"""IPv6 pinholes through natd's API on the namespace bed (docs/pinholes.md).

The bed's IPv6 is routed end to end (tests/bed/testbed.py, LAN6_PREFIX): the only thing between
the Internet host and the LAN host's global address is the router's IPv6 firewall, natd's own
(``--ipv6-firewall own``), the admin's table with natd's chain in it, or fw4's default ruleset
with packaging/fw4's includes (tests/data/fw4-default.nft). Assertions are on bytes through and
on the ruleset.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from natd.client import NatdCallError
from natd.nft import PACKETS_LOOKUPS
from shared import wire
from tests.bed import testbed as tb
from tests.bed.fw4 import fw4_ruleset
from tests.bed.natd import HOLD_SCRIPT, PAYLOAD, python, wait_until

pytestmark = pytest.mark.netns

LAN6, INET6 = tb.LAN_HOST_IP6, tb.INET_HOST_IP6
TCP, UDP = 6, 17


def pin(pid: int, port: int, proto: int = TCP, lan: str = LAN6, lease: int = 600,
        remote: str | None = None) -> wire.PinholeAdd:
    return wire.PinholeAdd(wire.Pinhole(pid, proto, lan, port, lease, remote))



def udp_in(bed: tb.Testbed, port: int, timeout: float = 1.5) -> bool:
    listener = bed.udp_listen("lan", port, host="::", timeout=timeout + 2)
    bed.udp_send("inet", LAN6, port, PAYLOAD, bind=("::", 0))
    got = listener.received(timeout=timeout)
    listener.close()
    return got == PAYLOAD


def pinholes(bed: tb.Testbed, family: str, table: str, prefix: str = "") -> set[tuple]:
    """The pinhole set elements as the kernel holds them (remote variant keyed with its host)."""
    out: set[tuple] = set()
    for name in ("pin6", "pin6r"):
        res = bed.run("cpe", ["nft", "-j", "list", "set", family, table, prefix + name], check=False)
        if res.returncode != 0:
            continue
        for item in json.loads(res.stdout)["nftables"]:
            for e in item.get("set", {}).get("elem", []):
                out.add(tuple(e["elem"]["val"]["concat"]))
    return out


def chain_text(bed: tb.Testbed, family: str, table: str, chain: str) -> str:
    return bed.run("cpe", ["nft", "list", "chain", family, table, chain], check=False).stdout


@pytest.fixture
def own(natd_only):
    """natd --ipv6-firewall own on the IPv6 bed."""
    return natd_only(natd_args=["--ipv6-firewall", "own"], before=lambda bed: bed.setup_ipv6())


def test_own_firewall_drops_inbound_until_a_pinhole_opens_and_closes_it(own) -> None:
    st, c = own
    bed = st.bed
    rules = chain_text(bed, "ip6", "igdpcp", "forward")
    assert "policy accept" in rules and 'iifname @pinif drop comment "igdpcp v6 inbound drop"' in rules
    assert "packet-too-big" in rules  # RFC 4890: PMTU discovery keeps working
    # Outbound IPv6 from the LAN is fine, inbound new connections are not.
    assert bed.tcp_in6(8100) is False
    out = bed.tcp_listen("inet", 7100, host="::", timeout=5)
    assert bed.tcp_send("lan", INET6, 7100, b"out") and out.received(3) == b"out"

    reply = c.call(pin(1, 8100))
    assert reply == wire.PinholeReply(1, 600 + 60)
    assert pinholes(bed, "ip6", "igdpcp") == {(LAN6, "tcp", 8100)}
    assert bed.tcp_in6(8100)
    assert bed.tcp_in6(8101) is False  # only that port
    assert c.call(pin(2, 8102, UDP)) == wire.PinholeReply(2, 660)
    assert udp_in(bed, 8102) and not udp_in(bed, 8100)  # proto is part of the key

    assert c.call(wire.PinholeDelete(1)) == wire.Ok()
    assert c.call(wire.PinholeDelete(1)) == wire.Ok()  # idempotent
    assert pinholes(bed, "ip6", "igdpcp") == {(LAN6, "udp", 8102)}
    assert bed.tcp_in6(8100) is False
    counters = c.call(wire.PinholeCounters([2, 1]))
    assert isinstance(counters, wire.PinholeCountersReply) and counters.pids == [2] and counters.packets[0] >= 1
    status = c.call(wire.PinholeStatus())
    assert status == wire.PinholeStatusReply(True, "own", [tb.LAN6_PREFIX], 1, 4096, 256)
    # More pinholes than natd looks up one by one: all counters come from one dump of each set.
    for pid in range(10, 10 + PACKETS_LOOKUPS + 1):
        c.call(pin(pid, 9000 + pid))
    every = c.call(wire.PinholeCounters([]))
    assert isinstance(every, wire.PinholeCountersReply)
    assert dict(zip(every.pids, every.packets, strict=True)) == {
        2: counters.packets[0], **dict.fromkeys(range(10, 10 + PACKETS_LOOKUPS + 1), 0)}


def test_remote_host_pinhole_admits_that_host_only(own) -> None:
    st, c = own
    bed = st.bed
    c.call(pin(1, 8200, remote=tb.ISP_EXT_IP6))  # a host that is not the Internet host
    assert pinholes(bed, "ip6", "igdpcp") == {(tb.ISP_EXT_IP6, LAN6, "tcp", 8200)}
    assert bed.tcp_in6(8200) is False
    c.call(pin(1, 8200, remote=INET6))  # the same pid re-pointed: replaced in one transaction
    assert pinholes(bed, "ip6", "igdpcp") == {(INET6, LAN6, "tcp", 8200)}
    assert c.call(wire.PinholeCounters([1])) == wire.PinholeCountersReply([1], [0])
    assert bed.tcp_in6(8200)
    counted = c.call(wire.PinholeCounters([1]))
    assert isinstance(counted, wire.PinholeCountersReply) and counted.pids == [1] and counted.packets[0] >= 1


def test_pinholes_survive_a_flush_of_the_ruleset_and_a_sync_replaces_them(own) -> None:
    st, c = own
    bed = st.bed
    c.call(pin(1, 8300))
    c.call(pin(2, 8301, UDP))
    bed.run("cpe", ["nft", "flush", "ruleset"])
    took = wait_until(lambda: pinholes(bed, "ip6", "igdpcp") == {(LAN6, "tcp", 8300), (LAN6, "udp", 8301)}
                      and "inbound drop" in chain_text(bed, "ip6", "igdpcp", "forward"), 3.0)
    assert took is not None, st.log("natd")[-2000:]
    assert "pinholes in ip6 igdpcp changed under natd" in st.log("natd")
    assert bed.tcp_in6(8300) and not bed.tcp_in6(8302)
    reply = c.call(wire.PinholeSync([wire.Pinhole(3, TCP, LAN6, 8302, 100), wire.Pinhole(1, TCP, LAN6, 8300, 100),
                                     wire.Pinhole(4, TCP, "2001:db8:99::1", 8303, 100)]))
    assert reply == wire.SyncReply(1, 1, [4])  # +8302 -8301; 8300 kept (re-leased); 4 is off the LAN
    assert pinholes(bed, "ip6", "igdpcp") == {(LAN6, "tcp", 8300), (LAN6, "tcp", 8302)}
    assert "timeout 2m40s" in bed.run("cpe", ["nft", "list", "set", "ip6", "igdpcp", "pin6"]).stdout
    assert bed.tcp_in6(8302)


@pytest.mark.parametrize(("msg", "code"), [
    (pin(1, 80, lan="2001:db8:99::2"), "not-lan"),  # another prefix
    (pin(1, 80, lan=tb.ROUTER_LAN_IP6), "not-lan"),  # the router itself
    (pin(1, 80, lan="fe80::2"), "not-lan"),  # link-local
    (pin(1, 80, lan="2001:db8:1::"), "not-lan"),  # subnet-router anycast
    (pin(1, 80, remote="ff02::1"), "bad-remote"),
])
def test_refusals_are_typed_and_leave_nothing(own, msg: wire.Message, code: str) -> None:
    st, c = own
    with pytest.raises(NatdCallError) as err:
        c.call(msg)
    assert err.value.code == code
    assert pinholes(st.bed, "ip6", "igdpcp") == set()


def test_limits_per_host_and_total_and_duplicates(natd_only) -> None:
    st, c = natd_only(natd_args=["--ipv6-firewall", "own", "--max-pinholes", "3", "--max-pinholes-per-host", "2"],
                      before=lambda bed: bed.setup_ipv6())
    c.call(pin(1, 9001))
    c.call(pin(2, 9002))
    with pytest.raises(NatdCallError) as err:
        c.call(pin(3, 9003))
    assert err.value.code == "quota" and LAN6 in str(err.value)
    c.call(pin(2, 9004))  # a re-lease of pid 2 does not count against itself
    c.call(pin(3, 9005, lan="2001:db8:1::5"))
    with pytest.raises(NatdCallError) as err:
        c.call(pin(4, 9006, lan="2001:db8:1::6"))
    assert err.value.code == "quota" and "total" in str(err.value)
    with pytest.raises(NatdCallError) as err:
        c.call(pin(5, 9001))  # pid 1 already opens it
    assert err.value.code == "duplicate"
    assert pinholes(st.bed, "ip6", "igdpcp") == {(LAN6, "tcp", 9001), (LAN6, "tcp", 9004),
                                                 ("2001:db8:1::5", "tcp", 9005)}


def test_off_refuses_pinholes_and_leaves_ipv6_alone(natd_only) -> None:
    st, c = natd_only(before=lambda bed: bed.setup_ipv6())  # standalone + auto = off
    with pytest.raises(NatdCallError) as err:
        c.call(pin(1, 8400))
    assert err.value.code == "pinholes-off"
    assert c.call(wire.PinholeStatus()) == wire.PinholeStatusReply(False, "off", [tb.LAN6_PREFIX], 0, 4096, 256)
    assert st.bed.run("cpe", ["nft", "list", "table", "ip6", "igdpcp"], check=False).returncode != 0


# --- the admin's table (miniupnpd's upnp_table_name / upnp_forward_chain) ------------------

ADMIN_FW = f"""
table inet filter {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{tb.ROUTER_LAN_IF}" accept
        jump upnp6
    }}
    chain upnp6 {{
    }}
}}
"""


def test_admin_named_table_and_chain(natd_only) -> None:
    def before(bed: tb.Testbed) -> None:
        bed.setup_ipv6()
        bed.nft("cpe", ADMIN_FW)

    st, c = natd_only(natd_args=["--ipv6-firewall", "table:inet:filter:upnp6"], before=before)
    bed = st.bed
    assert bed.tcp_in6(8500) is False  # the admin's policy drop
    c.call(pin(1, 8500))
    assert pinholes(bed, "inet", "filter", "igdpcp_") == {(LAN6, "tcp", 8500)}
    assert "@igdpcp_pin6 ct mark set ct mark | 0x00100000 accept" in chain_text(bed, "inet", "filter", "upnp6")
    assert bed.tcp_in6(8500)
    # The admin reloads their ruleset (chain emptied, sets gone): natd puts its part back.
    bed.nft("cpe", "delete table inet filter\n" + ADMIN_FW)
    assert wait_until(lambda: pinholes(bed, "inet", "filter", "igdpcp_") == {(LAN6, "tcp", 8500)}, 3.0) is not None
    assert bed.tcp_in6(8500)
    c.call(wire.PinholeDelete(1))
    assert bed.tcp_in6(8500) is False


# --- fw4 -------------------------------------------------------------------------------------


def _fw4_before(bed: tb.Testbed) -> None:
    bed.run("cpe", ["nft", "delete", "table", "ip", tb.ROUTER_FW_TABLE])
    bed.setup_ipv6()
    with open(bed.path("fw4.nft"), "w") as f:
        f.write(fw4_ruleset())
    bed.run("cpe", ["nft", "-f", bed.path("fw4.nft")])


def test_fw4_pinholes_open_fw4s_drop_and_survive_reload_and_restart(natd_only) -> None:
    st, c = natd_only(natd_args=["--layout", "fw4"], before=_fw4_before)
    bed = st.bed
    fwd = chain_text(bed, "inet", "fw4", "forward")
    body = [x.strip() for x in fwd.splitlines() if x.strip().startswith(("jump", "iifname", "ct "))]
    assert body[-1] == "jump handle_reject" and any(x.startswith("jump igdpcp_pinholes") for x in body[-3:])
    assert "policy drop" in fwd
    assert bed.tcp_in6(8600) is False  # fw4's default: inbound IPv6 from wan is rejected
    assert c.call(wire.PinholeStatus()).mode == "fw4"
    c.call(pin(1, 8600))
    c.call(pin(2, 8601, UDP))
    want = {(LAN6, "tcp", 8600), (LAN6, "udp", 8601)}
    assert pinholes(bed, "inet", "fw4", "igdpcp_") == want
    assert bed.tcp_in6(8600) and udp_in(bed, 8601)
    for what, argv in (("fw4 reload", None), ("fw4 restart", ["nft", "delete", "table", "inet", "fw4"])):
        if argv:
            bed.run("cpe", argv)
        bed.run("cpe", ["nft", "-f", bed.path("fw4.nft")])
        took = wait_until(lambda: pinholes(bed, "inet", "fw4", "igdpcp_") == want, 3.0)
        assert took is not None, (what, st.log("natd")[-2000:])
        assert bed.tcp_in6(8600), (what, st.log("natd")[-2000:])
        # the include's rules and natd's are the same text: no duplicates
        assert chain_text(bed, "inet", "fw4", "igdpcp_pinholes").count("comment") == 2, what
    c.call(wire.PinholeDelete(1))
    assert bed.tcp_in6(8600) is False
    assert st.stop("natd") == 0  # a stop closes every pinhole
    assert pinholes(bed, "inet", "fw4", "igdpcp_") == set()
    assert re.search(r"stop: closed 1 pinholes", st.log("natd"))


def test_pinhole_without_renewal_closes_after_lease_and_grace(natd_only) -> None:
    st, c = natd_only(natd_args=["--ipv6-firewall", "own", "--pinhole-grace", "0"],
                      before=lambda bed: bed.setup_ipv6())
    c.call(pin(1, 8700, lease=3))
    assert st.bed.tcp_in6(8700)
    assert wait_until(lambda: pinholes(st.bed, "ip6", "igdpcp") == set(), 5.0) is not None
    assert st.bed.tcp_in6(8700) is False
    assert wait_until(lambda: "pinhole expired pid=1" in st.log("natd"), 3.0) is not None


def test_fw4_without_the_include_files_natd_inserts_its_jump(natd_only, tmp_path) -> None:
    """An install whose pinhole include files are missing still gets working pinholes (and a warning)."""
    from natd.nft import fw4_includes

    for path, text in fw4_includes().items():
        if "pinholes" not in path:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(text)

    def before(bed: tb.Testbed) -> None:
        bed.run("cpe", ["nft", "delete", "table", "ip", tb.ROUTER_FW_TABLE])
        bed.setup_ipv6()
        bed.nft("cpe", fw4_ruleset(str(tmp_path)))

    st, c = natd_only(natd_args=["--layout", "fw4"], before=before)
    assert "lacks 'jump igdpcp_pinholes'" in st.log("natd")
    assert st.bed.tcp_in6(8800) is False
    c.call(pin(1, 8800))
    assert st.bed.tcp_in6(8800)


def test_pinholes_close_when_their_lan_prefix_goes_away(own) -> None:
    st, c = own
    bed = st.bed
    c.call(pin(1, 8900))
    assert bed.tcp_in6(8900)
    bed.run("cpe", ["ip", "-6", "addr", "del", f"{tb.ROUTER_LAN_IP6}/64", "dev", tb.ROUTER_LAN_IF])
    assert wait_until(lambda: pinholes(bed, "ip6", "igdpcp") == set(), 3.0) is not None, st.log("natd")[-1500:]
    assert "closed pinhole pid=1" in st.log("natd")
    with pytest.raises(NatdCallError) as err:
        c.call(pin(2, 8901))
    assert err.value.code == "not-lan"


def test_a_crashed_natds_pinholes_are_adopted_until_controld_claims_them(own) -> None:
    st, c = own
    bed = st.bed
    c.call(pin(1, 9100, lease=900))
    st.kill("natd")
    st.start_natd()
    assert "adopted 1 pinholes" in st.log("natd")
    assert pinholes(bed, "ip6", "igdpcp") == {(LAN6, "tcp", 9100)}
    assert bed.tcp_in6(9100)  # no gap while controld has not re-sent it yet
    # controld (new pid after its own restart, say) claims it: no "duplicate"
    assert c.call(pin(7, 9100, lease=900)) == wire.PinholeReply(7, 960)
    assert c.call(wire.PinholeStatus()).pinholes == 1
    assert c.call(wire.PinholeSync([])) == wire.SyncReply(0, 1, [])
    assert pinholes(bed, "ip6", "igdpcp") == set()


def test_closing_a_pinhole_ends_its_established_flows(own) -> None:
    """As a deleted forward's flows are forgotten: without it, an established TCP flow (or a UDP
    stream) would go on through a closed pinhole, conntrack's 'established' accepting it."""
    st, c = own
    bed = st.bed
    c.call(pin(1, 9200))
    c.call(pin(2, 9201))
    listener = bed.tcp_listen("lan", 9200, host="::", timeout=20)
    other = bed.tcp_listen("lan", 9201, host="::", timeout=20)
    holds = [bed.popen("inet", [python(), "-c", HOLD_SCRIPT, LAN6, str(port)], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True) for port in (9200, 9201)]
    try:
        for h in holds:
            assert h.stdout is not None and h.stdout.readline().strip() == "connected"
        assert c.call(wire.PinholeDelete(1)) == wire.Ok()
        assert wait_until(lambda: "conntrack: removed 1 flows of 1 closed pinholes" in st.log("natd"), 3.0) \
            is not None, st.log("natd")[-1500:]
        for h in holds:
            assert h.stdin is not None
            h.stdin.write("go\n")
            h.stdin.flush()
        assert listener.received(3) == b"before|"  # the rest never arrived
        assert other.received(5) == b"before|after"  # the other pinhole's flow is untouched
    finally:
        for h in holds:
            h.kill()
