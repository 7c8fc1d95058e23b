"""Regressions found in review, each proved wrong before its fix (IWF with a scripted natd/NAT2)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from controld.core.policy import Permissions
from controld.natd_link import NatdError
from controld.upnp import igd as upnp_igd
from controld.upnp.errors import UPnPError
from shared import pcp, wire
from shared.const import DISCARD_PORT
from tests.bed.iwf import LAN, ScriptedLink, add, drive, make_iwf, regrant


class FailingSync(ScriptedLink):
    def __init__(self) -> None:
        super().__init__()
        self.fail_sync, self.syncs = False, 0

    async def call(self, msg: wire.Message, timeout: float = 5.0) -> wire.Message:
        if isinstance(msg, wire.Sync):
            self.syncs += 1
            if self.fail_sync:
                raise NatdError("timeout", "natd did not answer sync")
        return await super().call(msg, timeout)


def test_failed_resync_after_natd_restart_is_retried(tmp_path) -> None:
    """docs/core.md recovery: a natd restart re-syncs NAT1 until it succeeds."""
    link = FailingSync()
    iwf = make_iwf(tmp_path, link, mode="nat1-only")

    async def body() -> None:
        await add(iwf, 8080)
        base = link.syncs
        link.fail_sync = True
        with pytest.raises(NatdError):
            await iwf.on_natd_event(wire.Heartbeat("boot-2", 0))
        link.fail_sync = False
        await iwf.on_natd_event(wire.Heartbeat("boot-2", 0))
        await iwf.on_natd_event(wire.Heartbeat("boot-2", 0))
        assert link.syncs - base == 2  # failed once, retried once, then settled
    drive(iwf, body)


class ShortGrant(ScriptedLink):
    """NAT2 grants ``life`` seconds to every mapping."""

    def __init__(self, life: int) -> None:
        super().__init__()
        self.life = life

    def answer(self, req: pcp.Request, raw: bytes) -> bytes | None:
        out = super().answer(req, raw)
        if out is not None and req.map is not None and req.lifetime and req.map.internal_port != DISCARD_PORT:
            out = pcp.encode_response(dataclasses.replace(pcp.decode_response(out), lifetime=self.life))
        return out


def test_renewals_are_never_less_than_4s_apart(tmp_path) -> None:
    """RFC 6887 §11.2.1 : a 1 s grant must not cause a renewal every second."""
    link = ShortGrant(1)
    iwf = make_iwf(tmp_path, link)

    async def body() -> None:
        await add(iwf, 8080)
        await asyncio.sleep(5.0)
        assert len(link.maps(8080)) <= 2  # the create, then at most one renewal after >= 4 s
    drive(iwf, body)


def test_zero_lifetime_success_is_not_a_mapping(tmp_path) -> None:
    link = ShortGrant(0)
    iwf = make_iwf(tmp_path, link)

    async def body() -> None:
        with pytest.raises(UPnPError) as exc:
            await add(iwf, 8080)
        assert exc.value.code == 501 and iwf.table.count() == 0 and link.unbound
    drive(iwf, body)


def test_renewal_heap_stays_bounded(tmp_path) -> None:
    link = ScriptedLink()
    iwf = make_iwf(tmp_path, link, mode="nat1-only")

    async def body() -> None:
        for _ in range(3000):  # refreshes reschedule the same mapping
            await add(iwf, 8080, lease=604800, igd=2)
        for _ in range(300):
            await add(iwf, 9000, lease=604800, igd=2)
            await upnp_igd.delete_port_mapping(iwf, LAN, 2, "", 9000, pcp.PROTO_TCP)
        assert len(iwf.timers.heap) <= 2 * len(iwf.timers.due) + 65
    drive(iwf, body)


class GrantsPcpPort(ScriptedLink):
    def answer(self, req: pcp.Request, raw: bytes) -> bytes | None:
        out = super().answer(req, raw)
        if out is not None and req.map is not None and req.lifetime and req.map.internal_port == 7000:
            out = regrant(out, external_port=5351)
        return out


def test_pcp_port_grant_is_deleted_upstream(tmp_path) -> None:
    """RFC 6887 §11.3: 5350/5351 are never mapped; nothing may stay on NAT2 either."""
    link = GrantsPcpPort()
    iwf = make_iwf(tmp_path, link)

    async def body() -> None:
        with pytest.raises(UPnPError) as exc:
            await upnp_igd.add_any_port_mapping(iwf, LAN, 2, "", 7000, pcp.PROTO_UDP, 7000, LAN, True, "x", 3600)
        assert exc.value.code == 501
        assert len([r for r in link.maps() if r.lifetime == 0]) == 1 and iwf.table.count() == 0
    drive(iwf, body)


class GoesSilent(ScriptedLink):
    def __init__(self) -> None:
        super().__init__()
        self.silent = False

    def answer(self, req: pcp.Request, raw: bytes) -> bytes | None:
        return None if self.silent else super().answer(req, raw)


def test_failed_refresh_keeps_the_mapping_as_it_was(tmp_path) -> None:
    link = GoesSilent()
    iwf = make_iwf(tmp_path, link, pcp_timeout=0.5)

    async def body() -> None:
        m = await add(iwf, 8080, lease=86400, igd=2, desc="orig")
        before = (m.lease, m.lease_end, m.description)
        link.silent = True
        with pytest.raises(UPnPError):
            await add(iwf, 8080, lease=60, igd=2, desc="changed")
        now = iwf.table.by_id[m.id]  # the row as stored after the failed refresh
        assert (now.lease, now.lease_end, now.description) == before
    drive(iwf, body)


def test_epoch_poll_turned_off_by_reload_does_not_spin(tmp_path) -> None:
    link = ScriptedLink()
    iwf = make_iwf(tmp_path, link, epoch_poll=0.5)

    async def body() -> None:
        await add(iwf, 8080)
        await asyncio.sleep(0.7)
        iwf.cfg = dataclasses.replace(iwf.cfg, epoch_poll=0.0)  # what a SIGHUP reload does
        before = sum(1 for _, r in link.sent if r.opcode == pcp.Opcode.ANNOUNCE)
        await asyncio.sleep(1.0)
        # Off means off: at most the one already under way (it was a flood of thousands a second).
        assert sum(1 for _, r in link.sent if r.opcode == pcp.Opcode.ANNOUNCE) - before <= 1
    drive(iwf, body)


def test_nearest_allowed_port_is_right_and_bounded(monkeypatch) -> None:
    p = Permissions.parse(["deny 8000-8010 0.0.0.0/0 0-65535", "allow 1024-65535 0.0.0.0/0 0-65535"])
    assert [p.nearest_allowed(x, "1.2.3.4", 80) for x in (8000, 8004, 8005, 8006, 7999, 0)] == \
        [7999, 7999, 8011, 8011, 7999, 1024]  # ties go up, as miniupnpd's walk
    many = Permissions.parse([f"allow {1024 + i}-{1024 + i} 192.168.1.{i}/32 1024-65535" for i in range(1, 200)]
                             + ["deny 0-65535 0.0.0.0/0 0-65535"])
    calls = 0
    real = Permissions.allowed

    def counted(self, *a):
        nonlocal calls
        calls += 1
        return real(self, *a)

    monkeypatch.setattr(Permissions, "allowed", counted)
    assert many.nearest_allowed(30000, "192.168.1.200", 8080) is None
    assert many.nearest_allowed(30000, "192.168.1.5", 8080) == 1029
    # One decision per segment between rule edges, not one per port (it was 64k per request).
    assert calls <= 2 * (2 * len(many.rules) + 3)
