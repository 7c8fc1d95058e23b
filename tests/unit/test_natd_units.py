"""natd without a kernel: the wire schema's guards, the nft monitor parser, the fw4 files.

Issue #5: "a version mismatch is a clear error, not a crash"; "natd validates every
field before anything reaches the kernel"; fw4 include files.
"""

from __future__ import annotations

import os
import random
import struct

import msgpack
import pytest

from natd import netlink, nftmon
from natd.bindings import BindingTable, PolicyError
from natd.nft import Layout, _addr_port, _fwd_item, _fwd_key, _snat_item, _snat_key, expected, fw4_includes
from shared import netlink as nl
from shared import wire
from tests.bed import fuzz

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _raw(**body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def test_version_mismatch_is_a_clear_error_both_ways() -> None:
    with pytest.raises(wire.WireError) as exc:
        wire.decode(_raw(v=99, op="hello", id=7))
    assert exc.value.code == "version" and exc.value.rid == 7 and "99" in str(exc.value)
    # natd's error reply stays readable by a peer of another version.
    err = _raw(v=99, op="error", id=7, code="version", message="x")
    assert wire.decode(err) == (wire.Error("version", "x"), 7)
    # A v1 peer (no deadline field) is still served.
    assert wire.decode(_raw(v=1, op="unbind", id=3, mid=5)) == (wire.Unbind(5), 3)


def test_envelope_carries_id_and_deadline() -> None:
    env = wire.decode_envelope(wire.encode(wire.Unbind(9), 4, 1_700_000_000_000))
    assert env == wire.Envelope(wire.Unbind(9), 4, 1_700_000_000_000)
    for bad in ({"dl": -1}, {"dl": "soon"}, {"id": True}, {"id": -3}):
        with pytest.raises(wire.WireError):
            wire.decode(_raw(v=2, op="unbind", mid=1, **bad))


@pytest.mark.parametrize("fields, code", [
    ({"op": "bind", "mid": 0, "proto": 6, "lan_ip": "192.168.1.2", "lan_port": 1, "want_port": 1}, "bad-field"),
    ({"op": "bind", "mid": 1, "proto": 1, "lan_ip": "192.168.1.2", "lan_port": 1, "want_port": 1}, "bad-field"),
    ({"op": "bind", "mid": 1, "proto": 6, "lan_ip": "fe80::1", "lan_port": 1, "want_port": 1}, "bad-field"),
    ({"op": "bind", "mid": 1, "proto": 6, "lan_ip": "192.168.1.2", "lan_port": 0, "want_port": 1}, "bad-field"),
    ({"op": "bind", "mid": 1, "proto": 6, "lan_ip": "192.168.1.2", "lan_port": 1, "want_port": 65536}, "bad-field"),
    ({"op": "bind", "mid": 1, "proto": "6", "lan_ip": "192.168.1.2", "lan_port": 1, "want_port": 1}, "bad-field"),
    ({"op": "bind", "mid": 1, "proto": 6, "lan_ip": "192.168.1.2", "lan_port": 1}, "bad-field"),
    ({"op": "bind", "mid": 1, "proto": 6, "lan_ip": "192.168.1.2", "lan_port": 1, "want_port": 1, "x": 1},
     "bad-field"),
    ({"op": "unbind", "mid": -1}, "bad-field"),
    ({"op": "sync", "bindings": [{"mid": 1, "proto": 6, "lan_ip": "1.2.3.4", "lan_port": 1, "wan_port": 0}]},
     "bad-field"),
    ({"op": "sync", "bindings": "all"}, "bad-field"),
    ({"op": "launch"}, "bad-op"),
    ({"op": None}, "bad-op"),
])
def test_every_field_is_checked(fields: dict, code: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        wire.decode(_raw(v=2, id=1, **fields))
    assert exc.value.code == code


def test_random_and_mutated_bytes_only_ever_raise_wire_error() -> None:
    rng = random.Random(5)
    good = [wire.encode(m, 1) for m in (wire.Hello(), wire.Bind(1, 6, "192.168.1.2", 80, 8080),
                                        wire.Sync([wire.Binding(1, 17, "192.168.1.9", 53, 5353)]))]
    for data in fuzz.cases(rng, good, 3000, max_random=200, truncate=True):  # decode or WireError, nothing else
        try:
            msg, _ = wire.decode(data)
        except wire.WireError:
            continue
        msg.check()  # whatever got through is a valid message


def test_policy_refuses_non_lan_and_reserved() -> None:
    """docs/architecture.md, Trust: LAN subnets only, never the router, WAN, loopback; PCP ports reserved."""
    import ipaddress

    t = BindingTable([ipaddress.IPv4Network("192.168.1.0/24")], {"192.168.1.1", "100.64.0.2"})
    for ip, code in [("192.168.1.1", "not-lan"), ("100.64.0.2", "not-lan"), ("127.0.0.1", "not-lan"),
                     ("10.0.0.5", "not-lan"), ("192.168.1.255", "not-lan"), ("192.168.1.0", "not-lan")]:
        with pytest.raises(PolicyError) as exc:
            t.add(wire.Binding(1, 6, ip, 80, 8080))
        assert exc.value.code == code, ip
    with pytest.raises(PolicyError) as exc:
        t.add(wire.Binding(1, 17, "192.168.1.2", 80, 5351))
    assert exc.value.code == "reserved-port"


def test_snat_owner_is_lowest_mid_and_state_is_one_function() -> None:
    a = wire.Binding(2, 6, "192.168.1.2", 80, 20002)
    b = wire.Binding(1, 6, "192.168.1.2", 80, 20001)
    st = expected([a, b], "100.64.0.2", ["192.168.1.0/24"])
    assert st.fwd == {(6, 20002): ("192.168.1.2", 80), (6, 20001): ("192.168.1.2", 80)}
    assert st.snat == {("192.168.1.2", 6, 80): ("100.64.0.2", 20001)}
    assert st.wan == {"100.64.0.2"} and st.lan == {"192.168.1.0/24"}


def test_snat_owner_follows_binds_and_unbinds_of_a_shared_endpoint() -> None:
    """Several forwards to one LAN endpoint (IWF-48): the lowest live mid owns its SNAT element,
    through re-binds and removals, as natd.nft.expected decides for the whole set."""
    t = _lan_table()
    ep = ("192.168.1.2", 6, 80)
    for mid, port in ((3, 20003), (1, 20001), (2, 20002)):
        t.add(wire.Binding(mid, 6, "192.168.1.2", 80, port))
    owner = t.snat_owner(ep)
    assert owner is not None and owner.mid == 1
    t.add(wire.Binding(1, 6, "192.168.1.9", 80, 20001))  # re-bind of mid 1 to another host
    owner = t.snat_owner(ep)
    assert owner is not None and owner.mid == 2
    assert t.snat_owner(("192.168.1.9", 6, 80)) == t.by_mid[1]
    t.remove(2)
    owner = t.snat_owner(ep)
    assert owner is not None and owner.mid == 3
    t.remove(3)
    assert t.snat_owner(ep) is None and ep[:2] not in t.by_endpoint
    st = expected(t.by_mid.values(), "100.64.0.2", ["192.168.1.0/24"])
    assert st.snat == {("192.168.1.9", 6, 80): ("100.64.0.2", 20001)}


def test_every_rule_has_an_explicit_ipv4_selector() -> None:
    """Unlike miniupnpd's nftables backend, no IPv6 packet may match an IPv4 forward."""
    for name in ("standalone", "fw4"):
        lay = Layout.make(name)
        for rules in lay.chains().values():
            for _tag, text in rules:
                assert text.startswith("meta nfproto ipv4" if lay.family == "inet" else "ip version 4"), text


def test_packaged_fw4_includes_are_what_natd_expects() -> None:
    for path, text in fw4_includes().items():
        with open(os.path.join(ROOT, "packaging", "fw4", path)) as f:
            assert f.read() == text, path
        assert f"/usr/share/nftables.d/{path}" in text.splitlines()[0]


def _nlmsg(msg: int, family: int, attrs: dict[int, bytes]) -> bytes:
    body = struct.pack("=BBH", family, 0, 0)
    for t, v in attrs.items():
        body += struct.pack("=HH", 4 + len(v), t) + v + b"\0" * (-len(v) % 4)
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | msg, 0, 0, 0) + body


def test_monitor_parser_flags_foreign_changes_to_our_table_only() -> None:
    p = nftmon.MonitorParser(family=2, table=b"igdpcp", own_pid=100)
    gen = lambda pid: _nlmsg(15, 0, {1: struct.pack(">I", 5), 2: struct.pack(">I", pid)})  # noqa: E731
    deltable = _nlmsg(2, 2, {1: b"igdpcp\0"})
    other = _nlmsg(2, 2, {1: b"testbed_fw\0"})
    assert p.feed(deltable + gen(100)) is False  # our own commit
    assert p.feed(other + gen(200)) is False  # someone else's table
    assert p.feed(deltable + gen(200)) is True  # nft flush ruleset, fw4 reload
    assert p.feed(b"\x01\x00") is False and p.feed(b"\xff" * 20) is True  # garbage: verify to be safe


def test_monitor_parser_tells_the_generation_of_natds_own_commits_only() -> None:
    """natd learns the generation its write made from the commit's NEWGEN (no netlink round trip)."""
    p = nftmon.MonitorParser(family=2, table=b"igdpcp", own_pid=100)
    gen = lambda n, pid: _nlmsg(15, 0, {1: struct.pack(">I", n), 2: struct.pack(">I", pid)})  # noqa: E731
    elem = _nlmsg(12, 2, {1: b"igdpcp\0"})
    p.feed(elem + gen(7, 100))
    assert p.own_generation == 7
    p.own_generation = None
    assert p.feed(elem + gen(8, 200)) is True and p.own_generation is None  # someone else's: alarm, no generation


def test_bind_unbind_deltas_keep_the_kernel_picture_equal_to_the_full_computation(monkeypatch) -> None:
    """Bind/Unbind write O(1) keys; after any sequence the result equals what a full sync
    of the same table would produce (natd.nft.expected, the one place it is decided)."""
    import asyncio

    from natd import conntrack, main, wan
    from natd.nft import KernelState

    scripts: list[str] = []

    async def run() -> None:
        args = main.build_parser().parse_args(["--wan-if", "w", "--lan-if", "l", "--rpc", "ipc:///x",
                                               "--events", "ipc:///y"])
        d = main.Natd(args)
        def record(script: str) -> str:
            scripts.append(script)
            return ""

        monkeypatch.setattr(d.nft, "run", record)

        async def no_forget(flows):
            return 0

        monkeypatch.setattr(conntrack, "forget", no_forget)
        d._apply_ifs(wan.IfState("100.64.0.2", "100.64.0.1", ("192.168.1.1",), ("192.168.1.0/24",)))
        d.nft.state = KernelState(wan={"100.64.0.2"}, lan={"192.168.1.0/24"})
        rng = random.Random(3)
        for _ in range(400):
            mid = rng.randrange(1, 40)
            if rng.random() < 0.3:
                d._handle(wire.Unbind(mid))
            else:
                try:
                    d._handle(wire.Bind(mid, rng.choice((6, 17)), f"192.168.1.{rng.randrange(2, 5)}",
                                        rng.randrange(80, 84), rng.randrange(20000, 20010), rng.random() < 0.5))
                except PolicyError:
                    pass
            want = expected(d.table.by_mid.values(), "100.64.0.2", ["192.168.1.0/24"])
            assert d.nft.state == want
            assert all(len(s.splitlines()) <= 6 for s in scripts[-1:])  # O(1) lines per request
        d.ctx.term()

    asyncio.run(run())


def test_gen_keys_command_writes_curve_keys_with_private_secrets(tmp_path, capsys) -> None:
    """Keys are generated at install: `igdpcp-natd --gen-keys DIR` (README, natd section)."""
    import stat

    from natd import main

    main.main(["--gen-keys", str(tmp_path / "curve")])
    files = capsys.readouterr().out.split()
    names = sorted(os.path.relpath(f, tmp_path / "curve") for f in files)
    assert names == ["authorized/controld.key", "controld.key", "controld.key_secret", "natd.key",
                     "natd.key_secret"]
    for f in files:
        mode = stat.S_IMODE(os.stat(f).st_mode)
        assert mode == (0o600 if f.endswith("_secret") else 0o644), (f, oct(mode))


# --- review regressions ------------------------------------------------------------


def test_overlapping_lan_subnets_become_one_interval() -> None:
    """An alias inside the LAN (/32 in the /24) must not make the lan4 interval set conflict."""
    st = expected([], "100.64.0.2", ["192.168.1.0/24", "192.168.1.250/32", "10.0.0.0/8"])
    assert st.lan == {"192.168.1.0/24", "10.0.0.0/8"}


def _lan_table(**kw) -> BindingTable:
    import ipaddress

    return BindingTable([ipaddress.IPv4Network("192.168.1.0/24")], {"192.168.1.1"}, **kw)


def test_sync_leaves_out_hosts_no_longer_on_the_lan_instead_of_failing() -> None:
    t = _lan_table()
    skipped = t.replace_all([wire.Binding(1, 6, "192.168.1.2", 80, 8080), wire.Binding(2, 6, "10.9.0.5", 80, 8081)])
    assert [b.mid for b, _ in skipped] == [2] and set(t.by_mid) == {1}
    with pytest.raises(PolicyError):  # a malformed set is still refused whole
        t.replace_all([wire.Binding(1, 6, "192.168.1.2", 80, 8080), wire.Binding(1, 6, "192.168.1.3", 80, 8081)])


def test_rebinding_a_mapping_is_not_refused_by_itself() -> None:
    from natd.bindings import Limits

    t = _lan_table(limits=Limits(max_total=10, max_per_host=1))
    t.add(wire.Binding(1, 6, "192.168.1.2", 80, 8080))
    assert t.allocate(6, 8080, exact=True, mid=1) == 8080  # its own port is free to it
    t.add(wire.Binding(1, 6, "192.168.1.2", 81, 8080))  # same host, quota 1: replaces, not adds
    assert t.by_mid[1].lan_port == 81 and t.per_host == {"192.168.1.2": 1}
    with pytest.raises(PolicyError):
        t.allocate(6, 8080, exact=True, mid=2)


def test_relay_trusts_a_bounded_set_of_servers() -> None:
    from natd.relay import MAX_SERVERS, PcpRelay

    class Sink:
        def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
            pass

    got: list[str] = []
    relay = PcpRelay(lambda server, data: got.append(server))
    relay._unicast = Sink()  # type: ignore[assignment]
    for i in range(1000):
        relay.send(f"10.0.{i // 256}.{i % 256}", b"x")
    assert len(relay.servers) == MAX_SERVERS
    relay._received(b"r", ("10.0.3.231", 5351))  # the most recent one is still trusted
    relay._received(b"r", ("10.0.0.0", 5351))  # the oldest was forgotten
    assert got == ["10.0.3.231"]


def test_sync_leaves_out_bindings_over_a_lowered_limit() -> None:
    from natd.bindings import Limits

    t = _lan_table(limits=Limits(max_total=10, max_per_host=1))
    skipped = t.replace_all([wire.Binding(1, 6, "192.168.1.2", 80, 8080), wire.Binding(2, 6, "192.168.1.2", 81, 8081),
                             wire.Binding(3, 6, "192.168.1.3", 80, 8082)])
    assert [b.mid for b, _ in skipped] == [2] and set(t.by_mid) == {1, 3}


def test_setelem_batch_is_one_transaction_of_chunked_element_messages() -> None:
    """The bulk restore's batch (natd.nft BULK_MIN): begin, per map its deletes then its adds in
    messages of at most ELEMS_PER_MESSAGE elements, end; every key and value a whole register."""
    key = bytes([6, 0, 0, 0]) + struct.pack("!H2x", 20000)  # tcp . 20000
    val = bytes([192, 168, 1, 2]) + struct.pack("!H2x", 8080)  # 192.168.1.2 . 8080
    adds = [(key, val)] * (netlink.ELEMS_PER_MESSAGE + 1)
    batch, acks = netlink.setelem_batch(2, "igdpcp", [("igdpcp_fwd4", [(key, None), *adds])])
    msgs = list(nl.messages(batch))
    assert [m.type for m in msgs] == [netlink.NFNL_MSG_BATCH_BEGIN, (10 << 8) | netlink.NFT_MSG_DELSETELEM,
                                      *[(10 << 8) | netlink.NFT_MSG_NEWSETELEM] * 2, netlink.NFNL_MSG_BATCH_END]
    assert acks == 3 and all(m.flags & nl.NLM_F_ACK for m in msgs[1:-1])
    assert msgs[0].payload[2:] == msgs[-1].payload[2:] == struct.pack("!H", 10)  # res_id: NFNL_SUBSYS_NFTABLES
    counts = []
    for m in msgs[1:-1]:
        assert m.payload[0] == 2  # AF_INET
        top = nl.attrs(m.payload, 4)
        assert top[1] == b"igdpcp\0" and top[2] == b"igdpcp_fwd4\0"
        elems = []
        off = 0
        while off < len(top[3]):  # the list of NFTA_LIST_ELEM
            length = struct.unpack_from("=H", top[3], off)[0]
            elems.append(nl.attrs(top[3][off + 4:off + length]))
            off += length
        counts.append(len(elems))
        for e in elems:
            assert nl.attrs(e[1]) == {1: key}  # NFTA_SET_ELEM_KEY > NFTA_DATA_VALUE
            assert (nl.attrs(e[2]) == {1: val}) if m.type & 0xFF == netlink.NFT_MSG_NEWSETELEM else 2 not in e
    assert counts == [1, netlink.ELEMS_PER_MESSAGE, 1]


def test_element_dump_decodes_what_the_batch_writes() -> None:
    """natd's snapshot reads its maps back as raw netlink values: a dumped NEWSETELEM message holding
    the batch's elements gives the same forwards back (key and value layouts are each other's inverse)."""
    fwd = {(6, 20000): ("192.168.1.2", 8080), (17, 65535): ("192.168.1.254", 1)}
    snat = {("192.168.1.2", 6, 8080): ("100.64.0.2", 20000)}

    def dumped(ops: list[netlink.ElemOp]) -> list[netlink.ElemVal]:
        msg = list(nl.messages(netlink.setelem_batch(2, "igdpcp", [("m", ops)])[0]))[1]
        return netlink.decode_setelems(msg)

    got_fwd = dumped([(_fwd_key(k), _addr_port(v)) for k, v in fwd.items()])
    assert dict(_fwd_item(k, v) for k, v in got_fwd if v is not None) == fwd
    got_snat = dumped([(_snat_key(k), _addr_port(v)) for k, v in snat.items()])
    assert dict(_snat_item(k, v) for k, v in got_snat if v is not None) == snat
    other = nl.Msg(netlink.NFNL_MSG_BATCH_BEGIN, 0, 1, b"\0" * 4)
    assert netlink.decode_setelems(other) == []


def test_pinhole_element_carries_its_key_and_a_big_endian_timeout_under_a_native_header() -> None:
    """A pinhole written through netlink: [remote .] address . protocol . port, each field a whole
    register, and NFTA_SET_ELEM_TIMEOUT as a host-order attribute header with a network-order u64
    of milliseconds (a network-order header is another attribute to the kernel: no timeout)."""
    from natd.nft import pin_key_bytes

    key = pin_key_bytes(("2001:db8:1::2", 6, 8080, None))
    assert key == bytes.fromhex("20010db8000100000000000000000002" "06000000" "1f900000")
    assert pin_key_bytes(("2001:db8:1::2", 17, 53, "2001:db8:20::10"))[:16] == bytes.fromhex(
        "20010db8002000000000000000000010")
    elem = nl.attrs(netlink._elem(key, b"", 3_600_000)[4:])
    assert nl.attrs(elem[1]) == {1: key} and 2 not in elem  # no data in a plain set
    assert elem[netlink.NFTA_SET_ELEM_TIMEOUT] == struct.pack("!Q", 3_600_000)


def _counted_message(*elems: bytes) -> nl.Msg:
    """A NEWSETELEM message of a dump or a get, as the kernel writes it, holding ``elems``."""
    payload = bytes([10, 0, 0, 0]) + nl.attr(1, b"t\0") + nl.attr(2, b"pin6\0") + nl.nested(
        netlink.NFTA_SET_ELEM_LIST_ELEMENTS, *(nl.nested(netlink.NFTA_LIST_ELEM, e) for e in elems))
    return nl.Msg((10 << 8) | netlink.NFT_MSG_NEWSETELEM, 0, 1, payload)


def _counter(packets: int) -> bytes:
    return nl.attr(netlink.NFTA_EXPR_NAME, b"counter\0") + nl.nested(
        netlink.NFTA_EXPR_DATA, nl.attr(1, struct.pack("!Q", packets * 100)),
        nl.attr(netlink.NFTA_COUNTER_PACKETS, struct.pack("!Q", packets)))


def test_counted_elements_decode_packets_and_time_left_in_both_expression_layouts() -> None:
    """GetPinholePackets reads a pinhole's counter by netlink: a set with one expression dumps it in
    NFTA_SET_ELEM_EXPR, one with several in NFTA_SET_ELEM_EXPRESSIONS; the time left is a big-endian
    u64 of ms; an element with neither counts 0 packets and no time."""
    from natd.nft import pin_key_bytes, pin_key_of

    k1, k2, k3 = (pin_key_bytes(("2001:db8:1::2", 6, p, None)) for p in (80, 81, 82))

    def key(k: bytes) -> bytes:
        return nl.nested(netlink.NFTA_SET_ELEM_KEY, nl.attr(netlink.NFTA_DATA_VALUE, k))

    left = nl.attr(netlink.NFTA_SET_ELEM_EXPIRATION, struct.pack("!Q", 599_972))
    limit = nl.attr(netlink.NFTA_EXPR_NAME, b"limit\0")
    msg = _counted_message(
        key(k1) + left + nl.nested(netlink.NFTA_SET_ELEM_EXPR, _counter(7)),
        key(k2) + nl.nested(netlink.NFTA_SET_ELEM_EXPRESSIONS, nl.nested(netlink.NFTA_LIST_ELEM, limit),
                            nl.nested(netlink.NFTA_LIST_ELEM, _counter(3))),
        key(k3))
    assert netlink.decode_counted(msg) == [(k1, 7, 599_972), (k2, 3, 0), (k3, 0, 0)]
    assert netlink.decode_counted(nl.Msg(nl.NLMSG_ERROR, 0, 1, b"\0" * 4)) == []
    assert pin_key_of(k1, remote=False) == ("2001:db8:1::2", 6, 80, None)
    remote = ("2001:db8:1::2", 17, 53, "2001:db8:20::10")
    assert pin_key_of(pin_key_bytes(remote), remote=True) == remote
    assert pin_key_of(k1, remote=True) is None and pin_key_of(k1[:-1], remote=False) is None


def test_a_get_of_one_element_names_its_key_and_a_dump_names_none() -> None:
    """The counter lookup is a plain request (the kernel finds the one key) with an acknowledgement;
    the dump of a whole set carries no element list."""
    from natd.nft import pin_key_bytes

    k = pin_key_bytes(("2001:db8:1::2", 6, 80, None))
    (get,) = nl.messages(netlink.getsetelem_request(10, "igdpcp", "pin6", key=k))
    assert get.flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK and get.type == (10 << 8) | netlink.NFT_MSG_GETSETELEM
    top = nl.attrs(get.payload, 4)
    assert top[1] == b"igdpcp\0" and top[2] == b"pin6\0"
    elem = nl.attrs(nl.attrs(top[netlink.NFTA_SET_ELEM_LIST_ELEMENTS])[netlink.NFTA_LIST_ELEM])
    assert nl.attrs(elem[netlink.NFTA_SET_ELEM_KEY]) == {netlink.NFTA_DATA_VALUE: k}
    (dump,) = nl.messages(netlink.getsetelem_request(10, "igdpcp", "pin6"))
    assert dump.flags & nl.NLM_F_DUMP == nl.NLM_F_DUMP
    assert netlink.NFTA_SET_ELEM_LIST_ELEMENTS not in nl.attrs(dump.payload, 4)


def test_nft_socket_takes_only_its_own_batchs_answers() -> None:
    """natd's long-lived nf_tables socket: a late answer to an earlier batch (same socket, older
    sequence number) is skipped, this batch's error refuses it, its acks complete it."""
    import socket as so

    ours, kernel = so.socketpair(so.AF_UNIX, so.SOCK_DGRAM)

    def answer(seq: int, code: int = 0) -> bytes:
        return nl.message(nl.NLMSG_ERROR, 0, seq, struct.pack("=i", -code) + b"\0" * 16)

    ns = netlink.NftSocket()
    ns._sock, ns._seq = ours, 100
    ops = [("s", [(b"k" * 8, b"", 1000)])]
    try:
        first = ns._seq + 2  # begin takes one number, the element message the next
        kernel.send(answer(first - 5, 2) + answer(first))  # an old batch's ENOENT, then our ack
        ns.run(ops, 10, "t", timeout=1.0)
        sent = list(nl.messages(kernel.recv(65536)))
        assert [m.seq for m in sent] == [first - 1, first, first + 1]
        second = ns._seq + 2
        kernel.send(answer(second, 17))  # EEXIST
        with pytest.raises(netlink.NftBatchError):
            ns.run(ops, 10, "t", timeout=1.0)
        assert ns._sock is ours  # a refusal keeps the socket; a timeout closes it
        with pytest.raises(OSError):
            ns.run(ops, 10, "t", timeout=0.05)
        assert ns._sock is None
    finally:
        ours.close()
        kernel.close()


def test_a_write_in_flight_does_not_make_the_periodic_check_verify(monkeypatch) -> None:
    """Under a stream of Binds the monitor has not always read natd's last NEWGEN when the periodic
    check runs: that check takes the generation then (a verify there re-read the whole table every
    second: +12 MiB and CPU at 10k forwards); lost events still verify."""
    from natd import main

    args = main.build_parser().parse_args(["--wan-if", "w", "--lan-if", "l", "--rpc", "ipc:///x",
                                           "--events", "ipc:///y"])
    d = main.Natd(args)
    monkeypatch.setattr(main.nftmon, "generation", lambda timeout=1.0: 42)
    d._gen, d._gen_due = 41, True
    d._check_generation()
    assert not d._dirty.is_set() and (d._gen, d._gen_due) == (42, False)
    d._check_generation()  # nothing written since: the same generation, nothing to verify
    assert not d._dirty.is_set()
    d._own_generation(43)
    d._check_generation()  # the ruleset (42) is not what natd's last commit made (43): verify
    assert d._dirty.is_set()
    d._dirty.clear()
    d._gen, d._gen_due = 42, True
    d._events_lost()
    assert d._dirty.is_set()


def test_pair_map_behaves_as_the_dict_it_replaces(monkeypatch: pytest.MonkeyPatch) -> None:
    """natd.nft.PairMap (the kernel picture's fwd4 and snat4, no key or value tuple kept per
    element) against a plain dict under random writes, removals and reads, for both key widths,
    with values on several addresses: more than it numbers, too."""
    from natd import nft
    from natd.nft import PairMap

    monkeypatch.setattr(nft, "MAX_PACKED_ADDRS", 3)
    rng = random.Random(7)
    for make_key in (lambda: (rng.choice((6, 17)), rng.randrange(5)),
                     lambda: (f"192.168.1.{rng.randrange(3)}", rng.choice((6, 17)), rng.randrange(5))):
        ref: dict = {}
        pm: PairMap = PairMap()
        for _ in range(2000):
            k, op = make_key(), rng.random()
            v = (f"100.64.0.{rng.randrange(5)}", rng.choice((0, 1, 2, 65535)))
            if op < 0.5:
                pm[k] = ref[k] = v
            elif op < 0.7:
                assert pm.pop(k, None) == ref.pop(k, None)
            elif op < 0.8 and k in ref:
                del pm[k], ref[k]
            assert (k in pm, pm.get(k), len(pm)) == (k in ref, ref.get(k), len(ref))
        assert pm == ref and sorted(pm) == sorted(ref) and dict(pm.items()) == ref
        with pytest.raises(KeyError):
            pm.pop(("nope", 6, 1))
        assert ("nope",) not in pm and 5 not in pm


def test_two_kernel_pictures_compare_element_by_element() -> None:
    """The healer compares what it read from the kernel with what it wants (two PairMaps of 10k,
    whose addresses may be numbered in another order): equal as dicts are, and without building a
    dict of either first (that was a ~6 MiB peak at 10k, kept by the allocator for good)."""
    import tracemalloc

    from natd.nft import PairMap

    def picture(order: list[int]) -> PairMap:
        pm: PairMap = PairMap()
        for i in order:
            pm[(6, 20000 + i)] = (f"192.168.1.{10 + i % 3}", 20000 + i)
        return pm

    a, b = picture(list(range(10_000))), picture(list(range(9_999, -1, -1)))
    assert a._addrs != b._addrs  # the same elements, held differently
    tracemalloc.start()
    try:
        assert a == b and b == a
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10, f"{peak >> 10} KiB to compare"
    assert a == dict(a.items()) and a != {**dict(a.items()), (6, 20000): ("192.168.1.99", 20000)}
    b.pop((6, 29999))
    assert a != b and b != a and a != 5


def test_the_kernel_picture_holds_no_new_object_per_forward_on_the_first_address() -> None:
    """fwd4 and snat4 with 10k forwards: an element on the map's first address (the one WAN
    address in snat4) holds the binding's own port int, one on another a single int, none a tuple."""
    from natd.nft import PairMap

    port, other = int("20001"), int("20002")  # fresh int objects, as a decoded Bind carries
    pm: PairMap = PairMap()
    pm[(6, port)] = ("192.168.1.10", port)
    pm[(6, other)] = ("192.168.1.11", other)
    held = pm._d[6]
    assert held[port] is port  # nothing allocated for it
    assert type(held[other]) is int and held[other] == 1 << 16 | other
    assert pm[(6, port)] == ("192.168.1.10", 20001) and pm[(6, other)] == ("192.168.1.11", 20002)


def test_the_table_keeps_one_address_string_per_host_and_one_int_for_equal_ports() -> None:
    """A decoded Bind or Sync carries its own int for each port; the table keeps one int where the
    ports are equal, and one string per host (the decoder interns it): 10k forwards on a router."""
    from natd.bindings import compact

    t = BindingTable(lan_subnets=[__import__("ipaddress").IPv4Network("192.168.1.0/24")])
    for mid in range(1, 50):
        msg, _ = wire.decode(wire.encode(wire.Bind(mid, 6, "192.168.1.10", 20000 + mid, 20000 + mid, False)))
        assert isinstance(msg, wire.Bind)
        t.add(compact(msg.mid, msg.proto, msg.lan_ip, msg.lan_port, int(str(msg.want_port))))
    assert len({id(b.lan_ip) for b in t.by_mid.values()}) == 1
    assert all(b.wan_port is b.lan_port for b in t.by_mid.values())
    kept = t.by_mid[7]
    synced = [*t.by_mid.values(), wire.Binding(99, 17, "192.168.1.10", 5000, 5000)]
    sync, _ = wire.decode(wire.encode(wire.Sync(synced)))
    assert isinstance(sync, wire.Sync)
    t.replace_all(sync.bindings)
    assert t.by_mid[7] is kept and t.by_mid[99].lan_ip is kept.lan_ip
    assert t.by_mid[99].wan_port is t.by_mid[99].lan_port


def test_a_sync_of_an_unchanged_table_never_holds_an_object_per_binding() -> None:
    """controld re-sends its whole NAT1 set at every start. natd reads it one binding at a time
    and keeps the bindings it holds: at 10k, what it builds beside the table stays under 1 MiB.
    (A list of maps peaked at 2.8 MiB more, and the allocator kept those arenas: natd grew ~4 MiB at
    every controld restart.)"""
    import ipaddress
    import tracemalloc

    from natd.bindings import Limits, compact

    t = BindingTable(lan_subnets=[ipaddress.IPv4Network("192.168.1.0/24")], limits=Limits(70_000, 70_000))
    for mid in range(1, 10_001):
        t.add(compact(mid, 6, "192.168.1.10", 20000 + mid, 20000 + mid))
    held = dict(t.by_mid)
    data = wire.encode(wire.Sync([wire.Binding(mid, 6, "192.168.1.10", 20000 + mid, 20000 + mid)
                                  for mid in range(1, 10_001)]))
    tracemalloc.start()
    try:
        sync, _ = wire.decode(data)
        assert isinstance(sync, wire.Sync)
        assert t.replace_all(sync.bindings) == []
        del sync
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(t.by_mid[mid] is b for mid, b in held.items()) and len(t.by_mid) == 10_000
    assert peak - kept < 1 << 20, f"{(peak - kept) >> 10} KiB built beside the table"


def test_a_bulk_write_sends_each_changed_element_once_as_the_delta_path_does() -> None:
    """The restore path's diff (removed, changed, added) as ops: a changed element is one delete and
    one add, an unchanged one nothing, every delete before every add, as the delta path writes them."""
    from natd.nft import _bulk_ops, _delta_ops, _map_diff

    have = {(6, 1): ("192.168.1.2", 1), (6, 2): ("192.168.1.2", 2), (6, 3): ("192.168.1.2", 3)}
    want = {(6, 2): ("192.168.1.2", 2), (6, 3): ("192.168.1.9", 3), (17, 4): ("192.168.1.2", 4)}
    gone, new = _map_diff(want, have)
    assert sorted(gone) == [(6, 1), (6, 3)] and sorted(new) == [(6, 3), (17, 4)]
    ops = list(_bulk_ops(gone, want, have, _fwd_key))
    dels, adds = ops[:2], ops[2:]
    assert sorted(dels) == [(_fwd_key((6, 1)), None), (_fwd_key((6, 3)), None)]
    assert sorted(adds) == [(_fwd_key((6, 3)), _addr_port(("192.168.1.9", 3))),
                            (_fwd_key((17, 4)), _addr_port(("192.168.1.2", 4)))]
    triples = [((6, 1), have[(6, 1)], None), ((6, 3), have[(6, 3)], want[(6, 3)]), ((17, 4), None, want[(17, 4)])]
    assert sorted(_delta_ops(triples, _fwd_key)[:2]) == dels and sorted(_delta_ops(triples, _fwd_key)[2:]) == adds
