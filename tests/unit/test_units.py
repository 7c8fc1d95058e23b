"""Pure pieces: wire schema against hostile input, SOAP parsing, error table, lifecycle, table."""

from __future__ import annotations

import dataclasses
import sys
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controld.core.lifecycle import TRANSITIONS, Ev, LifecycleError, State, next_state
from controld.core.model import Mapping
from controld.core.store import MappingTable
from controld.upnp import soap
from controld.upnp.errors import PCP_TO_UPNP, upnp_error_for_pcp
from natd.bindings import BindingTable, PolicyError
from shared import pcp, wire

# --- wire schema -------------------------------------------------------------------


def test_wire_round_trip() -> None:
    msg = wire.Sync([wire.Binding(1, 6, "192.168.1.2", 80, 8080)])
    assert wire.decode(wire.encode(msg, 9)) == (msg, 9)


def test_one_packer_serves_every_message_and_a_failed_or_big_one_leaves_nothing_behind() -> None:
    """encode() reuses one msgpack Packer (packb's per-call Packer is a 256 KiB buffer per message): a
    message that cannot be packed leaves it empty for the next, and one bigger than KEEP_BYTES (a
    sync) is followed by a fresh Packer; the bytes are msgpack's either way."""
    first = wire._ENCODER._packer

    @dataclasses.dataclass(frozen=True)
    class Odd(wire.Message):
        OP = "odd"
        what: object

    with pytest.raises(TypeError):
        wire.encode(Odd(object()))
    assert wire.encode(wire.Ok(), 5) == msgpack.packb({"v": wire.SCHEMA_VERSION, "op": "ok", "id": 5})
    assert wire._ENCODER._packer is first
    many = [wire.Binding(i, 6, "192.168.1.2", 1024 + i, 1024 + i) for i in range(1, 5000)]
    big = wire.encode(wire.Sync(many))
    assert len(big) > wire._Encoder.KEEP_BYTES and wire.decode(big)[0] == wire.Sync(many)
    assert wire._ENCODER._packer is not first
    assert wire.decode(wire.encode(wire.Unbind(7), 1)) == (wire.Unbind(7), 1)


def _packed(mid: int, proto: int, lan_port: int, wan_port: int, ip: bytes = bytes([192, 168, 1, 2])) -> bytes:
    """One binding as a sync packs it, written here by hand (the layout is the wire's, not the codec's)."""
    return mid.to_bytes(8, "big") + bytes([proto]) + ip + lan_port.to_bytes(2, "big") + wan_port.to_bytes(2, "big")


def test_a_sync_carries_its_bindings_packed_and_reads_the_list_form_too() -> None:
    """17 bytes a binding in one bin (a 10k sync decodes to one bytes object, no map per binding);
    a sender from before the packing, writing a list of maps, is still understood."""
    bindings = [wire.Binding(1, 6, "192.168.1.2", 80, 8080), wire.Binding(2**40, 17, "10.0.0.9", 5353, 53)]
    raw = msgpack.unpackb(wire.encode(wire.Sync(bindings)))
    assert raw["bindings"] == _packed(1, 6, 80, 8080) + _packed(2**40, 17, 5353, 53, bytes([10, 0, 0, 9]))
    msg, _ = wire.decode(wire.encode(wire.Sync(bindings)))
    assert isinstance(msg, wire.Sync) and isinstance(msg.bindings, wire.PackedBindings)
    assert list(msg.bindings) == bindings and len(msg.bindings) == 2 and msg.bindings[-1] == bindings[1]
    assert msg.bindings[0].lan_ip is sys.intern("192.168.1.2")
    old = msgpack.packb({"v": 2, "op": "sync", "bindings": [
        {"mid": b.mid, "proto": b.proto, "lan_ip": b.lan_ip, "lan_port": b.lan_port, "wan_port": b.wan_port}
        for b in bindings]})
    assert wire.decode(old)[0] == msg
    with pytest.raises(wire.WireError):
        wire.Sync([wire.Binding(0, 6, "192.168.1.2", 80, 80)])  # the sender checks what it packs too


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=17, max_size=17), max_size=8), st.binary(max_size=16))
def test_packed_bindings_from_a_peer_are_refused_or_every_one_checks(records: list[bytes], tail: bytes) -> None:
    """Whatever bytes a peer sends as a sync's bindings: a bad-field error, or bindings each of which
    passes the same check a Binding does (no record is read unchecked)."""
    raw = msgpack.packb({"v": 2, "op": "sync", "bindings": b"".join(records) + tail})
    try:
        msg, _ = wire.decode(raw)
    except wire.WireError as exc:
        assert exc.code == "bad-field"
        return
    assert isinstance(msg, wire.Sync) and not tail and len(msg.bindings) == len(records)
    for b in msg.bindings:
        b.check()


@pytest.mark.parametrize("raw,code", [
    (b"\xc1", "bad-msgpack"),
    (msgpack.packb([1, 2]), "bad-msgpack"),
    (msgpack.packb({"v": 99, "op": "hello"}), "version"),
    (msgpack.packb({"v": 1, "op": "rm -rf"}), "bad-op"),
    (msgpack.packb({"v": 1, "op": "bind", "mid": 1}), "bad-field"),
    (msgpack.packb({"v": 1, "op": "bind", "mid": "1", "proto": 6, "lan_ip": "1.2.3.4", "lan_port": 1,
                    "want_port": 1}), "bad-field"),
    (msgpack.packb({"v": 1, "op": "bind", "mid": 1, "proto": 1, "lan_ip": "1.2.3.4", "lan_port": 1,
                    "want_port": 1}), "bad-field"),
    (msgpack.packb({"v": 1, "op": "bind", "mid": 1, "proto": 6, "lan_ip": "1.2.3.4", "lan_port": 70000,
                    "want_port": 1}), "bad-field"),
    (msgpack.packb({"v": 1, "op": "pcp.exchange", "server": "x", "packet": b""}), "bad-field"),
    (msgpack.packb({"v": 1, "op": "pcp.exchange", "server": "1.1.1.1", "packet": b"x" * 5000}), "bad-field"),
    (msgpack.packb({"v": 1, "op": "pcp.exchange", "server": "1.1.1.1", "packet": b"x" * (wire.MAX_PACKED + 1)}),
     "bad-msgpack"),
    # a sync's packed bindings (mid, proto, address, LAN port, WAN port): every record is checked
    (msgpack.packb({"v": 2, "op": "sync", "bindings": _packed(1, 6, 80, 80)[:-1]}), "bad-field"),
    (msgpack.packb({"v": 2, "op": "sync", "bindings": _packed(1, 1, 80, 80)}), "bad-field"),
    (msgpack.packb({"v": 2, "op": "sync", "bindings": _packed(0, 6, 80, 80)}), "bad-field"),
    (msgpack.packb({"v": 2, "op": "sync", "bindings": _packed(1, 17, 80, 80) + _packed(2, 17, 0, 80)}),
     "bad-field"),
    (msgpack.packb({"v": 2, "op": "sync", "bindings": "all of them"}), "bad-field"),
    (msgpack.packb({"v": 2, "op": "sync", "bindings": [{"mid": 1, "proto": 6, "lan_ip": 3232235777,
                                                        "lan_port": 80, "wan_port": 80}]}), "bad-field"),
    (msgpack.packb({"v": 2, "op": "sync", "bindings": [{"mid": 1, "proto": 6, "lan_ip": "192.168.1.300",
                                                        "lan_port": 80, "wan_port": 80}]}), "bad-field"),
    (msgpack.packb({"v": 1, "op": "pcp.exchange", "server": "1.1.1.1", "packet": b"", "wait_ms": -1}), "bad-field"),
    (msgpack.packb({"v": 1, "op": "hello", "extra": 1}), "bad-field"),
    (b"\x00" * (wire.MAX_MESSAGE + 1), "too-big"),
])
def test_wire_refuses_hostile_messages(raw: bytes, code: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        wire.decode(raw)
    assert exc.value.code == code


# --- natd policy -------------------------------------------------------------------


def test_natd_refuses_non_lan_targets() -> None:
    import ipaddress

    t = BindingTable([ipaddress.IPv4Network("192.168.1.0/24")], {"192.168.1.1", "100.64.0.2"})
    for ip in ("192.168.1.1", "100.64.0.2", "127.0.0.1", "10.0.0.5", "192.168.1.255", "192.168.1.0"):
        with pytest.raises(PolicyError):
            t.add(wire.Binding(1, 6, ip, 80, 8080))
    t.add(wire.Binding(1, 6, "192.168.1.2", 80, 8080))
    assert t.allocate(6, 8080, exact=False) != 8080
    with pytest.raises(PolicyError):
        t.allocate(6, 8080, exact=True)
    assert t.allocate(17, 5351, exact=False) != 5351  # never the PCP ports (RFC 6887 §11.3)


# --- SOAP --------------------------------------------------------------------------

ACTION = '"urn:schemas-upnp-org:service:WANIPConnection:1#GetExternalIPAddress"'


def _env(body: str) -> bytes:
    return ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
            f"<s:Body>{body}</s:Body></s:Envelope>").encode()


def test_soap_parses_action_and_args() -> None:
    a = soap.parse_request(_env('<u:GetExternalIPAddress xmlns:u="urn:schemas-upnp-org:service:'
                                'WANIPConnection:1"><X>1</X></u:GetExternalIPAddress>'), ACTION)
    assert (a.name, a.version, a.args) == ("GetExternalIPAddress", 1, {"X": "1"})


@pytest.mark.parametrize("body", [
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><x>&b;</x>',
    b'<?xml version="1.0"?><!DOCTYPE x SYSTEM "file:///etc/passwd"><x/>',
    _env("<u:Other xmlns:u='urn:schemas-upnp-org:service:WANIPConnection:1'/>"),
    _env("<a>" * 40 + "</a>" * 40),
    b"<notxml",
    _env(""),
])
def test_soap_refuses_bad_documents(body: bytes) -> None:
    with pytest.raises(soap.SoapError):
        soap.parse_request(body, ACTION)


def test_soap_fault_shape() -> None:
    f = soap.fault(718, "ConflictInMappingEntry")
    assert b"<errorCode>718</errorCode>" in f and b"UPnPError" in f


# --- error table (RFC 6970 §4.3, docs/requirements.md §16) ---------------------------------

ROWS = [  # (PCP result, IGD:1, IGD:2) exactly as the reference gives them
    (1, 501, 501), (2, 718, 606), (3, 501, 501), (4, 501, 501), (5, 501, 501), (6, 501, 501),
    (7, 501, 501), (8, 501, 728), (9, 501, 501), (10, 501, 728), (12, 501, 501), (13, 501, 501),
]


@pytest.mark.parametrize("result,v1,v2", ROWS)
def test_pcp_to_upnp_table(result: int, v1: int, v2: int) -> None:
    assert upnp_error_for_pcp(result, 1, "AddPortMapping").code == v1
    assert upnp_error_for_pcp(result, 2, "AddPortMapping").code == v2


def test_cannot_provide_external_depends_on_action() -> None:
    assert upnp_error_for_pcp(11, 1, "AddPortMapping").code == 718
    assert upnp_error_for_pcp(11, 2, "GetSpecificPortMappingEntry").code == 714
    assert upnp_error_for_pcp(24, 2, "AddPortMapping").code == 501  # later codes -> 501
    assert set(PCP_TO_UPNP) == {r for r, _, _ in ROWS}


# --- lifecycle ---------------------------------------------------------------------


def test_lifecycle_table() -> None:
    assert next_state(State.PENDING, Ev.UPSTREAM_OK) == State.ACTIVE
    assert next_state(State.PENDING, Ev.TIMEOUT) == State.GONE
    assert next_state(State.RENEWING, Ev.UPSTREAM_ERROR) == State.ACTIVE
    with pytest.raises(LifecycleError):
        next_state(State.GONE, Ev.RENEW_DUE)
    assert all(dst in State for dst in TRANSITIONS.values())


# --- the table ---------------------------------------------------------------------


def _m(t: MappingTable, port: int, state: State = State.ACTIVE) -> Mapping:
    return Mapping(t.new_id(), "192.168.1.2", 1, "", port, 6, "192.168.1.2", port, "d", 0, None, state, 0.0,
                   nonce=b"n" * 12)


def test_table_persists_and_keeps_indices(tmp_path) -> None:
    t = MappingTable(str(tmp_path))
    a, b, c = _m(t, 1001), _m(t, 1002), _m(t, 1003)
    for m in (a, b, c):
        t.apply(m)
    t.apply(_m(t, 1004, State.PENDING))  # not listed until acknowledged
    assert [m.ext_port for m in t.listed()] == [1001, 1002, 1003]
    t.delete(b)
    second = t.at_index(1)
    assert second is not None and second.ext_port == 1003 and t.at_index(2) is None
    t.close()
    t2 = MappingTable(str(tmp_path))
    assert [m.ext_port for m in t2.listed()] == [1001, 1003]
    kept = t2.find(1003, 6)
    assert kept is not None and kept.nonce == b"n" * 12
    assert t2.new_id() > c.id
    assert pcp.MAX_LIFETIME == 2**32 - 1
    # rows live in memory: SQLite's page cache is held small (its 2 MiB default would only be RSS)
    assert t2.db.execute("PRAGMA cache_size").fetchone()[0] == -64


def test_store_apply_is_the_one_writer_and_never_resurrects(tmp_path) -> None:
    """Rows are frozen; apply() writes the current row with the changes, durably, and a row
    deleted while its writer waited stays deleted (on disk too)."""
    import dataclasses

    t = MappingTable(str(tmp_path))
    m = t.apply(_m(t, 2000, State.ACTIVE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.ext_port = 1  # type: ignore[misc]
    stale = m
    m2 = t.apply(m, description="new")
    m3 = t.apply(stale, int_port=81)  # a stale copy's change lands on the current row
    assert (m3.description, m3.int_port) == ("new", 81) and t.find(2000, 6) == m3 and m2.int_port == 2000
    t.delete(m3)
    t.apply(stale, state=State.RECOVERING)
    assert t.find(2000, 6) is None and t.count() == 0
    t.close()
    assert MappingTable(str(tmp_path)).by_id == {}


def test_quiet_checkpoint_empties_the_wal_and_never_waits_for_a_reader(tmp_path, monkeypatch) -> None:
    """MappingTable.checkpoint: the WAL's rows into the database and its file back to 0 bytes
    (RAM on OpenWrt); a reader holding a snapshot makes it give up at once, not after the busy
    timeout, and writes still wait as long as before."""
    import sqlite3

    from controld.core import store

    monkeypatch.setattr(store, "SQLITE_BUSY_S", 30.0)  # a checkpoint that waited would show
    t = MappingTable(str(tmp_path))
    for port in range(3000, 3300):
        t.apply(_m(t, port))
    wal = tmp_path / "mappings.sqlite3-wal"
    assert wal.stat().st_size > 0
    reader = sqlite3.connect(str(tmp_path / "mappings.sqlite3"), isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM mappings").fetchone() == (300,)  # a snapshot held
    started = time.monotonic()
    assert t.checkpoint() is False
    assert time.monotonic() - started < 10  # it did not wait out the 30 s busy timeout
    assert wal.stat().st_size > 0
    assert t.db.execute("PRAGMA busy_timeout").fetchone() == (30_000,)  # writes wait as before
    reader.execute("COMMIT")
    assert t.checkpoint() is True
    assert wal.stat().st_size == 0
    assert reader.execute("SELECT COUNT(*) FROM mappings").fetchone() == (300,)
    t.apply(_m(t, 4000))  # the table goes on writing into the emptied WAL
    t.close()
    assert len(MappingTable(str(tmp_path)).listed()) == 301
