"""controld's pinhole backend over natd's wire API: requests sent, natd's refusals mapped."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from controld.core.pinhole import Pinhole, PinholeError, PinholeErrorKind, Pinholes
from controld.core.pinhole_natd import NatdPinholeBackend, PinholeResync
from controld.natd_link import NatdError
from shared import wire

LAN = "2001:db8:1::2"
T = TypeVar("T")


class FakeNatd:
    """Records requests; answers with ``replies`` or raises NatdError(``fail``)."""

    def __init__(self, fail: str = "") -> None:
        self.sent: list[wire.Message] = []
        self.fail = fail

    async def call(self, msg: wire.Message) -> wire.Message:
        self.sent.append(msg)
        if self.fail:
            raise NatdError(self.fail, "refused")
        if isinstance(msg, wire.PinholeStatus):
            return wire.PinholeStatusReply(True, "own", ["2001:db8:1::/64"], 0, 100, 10)
        if isinstance(msg, wire.PinholeCounters):
            return wire.PinholeCountersReply([3, 7], [5, 9])
        if isinstance(msg, wire.PinholeSync):
            return wire.SyncReply(len(msg.pinholes), 0)
        return wire.PinholeReply(1, 660) if isinstance(msg, wire.PinholeAdd) else wire.Ok()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.mark.parametrize(("code", "kind"), [
    ("pinholes-off", PinholeErrorKind.FIREWALL_DISABLED), ("not-lan", PinholeErrorKind.NOT_AUTHORIZED),
    ("quota", PinholeErrorKind.QUOTA), ("bad-remote", PinholeErrorKind.INVALID),
    ("bad-field", PinholeErrorKind.INVALID), ("duplicate", PinholeErrorKind.NOT_AUTHORIZED),
    ("failed", PinholeErrorKind.UNAVAILABLE), ("timeout", PinholeErrorKind.UNAVAILABLE)])
def test_natd_refusals_become_pinhole_error_kinds(code: str, kind: PinholeErrorKind) -> None:
    backend = NatdPinholeBackend(FakeNatd(code).call)
    p = Pinhole(1, "10.0.0.2", LAN, 8080, 6, "", 0, 600, 600.0)
    with pytest.raises(PinholeError) as err:
        run(backend.open(p, 600))
    assert err.value.kind is kind


def test_open_sends_pinhole_add_without_the_remote_port_and_reads_counters() -> None:
    natd = FakeNatd()
    backend = NatdPinholeBackend(natd.call)
    run(backend.open(Pinhole(3, "10.0.0.2", LAN, 8080, 17, "2001:db8:20::10", 4000, 600, 600.0), 300))
    assert natd.sent == [wire.PinholeAdd(wire.Pinhole(3, 17, LAN, 8080, 300, "2001:db8:20::10"))]
    assert run(backend.packets(7)) == 9 and run(backend.packets(4)) == 0
    status = run(backend.status())
    assert status.enabled and status.lan_prefixes == ("2001:db8:1::/64",)
    assert run(backend.same_host("10.0.0.2", LAN)) is False and run(backend.same_host(LAN, LAN))


def test_resync_sends_live_rows_with_remaining_lease_on_a_new_boot_or_restore() -> None:
    natd = FakeNatd()
    now = [1000.0]
    backend = NatdPinholeBackend(natd.call)
    core = Pinholes(backend, clock=lambda: now[0])
    core.rows = {2: Pinhole(2, LAN, LAN, 9000, 6, "", 0, 600, 1400.0),
                 5: Pinhole(5, LAN, LAN, 9001, 6, "", 0, 600, 900.0)}  # expired
    resync = PinholeResync(backend, core)
    resync.boot = "a"
    run(resync.on_natd_event(wire.Heartbeat("a", 0)))
    assert natd.sent == []  # same boot: nothing
    run(resync.on_natd_event(wire.Heartbeat("b", 0)))
    assert natd.sent[-1] == wire.PinholeSync([wire.Pinhole(2, 6, LAN, 9000, 400)]) and resync.boot == "b"
    run(resync.on_natd_event(wire.Restored("b", "flush", 0)))
    assert isinstance(natd.sent[-1], wire.PinholeSync) and len(natd.sent) == 4  # status + sync twice
