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
    """Records requests; answers with ``replies`` or raises NatdError(``fail``); ``macs`` is its
    neighbour table, ``prefixes`` the LAN's IPv6 prefixes."""

    def __init__(self, fail: str = "") -> None:
        self.sent: list[wire.Message] = []
        self.fail = fail
        self.macs = {"10.0.0.2": "aa", LAN: "aa", "2001:db8:1::3": "bb"}
        self.prefixes = ["2001:db8:1::/64"]

    async def call(self, msg: wire.Message) -> wire.Message:
        self.sent.append(msg)
        if self.fail:
            raise NatdError(self.fail, "refused")
        if isinstance(msg, wire.SameHost):
            return wire.SameHostReply(msg.a in self.macs and self.macs[msg.a] == self.macs.get(msg.b))
        if isinstance(msg, wire.PinholeStatus):
            return wire.PinholeStatusReply(True, "own", list(self.prefixes), 0, 100, 10)
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
    assert run(backend.same_host(LAN, LAN)) and not any(isinstance(m, wire.SameHost) for m in natd.sent)


def test_same_host_asks_natds_neighbour_table_and_caches_the_answer_briefly() -> None:
    natd, now = FakeNatd(), [100.0]
    backend = NatdPinholeBackend(natd.call, clock=lambda: now[0])
    assert run(backend.same_host("10.0.0.2", LAN)) is True
    assert run(backend.same_host(LAN, "10.0.0.2")) is True  # either order: one cached pair
    assert run(backend.same_host("10.0.0.2", "2001:db8:1::3")) is False
    assert run(backend.same_host("2001:db8:1:0::2", "2001:db8:1::2")) is True  # one address, two spellings
    assert natd.sent == [wire.SameHost("10.0.0.2", LAN), wire.SameHost("10.0.0.2", "2001:db8:1::3")]
    natd.macs["2001:db8:1::3"] = "aa"  # the other address answered a solicitation meanwhile
    now[0] += 3  # a "no" is kept 2 s, a "yes" 10 s
    assert run(backend.same_host("10.0.0.2", "2001:db8:1::3")) is True and len(natd.sent) == 3
    del natd.macs[LAN]
    assert run(backend.same_host("10.0.0.2", LAN)) is True and len(natd.sent) == 3  # still cached
    now[0] += 10
    assert run(backend.same_host("10.0.0.2", LAN)) is False and len(natd.sent) == 4


def test_same_host_cache_is_bounded_and_natd_failures_are_unavailable_not_refusals(monkeypatch) -> None:
    from controld.core import pinhole_natd

    monkeypatch.setattr(pinhole_natd, "MAX_SAME_HOST", 8)
    natd = FakeNatd()
    backend = NatdPinholeBackend(natd.call)
    for i in range(50):
        run(backend.same_host("10.0.0.2", f"2001:db8:1::{i + 10:x}"))
    assert len(backend._same) <= 8
    assert run(backend.same_host("10.0.0.2", "not an address")) is False
    with pytest.raises(PinholeError) as err:
        run(NatdPinholeBackend(FakeNatd("timeout").call).same_host("10.0.0.2", LAN))
    assert err.value.kind is PinholeErrorKind.UNAVAILABLE
    assert run(NatdPinholeBackend(FakeNatd("bad-op").call).same_host("10.0.0.2", LAN)) is False  # an older natd


def test_secure_mode_lets_a_host_open_pinholes_to_its_own_ipv6_address_only() -> None:
    natd = FakeNatd()
    core = Pinholes(NatdPinholeBackend(natd.call))
    run(core.refresh())
    p = run(core.add("10.0.0.2", LAN, 8080, 6, "", 0, 600))
    assert p.owner == "10.0.0.2" and natd.sent[-1] == wire.PinholeAdd(wire.Pinhole(p.uid, 6, LAN, 8080, 600))
    with pytest.raises(PinholeError) as err:
        run(core.add("10.0.0.2", "2001:db8:1::3", 8080, 6, "", 0, 600))
    assert err.value.kind is PinholeErrorKind.NOT_AUTHORIZED
    run(core.delete(LAN, p.uid))  # the same host from its IPv6 address may close it
    assert core.rows == {}


def test_a_wan_event_re_reads_the_lan_prefixes_and_rows_off_them_go() -> None:
    natd = FakeNatd()
    backend = NatdPinholeBackend(natd.call)
    core = Pinholes(backend)
    resync = PinholeResync(backend, core)
    run(core.refresh())
    natd.macs["2001:db8:2::2"] = "aa"
    with pytest.raises(PinholeError):  # not in the LAN prefixes natd reports
        run(core.add("10.0.0.2", "2001:db8:2::2", 8080, 6, "", 0, 600))
    natd.prefixes.append("2001:db8:2::/64")  # natd learnt a new prefix; its event got lost
    p = run(core.add("10.0.0.2", "2001:db8:2::2", 8080, 6, "", 0, 600))  # a refusal re-reads the status first
    kept = run(core.add("10.0.0.2", LAN, 8081, 6, "", 0, 600))
    natd.prefixes.remove("2001:db8:2::/64")
    run(resync.on_natd_event(wire.WanChanged("100.64.0.2", "100.64.0.1")))
    assert core.status.lan_prefixes == ("2001:db8:1::/64",) and set(core.rows) == {kept.uid}
    assert p.uid not in core.rows


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
