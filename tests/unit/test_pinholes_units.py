"""Pinholes without a kernel: natd's policy table, the wire schema, the nft text (docs/pinholes.md)."""

from __future__ import annotations

import ipaddress

import msgpack
import pytest

from natd.bindings import PolicyError
from natd.nft import Layout, PinholePlace, fw4_includes, pin_elem
from natd.pinholes import PinholeLimits, PinholeTable
from shared import wire

LAN6 = "2001:db8:1::2"


def table(**limits: int) -> PinholeTable:
    return PinholeTable([ipaddress.IPv6Network("2001:db8:1::/64")], {ipaddress.IPv6Address("2001:db8:1::1")},
                        PinholeLimits(**limits))


def ph(pid: int, port: int = 80, lan: str = LAN6, lease: int = 100, remote: str | None = None) -> wire.Pinhole:
    return wire.Pinhole(pid, 6, lan, port, lease, remote)


def test_documentation_and_ula_prefixes_are_lan_when_they_are_the_lans() -> None:
    t = table()
    t.lan_prefixes.append(ipaddress.IPv6Network("fd00:1::/64"))
    assert t.check_lan("2001:0db8:0001::0002") == LAN6  # canonical text: the nft element key
    assert t.check_lan("fd00:1::5") == "fd00:1::5"


@pytest.mark.parametrize("ip", ["2001:db8:2::2", "2001:db8:1::1", "fe80::2", "2001:db8:1::", "ff02::1", "::1",
                                "::ffff:192.168.1.2"])
def test_non_lan_addresses_are_refused(ip: str) -> None:
    with pytest.raises(PolicyError) as err:
        table().check_lan(ip)
    assert err.value.code == "not-lan"


def test_lease_plus_grace_and_expiry_in_heap_order() -> None:
    t = table(grace=10)
    assert t.add(ph(1, lease=100), now=0.0) == ((LAN6, 6, 80, None), 110)
    t.add(ph(2, 81, lease=5), now=0.0)
    t.add(ph(2, 81, lease=50), now=1.0)  # re-lease: the old heap entry is stale
    assert t.wanted(20.0) == {(LAN6, 6, 80, None): 90, (LAN6, 6, 81, None): 41}
    assert t.expire(15.9) == []
    assert t.expire(61.0) == [(2, (LAN6, 6, 81, None))]
    assert list(t.by_pid) == [1] and t.per_host == {LAN6: 1}


def test_limits_and_duplicates() -> None:
    t = table(max_total=2, max_per_host=1)
    t.add(ph(1), 0)
    t.add(ph(1, 90), 0)  # re-point of the same pid: not over the per-host limit
    with pytest.raises(PolicyError, match="limit for"):
        t.add(ph(2, 91), 0)
    t.add(ph(3, 90, lan="2001:db8:1::3"), 0)
    with pytest.raises(PolicyError, match="total"):
        t.add(ph(4, 92, lan="2001:db8:1::4"), 0)
    with pytest.raises(PolicyError) as err:
        t.add(ph(5, 90), 0)  # pid 1 holds that key
    assert err.value.code == "duplicate"


def test_sync_leaves_out_what_policy_refuses_and_refuses_a_malformed_set() -> None:
    t = table(max_per_host=1)
    trial, skipped = t.replace_all([ph(1), ph(2, 81), ph(3, lan="2001:db8:9::1")], now=0)
    assert sorted(trial.by_pid) == [1] and [p.pid for p, _ in skipped] == [2, 3]
    with pytest.raises(PolicyError):
        t.replace_all([ph(1), ph(1, 81)], now=0)


def test_wire_checks_pinholes() -> None:
    msg = wire.PinholeAdd(ph(7, remote="2001:db8:20::10"))
    assert wire.decode(wire.encode(msg, 3)) == (msg, 3)
    for bad in (ph(1, lan="192.168.1.2"), ph(1, lease=0), ph(1, lease=wire.MAX_PINHOLE_LEASE + 1),
                ph(0), ph(1, remote="not an address")):
        with pytest.raises(wire.WireError):
            wire.decode(wire.encode(wire.PinholeAdd(bad)))
    raw = msgpack.packb({"v": 2, "op": "pinhole.sync", "pinholes": [{"pid": 1, "proto": 6, "lan_ip": LAN6,
                                                                       "lan_port": 1, "lease": 1, "x": 1}]})
    with pytest.raises(wire.WireError, match="unknown fields"):
        wire.decode(raw)
    reply = wire.PinholeCountersReply([1, 2], [10, 0])
    assert wire.decode(wire.encode(reply))[0] == reply


def test_places_and_element_text() -> None:
    std, fw4 = Layout.make("standalone"), Layout.make("fw4")
    assert PinholePlace.make("auto", std) is None and PinholePlace.make("off", fw4) is None
    own = PinholePlace.make("own", std)
    assert own is not None and (own.where, own.chain, own.jump()) == ("ip6 igdpcp", "forward", None)
    assert [t for t, _ in own.rules()][-1] == "igdpcp v6 inbound drop"
    adm = PinholePlace.make("table:inet:filter:upnp6", std)
    assert adm is not None and adm.where == "inet filter" and "meta nfproto ipv6" in adm.rules()[0][1]
    for bad in ("table:ip:filter:x", "table:inet:filter", "sometimes"):
        with pytest.raises(ValueError):
            PinholePlace.make(bad, std)
    with pytest.raises(ValueError):
        PinholePlace.make("own", fw4)
    assert pin_elem((LAN6, 17, 53, None)) == ("pin6", f"{LAN6} . udp . 53")
    assert pin_elem((LAN6, 6, 80, "2001:db8:20::10")) == ("pin6r", f"2001:db8:20::10 . {LAN6} . tcp . 80")
    inc = fw4_includes()
    assert "jump igdpcp_pinholes" in inc["chain-post/forward/30-igdpcp-pinholes.nft"]
    assert "chain igdpcp_pinholes {" in inc["table-post/30-igdpcp-pinholes.nft"]


def test_closed_pinholes_doom_exactly_their_flows() -> None:
    """What the conntrack worker deletes for closed pinholes (natd/conntrack.py doomed_pinholes)."""
    from natd.conntrack import doomed_pinholes
    from natd.ctnetlink import CtEntry, CtTuple

    def flow(src: str, dport: int, proto: int = 6, dst: str = LAN6) -> CtEntry:
        return CtEntry(10, CtTuple(proto, src, dst, 40000, dport), CtTuple(proto, dst, src, dport, 40000))

    any_host, one_host = flow("2001:db8:20::10", 8080), flow("2001:db8:20::10", 8081)
    other_remote, udp = flow("2001:db8:20::99", 8081), flow("2001:db8:20::10", 8080, 17)
    other_lan = flow("2001:db8:20::10", 8080, dst="2001:db8:1::3")
    keys = [(LAN6, 6, 8080, None), (LAN6, 6, 8081, "2001:db8:20::10")]
    assert doomed_pinholes([any_host, one_host, other_remote, udp, other_lan], keys) == [any_host, one_host]
    assert doomed_pinholes([any_host], []) == []


def test_closed_pinholes_flows_go_to_the_conntrack_worker_never_a_dump_on_natds_loop(monkeypatch) -> None:
    import asyncio

    from natd import ctnetlink, main

    async def run() -> list[list]:
        args = main.build_parser().parse_args(["--wan-if", "w", "--lan-if", "l", "--rpc", "ipc:///x",
                                               "--events", "ipc:///y"])
        d = main.Natd(args)
        sent: list[list] = []

        async def worker(keys: list) -> int:
            sent.append(keys)
            return 1

        def walk(*_a: object, **_k: object) -> list:
            raise AssertionError("natd's loop walked the conntrack table")

        monkeypatch.setattr(d.ct, "forget_pinholes", worker)
        monkeypatch.setattr(ctnetlink, "ct_dump", walk)
        await d._forget_pinhole_flows([(LAN6, 6, 8080, None), (LAN6, 17, 53, "2001:db8:20::10")])
        d.ctx.term()
        return sent

    assert asyncio.run(run()) == [[(LAN6, 6, 8080, None), (LAN6, 17, 53, "2001:db8:20::10")]]


def test_a_fresh_pinhole_is_wanted_at_its_whole_timeout_whatever_the_clock_reads() -> None:
    """(now + t) - now is not always t in floating point (for a quarter of these clock readings
    it is a hair above): the kernel must get lease + grace, not a second more (a sync wrote 161 s)."""
    for i in range(300):
        now = 1000 + i / 1000
        t = table()
        key, timeout = t.add(ph(1), now)
        assert t.wanted(now) == {key: timeout}, now
        assert t.wanted(now + 0.5) == {key: timeout}  # half a second on: still the whole second up
        assert t.wanted(now + 1.0) == {key: timeout - 1}
