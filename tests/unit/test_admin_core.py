"""The admin backend over the real core (controld/adminapi/core_backend.py), natd scripted, nat1-only:
admin rights, the page's secure-mode requester, origins stored (and migrated), events, counters."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from controld.adminapi.backend import (
    OPERATOR,
    AddRequest,
    BackendError,
    ChangeEvent,
    ErrorKind,
    MappingKey,
    Origin,
    Requester,
)
from controld.adminapi.core_backend import CoreBackend
from controld.core.model import CoreError, FrontEnd, upnp
from controld.core.model import CreateRequest as Create
from controld.core.policy import Permissions, Policy, admin_rights
from controld.core.service import Iwf, IwfConfig
from controld.core.store import MappingTable
from shared import wire
from shared.const import TCP

WAN = "203.0.113.5"  # a public WAN address: nat1-only, no PCP needed
HOST, OTHER = "192.168.1.2", "192.168.1.7"
WEB = Requester(Origin.WEB, HOST)


class Natd:
    """natd stand-in: hello, syncs, binds (the wanted port) and unbinds."""

    def __init__(self) -> None:
        self.bound: dict[int, int] = {}
        self.syncs = 0

    async def call(self, msg: wire.Message, timeout: float = 5.0) -> wire.Message:
        if isinstance(msg, wire.Hello):
            return wire.HelloReply("boot-1", WAN, None, ["192.168.1.1"], ["192.168.1.0/24"])
        if isinstance(msg, wire.Sync):
            self.syncs += 1
            return wire.SyncReply(len(msg.bindings), 0)
        if isinstance(msg, wire.Bind):
            self.bound[msg.mid] = msg.want_port
            return wire.BindReply(WAN, msg.want_port)
        if isinstance(msg, wire.Unbind):
            self.bound.pop(msg.mid, None)
            return wire.Ok()
        raise AssertionError(f"unexpected {msg}")


def run(tmp_path: Path, body: Callable[[Iwf, CoreBackend, Natd], Awaitable[None]], **policy: object) -> None:
    natd = Natd()
    rules = Permissions.parse(["allow 1024-65535 0.0.0.0/0 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535"])
    iwf = Iwf(IwfConfig(mode="nat1-only", service_wait=0.0, epoch_poll=0.0), MappingTable(str(tmp_path)),
              natd, rng=random.Random(1), policy=Policy(rules, **policy))  # type: ignore[arg-type]
    reloads: list[int] = []
    backend = CoreBackend(iwf, lambda: reloads.append(1))

    async def main() -> None:
        await iwf.start()
        try:
            await body(iwf, backend, natd)
            await backend.reload()
            assert reloads == [1]
        finally:
            await iwf.stop()
            iwf.table.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_operator_has_admin_rights_and_lan_hosts_do_not(tmp_path: Path) -> None:
    async def body(iwf: Iwf, b: CoreBackend, natd: Natd) -> None:
        # below 1024 (the rules deny LAN hosts), to another host, permanent: the operator may
        m = await b.add(AddRequest("tcp", 443, OTHER, 4430, "https"), OPERATOR)
        assert (m.origin, m.owner, m.remaining, m.ext_ip, m.nat1_ip, m.state) == \
            (Origin.OPERATOR, "operator", None, WAN, WAN, "active")
        assert natd.bound[m.id] == 443
        # the rights end with the call: the same request from the core's UPnP side is refused
        with pytest.raises(CoreError):
            await iwf.create(upnp(HOST), Create(TCP, 444, HOST, 4430, 0))
        taken = await b.add(AddRequest("TCP", 6000, OTHER, 6000), OPERATOR)
        # the page's LAN host: its own address only, offered lifetimes, the rules, its own mappings
        for req, kind in ((AddRequest("TCP", 7000, OTHER, 7000, "", 3600), ErrorKind.DENIED),
                          (AddRequest("TCP", 7000, HOST, 7000, "", 0), ErrorKind.INVALID),
                          (AddRequest("TCP", 80, HOST, 80, "", 3600), ErrorKind.DENIED),
                          (AddRequest("TCP", 443, HOST, 4430, "", 3600), ErrorKind.DENIED),
                          (AddRequest("TCP", 6000, HOST, 6000, "", 3600), ErrorKind.CONFLICT)):
            with pytest.raises(BackendError) as exc:
                await b.add(req, WEB)
            assert exc.value.kind == kind, (req, exc.value.message)
        mine = await b.add(AddRequest("udp", 7000, HOST, 7001, "game", 3600), WEB)
        assert (mine.origin, mine.owner, mine.proto, 3590 < (mine.remaining or 0) <= 3600) == \
            (Origin.WEB, HOST, "UDP", True)
        with pytest.raises(BackendError) as exc:
            await b.delete(m.id, WEB)
        assert exc.value.kind == ErrorKind.DENIED and exc.value.message == f"mapping {m.id} belongs to another host"
        with pytest.raises(BackendError) as exc:
            await b.flush(None, WEB)
        assert exc.value.kind == ErrorKind.DENIED
        assert (await b.delete(MappingKey("UDP", 7000), WEB)).id == mine.id
        assert [v.id for v in await b.list()] == [m.id, taken.id] and (await b.get(m.id)) == m
        with pytest.raises(BackendError) as exc:
            await b.get(mine.id)
        assert exc.value.kind == ErrorKind.NOT_FOUND and exc.value.message == f"no mapping {mine.id}"
        st = await b.status()
        assert (st.mode, st.wan_ip, st.ext_ip, st.pcp_server, st.mappings) == \
            ("nat1-only", WAN, WAN, None, {"operator": 2})
        assert st.counters.requests == {"operator": 2, "web": 8}
        assert st.counters.errors == {"web": {"denied": 4, "invalid": 1, "conflict": 1}}
        assert st.counters.resyncs == natd.syncs == 1

    run(tmp_path, body)


def test_watch_events_flush_and_host_left(tmp_path: Path) -> None:
    async def body(iwf: Iwf, b: CoreBackend, natd: Natd) -> None:
        seen: list[ChangeEvent] = []
        stop = b.subscribe(seen.append)
        a = await b.add(AddRequest("TCP", 5000, HOST, 5000), OPERATOR)
        await iwf.create(upnp(HOST), Create(TCP, 5001, HOST, 5001, 0))
        await iwf.create(upnp(OTHER), Create(TCP, 5002, OTHER, 5002, 0))
        await b.delete(a.id, OPERATOR)
        assert await b.flush(HOST, OPERATOR) == 1
        assert await b.host_left(OTHER) == 1
        assert [(e.kind, e.mapping.ext_port, e.mapping.origin.value, e.reason) for e in seen] == [
            ("added", 5000, "operator", "operator"), ("added", 5001, "upnp", "upnp"),
            ("added", 5002, "upnp", "upnp"), ("removed", 5000, "operator", "operator"),
            ("removed", 5001, "upnp", "flush"), ("removed", 5002, "upnp", "host left")]
        stop()
        await b.add(AddRequest("TCP", 5003, HOST, 5003), OPERATOR)
        assert len(seen) == 6 and natd.bound.keys() == {iwf.snapshot()[0].id}

    run(tmp_path, body)


def test_origin_is_stored_and_old_tables_read_as_upnp(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(old / "mappings.sqlite3")
    db.executescript("""CREATE TABLE mappings (id INTEGER PRIMARY KEY, cp TEXT NOT NULL, igd INTEGER NOT NULL,
        remote_host TEXT NOT NULL, ext_port INTEGER NOT NULL, proto INTEGER NOT NULL, int_client TEXT NOT NULL,
        int_port INTEGER NOT NULL, description TEXT NOT NULL, lease INTEGER NOT NULL, lease_end REAL,
        state TEXT NOT NULL, created REAL NOT NULL, nat1_port INTEGER, nonce BLOB, pcp_server TEXT, ext_ip TEXT,
        pcp_lifetime INTEGER, pcp_expiry REAL, prefer_failure INTEGER NOT NULL, mode TEXT NOT NULL);
        INSERT INTO mappings VALUES (1, '192.168.1.2', 1, '', 8080, 6, '192.168.1.2', 80, 'x', 0, NULL,
        'active', 0, 8080, NULL, NULL, '203.0.113.5', NULL, NULL, 1, 'nat1-only');""")
    db.commit()
    db.close()
    t = MappingTable(str(old))
    assert t.by_id[1].origin == "upnp"
    t.apply(t.by_id[1], origin=FrontEnd.WEB.value)
    t.close()
    assert MappingTable(str(old)).by_id[1].origin == "web"  # persisted


def test_admin_rights_are_scoped_to_the_block() -> None:
    p = Policy(secure_mode=True)
    with admin_rights():
        p.check_client("operator", HOST)
        assert p.may_touch("operator", HOST, HOST)
    with pytest.raises(CoreError):
        p.check_client("operator", HOST)
