"""Operational scenarios found in review (real miniupnpd, kill -9, lowered limits), reduced to
the IWF against a scripted natd and NAT2 so each is exact and fast."""

from __future__ import annotations

import asyncio
import time

from controld.core.lifecycle import State
from controld.core.model import Mapping
from controld.core.store import MappingTable
from controld.upnp import igd as upnp_igd
from shared import pcp, wire
from shared.const import DISCARD_PORT
from tests.bed.iwf import LAN, SERVER, ScriptedLink, add, drive, make_iwf, regrant, until


class Scripted(ScriptedLink):
    """natd + NAT2 stand-in with switches: NAT2 grants another port (ignoring PREFER_FAILURE,
    as miniupnpd 2.3.1 does), answers deletes with NO_RESOURCES; natd refuses some syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.steal = False
        self.deletes_fail = False
        self.refuse: list[int] = []
        self.syncs: list[wire.Sync] = []

    def answer(self, req: pcp.Request, raw: bytes) -> bytes | None:
        m = req.map
        if m is not None and req.lifetime == 0 and self.deletes_fail:
            return pcp.encode_response(pcp.Response(pcp.Opcode.MAP, pcp.Result.NO_RESOURCES, 30, 100, m))
        out = super().answer(req, raw)
        if out is not None and self.steal and m is not None and req.lifetime and m.internal_port != DISCARD_PORT:
            out = regrant(out, external_port=m.external_port + 10)
        return out

    async def call(self, msg: wire.Message, timeout: float = 5.0) -> wire.Message:
        if isinstance(msg, wire.Sync):
            self.syncs.append(msg)
            return wire.SyncReply(len(msg.bindings), 0, list(self.refuse))
        return await super().call(msg, timeout)


def test_recovery_keeps_the_promised_port(tmp_path) -> None:
    """After a server restart a mapping keeps its port or keeps trying (RFC 6970 §5.10,
    docs/requirements.md IWF-82): a grant of another port is handed back, never stored, so ports
    cannot shift from one application to the next."""
    link = Scripted()
    iwf = make_iwf(tmp_path, link)

    async def body() -> None:
        m = await add(iwf, 8080)

        def row():  # the row as stored now (rows are immutable)
            return iwf.table.by_id[m.id]
        link.steal = True
        iwf._recover_all(SERVER, 0.0)
        await until(lambda: any(r.lifetime == 0 for r in link.maps()))
        assert row().ext_port == 8080 and row().state == State.RECOVERING
        assert [r.map.nonce for r in link.maps() if r.lifetime == 0] == [m.nonce]  # the wrong grant, released
        await until(lambda: m.id in iwf.timers.due)
        # It retries within seconds (backing off to 5 min), not at the old grant's renewal times.
        assert iwf.timers.due[m.id][0] - iwf.wall() < 10
        # After our own WAN address changed the port may move (IWF-81), asked without PREFER_FAILURE.
        iwf._recover_all(SERVER, 0.0, may_move=True)
        await until(lambda: row().ext_port == 8090)
        assert row().ext_port == 8090 and row().state == State.ACTIVE
        assert not link.maps()[-1].options.prefer_failure
    drive(iwf, body)


def test_natd_refusals_in_a_sync_remove_those_mappings(tmp_path) -> None:
    """A lowered natd limit must not wedge the sync: natd leaves out what is over it, and
    controld removes exactly those, upstream too, so no view lists a dead mapping."""
    link = Scripted()
    iwf = make_iwf(tmp_path, link)

    async def body() -> None:
        keep, drop = await add(iwf, 8080, iport=80), await add(iwf, 8081, iport=81)
        link.refuse = [drop.id]
        await iwf.on_natd_event(wire.Heartbeat("boot-2", 0))  # natd restarted with a lower limit
        await until(lambda: iwf.table.count() == 1)
        assert [m.id for m in iwf.table.listed()] == [keep.id]
        assert [r.map.nonce for r in link.maps() if r.lifetime == 0] == [drop.nonce]
    drive(iwf, body)


def test_unfinished_rows_keep_their_binding_until_deleted_upstream(tmp_path) -> None:
    """Rows a crash left PENDING or DELETING are synced with their NAT1 binding (natd relays
    a MAP only for a bound mapping), deleted upstream with their nonce, then dropped."""
    t = MappingTable(str(tmp_path))
    now = time.time()
    for mid, st in ((1, State.DELETING), (2, State.PENDING)):
        t.apply(Mapping(id=mid, cp=LAN, igd=1, remote_host="", ext_port=8080 + mid, proto=6, int_client=LAN,
                       int_port=80 + mid, description="x", lease=0, lease_end=None, state=st, created=now,
                       nat1_port=40000 + mid, nonce=bytes(range(mid, mid + 12)), pcp_server=SERVER,
                       ext_ip="198.20.0.1", pcp_lifetime=120, pcp_expiry=now + 120, mode="cascaded"))
    t.close()
    link = Scripted()

    async def main() -> None:
        iwf = make_iwf(tmp_path, link)
        await iwf.start()
        try:
            assert sorted(b.mid for b in link.syncs[0].bindings) == [1, 2]
            await until(lambda: not iwf.table.by_id)
            deletes = [(s.mid, r.map.nonce) for s, r in link.sent if r.lifetime == 0 and r.map.internal_port != 9]
            assert sorted(deletes) == [(1, bytes(range(1, 13))), (2, bytes(range(2, 14)))]  # relayed via the binding
            assert sorted(link.unbound) == [1, 2] and not iwf.table.by_id
        finally:
            await iwf.stop()
            iwf.table.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_delete_while_recovering_succeeds_when_nat2_no_longer_has_it(tmp_path) -> None:
    link = Scripted()
    iwf = make_iwf(tmp_path, link)

    async def body() -> None:
        m = await add(iwf, 8080)
        m = iwf.table.apply(m, durable=False, state=State.RECOVERING)  # NAT2 restarted; not re-created yet
        link.deletes_fail = True  # miniupnpd answers NO_RESOURCES for a mapping it does not have
        await upnp_igd.delete_port_mapping(iwf, LAN, 1, "", 8080, pcp.PROTO_TCP)
        assert iwf.table.count() == 0 and link.unbound == [m.id]
    drive(iwf, body)


def test_natd_return_brings_failed_renewals_forward(tmp_path) -> None:
    link = Scripted()
    iwf = make_iwf(tmp_path, link)

    async def body() -> None:
        m = await add(iwf, 8080)
        iwf._schedule(m, iwf.wall() + 1000, attempt=3)  # failed while natd was away, backing off
        await iwf.on_natd_event(wire.Heartbeat("boot-2", 0))
        assert iwf.timers.due[m.id][0] <= iwf.wall() + 1
    drive(iwf, body)


def test_a_start_sets_timers_only_for_what_has_something_due(tmp_path) -> None:
    """At start the stored upstream mappings are re-asserted, and a nat1-only row's lease end is
    set again; a nat1-only row without a lease has nothing due, so it gets no timer: 10k of them
    used to cost ~1.7 MiB of timer entries that fired only to do nothing."""
    t = MappingTable(str(tmp_path))
    now = time.time()
    for mid, mode, lease_end in ((1, "nat1-only", None), (2, "nat1-only", now + 600), (3, "cascaded", None)):
        t.apply(Mapping(id=mid, cp=LAN, igd=1, remote_host="", ext_port=8080 + mid, proto=6, int_client=LAN,
                        int_port=80 + mid, description="x", lease=600 if lease_end else 0, lease_end=lease_end,
                        state=State.ACTIVE, created=now, nat1_port=8080 + mid, mode=mode,
                        nonce=bytes(12) if mode == "cascaded" else None,
                        pcp_server=SERVER if mode == "cascaded" else None))
    t.close()
    link = Scripted()
    iwf = make_iwf(tmp_path, link, service_wait=30.0)

    async def check() -> None:
        due = dict(iwf.timers.due)
        assert sorted(due) == [2, 3]
        assert due[2][0] == now + 600 and due[3][0] <= time.time() + 30
    drive(iwf, check)
