"""The store's change events: every write, typed, numbered, heard by every subscriber."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controld.core.events import ChangeEvent, ChangeKind
from controld.core.lifecycle import State
from controld.core.model import Mapping
from controld.core.service import Iwf
from controld.core.store import MappingTable
from controld.upnp import igd as upnp_igd
from shared import pcp
from tests.bed.iwf import LAN, ScriptedLink, add, run


def _row(mid: int, state: State = State.PENDING) -> Mapping:
    return Mapping(mid, LAN, 1, "", 8000 + mid, pcp.PROTO_TCP, LAN, 80, "d", 0, None, state, 0.0)


def test_every_write_is_one_numbered_event_with_both_rows(tmp_path: Path) -> None:
    t = MappingTable(str(tmp_path))
    heard: list[ChangeEvent] = []
    also: list[int] = []
    t.subscribe(heard.append)
    stop = t.subscribe(lambda ev: also.append(ev.seq))
    pending = t.apply(_row(1))
    active = t.apply(pending, state=State.ACTIVE, ext_ip="198.20.0.1")
    renewed = t.apply(active, pcp_expiry=99.0)  # a renewal: news to no client
    assert t.apply(renewed, pcp_expiry=99.0) == renewed  # nothing changed: no event
    t.publish("external address")
    stop()
    t.delete(renewed, "host left")
    assert [(e.seq, e.kind) for e in heard] == [(1, ChangeKind.ADDED), (2, ChangeKind.CHANGED),
                                                (3, ChangeKind.CHANGED), (4, ChangeKind.ADDRESSES),
                                                (5, ChangeKind.REMOVED)]
    assert also == [1, 2, 3, 4]  # unsubscribed before the delete
    assert heard[0].before is None and heard[0].after == pending and not heard[0].shown  # pending: not listed
    assert heard[1].before == pending and heard[1].after == active and heard[1].shown
    assert heard[2].before == active and heard[2].after == renewed and not heard[2].shown
    assert heard[3].shown and heard[3].mapping is None and heard[3].reason == "external address"
    assert heard[4].before == renewed and heard[4].after is None and heard[4].mapping == renewed
    assert heard[4].reason == "host left" and heard[4].shown
    t.close()


def test_a_failing_subscriber_neither_fails_the_write_nor_silences_the_rest(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    t = MappingTable(str(tmp_path))
    heard: list[ChangeEvent] = []

    def broken(ev: ChangeEvent) -> None:
        raise RuntimeError("boom")
    t.subscribe(broken)
    t.subscribe(heard.append)
    m = t.apply(_row(1, State.ACTIVE))
    assert t.by_id[m.id] == m and [e.kind for e in heard] == [ChangeKind.ADDED]
    assert "change subscriber" in caplog.text and "boom" in caplog.text
    t.close()


def test_the_core_s_operations_are_heard_with_reasons(tmp_path: Path) -> None:
    """An AddPortMapping is one shown event (the row listed), a delete one more, with its reason;
    renewals and intermediate states are events too but not shown."""
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        heard: list[ChangeEvent] = []
        iwf.table.subscribe(heard.append)
        m = await add(iwf, 8080)
        shown = [e for e in heard if e.shown and e.kind != ChangeKind.ADDRESSES]
        assert [(e.kind, e.after.state if e.after else None) for e in shown] == [(ChangeKind.CHANGED, State.ACTIVE)]
        assert heard[0].kind == ChangeKind.ADDED and heard[0].after is not None
        assert heard[0].after.state == State.PENDING and shown[0].after == iwf.table.by_id[m.id]
        seqs = [e.seq for e in heard]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        heard.clear()
        await upnp_igd.delete_port_mapping(iwf, LAN, 1, "", 8080, pcp.PROTO_TCP)
        gone = [e for e in heard if e.kind == ChangeKind.REMOVED]
        assert len(gone) == 1 and gone[0].before is not None and gone[0].before.id == m.id and gone[0].reason
        assert [e.shown for e in heard if e.kind != ChangeKind.ADDRESSES].count(True) == 1
    run(tmp_path, body)


def test_a_write_changes_exactly_the_fields_named(tmp_path: Path) -> None:
    """The store's own copy (store._evolve, not dataclasses.replace) keeps every other field."""
    t = MappingTable(str(tmp_path))
    row = t.apply(_row(2))
    for f in dataclasses.fields(Mapping):
        value = getattr(row, f.name)
        new = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 1.5,
               str: lambda v: v + "x", bytes: lambda v: v + b"x"}.get(type(value), lambda v: v)(value)
        if f.name == "id" or new == value:
            continue
        assert t.apply(row, durable=False, **{f.name: new}) == dataclasses.replace(row, **{f.name: new})
        row = t.by_id[2]
    with pytest.raises(TypeError):
        t.apply(row, no_such_field=1)


def test_a_granted_port_equal_to_the_external_one_holds_its_int(tmp_path: Path) -> None:
    """natd's reply decodes a fresh int for the NAT1 port; a row keeps one int object for every
    port equal to the external one (32 bytes a mapping, 10k mappings on a 128 MB router)."""
    t = MappingTable(str(tmp_path))
    row = t.apply(dataclasses.replace(_row(3), int_port=int(str(8003))))
    port = int(str(row.ext_port))  # equal, another object, as a decoded reply's
    m = t.apply(row, ext_port=port, nat1_port=int(str(row.ext_port)))
    assert m.ext_port is row.ext_port and m.nat1_port is row.ext_port and m.int_port is row.ext_port


def test_rows_read_at_start_share_their_creation_second(tmp_path: Path) -> None:
    """SQLite gives each row its own float; rows made in one second share one, as they did when
    they were made (24 bytes a mapping of a router's restart with 10k)."""
    t = MappingTable(str(tmp_path))
    for mid, created in ((1, 1_700_000_000.0), (2, 1_700_000_000.0), (3, 1_700_000_001.0)):
        t.apply(dataclasses.replace(_row(mid, State.ACTIVE), created=created))
    t.close()
    t = MappingTable(str(tmp_path))
    try:
        rows = [t.by_id[mid] for mid in (1, 2, 3)]
        assert rows[0].created is rows[1].created and rows[2].created == 1_700_000_001.0
    finally:
        t.close()
