"""The pinhole core (controld/core/pinhole.py) and its UPnP front end (WANIPv6FirewallControl:1)
against a fake natd backend: policy, UniqueID ownership, leases, error codes; then the same
actions over HTTP/SOAP on loopback with the real upnpc -A / -D (docs/upnp.md "IPv6 pinholes")."""

from __future__ import annotations

import asyncio
import re
import shutil
import xml.etree.ElementTree as ET
from types import SimpleNamespace
from typing import cast

import pytest

from controld.core.pinhole import (
    MAX_LEASE,
    FirewallStatus,
    NoFirewall,
    Pinhole,
    PinholeError,
    PinholeErrorKind,
    PinholePolicy,
    Pinholes,
    outbound_timeout,
)
from controld.core.service import Iwf
from controld.core.stats import Stats
from controld.upnp import soap
from controld.upnp.description import gateway
from controld.upnp.http import UpnpHttpServer
from controld.upnp.igd import IgdActions

HOST = "2001:db8:1::2"
OTHER = "2001:db8:1::99"
HOST4 = "127.0.0.1"  # the same host's IPv4 address (the fake neighbour table says so)
FW = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
K = PinholeErrorKind


class FakeBackend:
    """natd as the core sees it: one LAN prefix, counters, a neighbour table by MAC."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.open_: dict[int, tuple[Pinhole, int]] = {}
        self.counters: dict[int, int] = {}
        self.mac = {HOST: "aa", HOST4: "aa", OTHER: "bb"}

    async def status(self) -> FirewallStatus:
        return FirewallStatus(self.enabled, ("2001:db8:1::/64",))

    async def open(self, p: Pinhole, lease: int) -> None:
        self.open_[p.uid] = (p, lease)

    async def close(self, uid: int) -> None:
        self.open_.pop(uid, None)

    async def packets(self, uid: int) -> int:
        return self.counters.get(uid, 0)

    async def same_host(self, a: str, b: str) -> bool:
        return a == b or (a in self.mac and self.mac.get(a) == self.mac.get(b))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _core(backend: FakeBackend | None = None, ipv4: int = 0, **policy: object) -> tuple[Pinholes, FakeBackend, Clock]:
    b = backend or FakeBackend()
    clock = Clock()
    core = Pinholes(b, PinholePolicy(**policy), lambda ip: ipv4, lambda: ipv4, clock)  # type: ignore[arg-type]
    asyncio.run(core.refresh())
    return core, b, clock


def _kind(coro: object) -> PinholeErrorKind:
    with pytest.raises(PinholeError) as exc:
        asyncio.run(coro)  # type: ignore[arg-type]
    return exc.value.kind


def _rebuilt(core: Pinholes) -> tuple[dict, dict, dict]:
    """The indexes as a walk over every row gives them (what they must equal at all times)."""
    by_tuple: dict = {}
    by_owner: dict = {}
    for p in core.rows.values():
        by_tuple.setdefault((p.int_client, p.int_port, p.proto), set()).add(p.uid)
        by_owner.setdefault(p.owner, set()).add(p.uid)
    return {p.key(): p.uid for p in core.rows.values()}, by_tuple, by_owner


def test_indexes_follow_every_change_and_the_expiry_heap_stays_bounded() -> None:
    """Add, re-lease, delete and expiry keep the lookups O(1) and equal to a walk of the table."""
    core, b, clock = _core(max_per_host=0, max_total=0)
    made: list[Pinhole] = [asyncio.run(core.add(HOST, HOST, 2000 + i, 6, "", 0, 100 + i)) for i in range(50)]
    asyncio.run(core.delete(HOST, made[3].uid))
    for _ in range(2000):  # renewals leave stale heap entries behind
        asyncio.run(core.update(HOST, made[0].uid, 3600))
    assert len(core._expiry) <= 4 * len(core.rows) + 64
    clock.now += 120  # the first forty-odd leases end
    core.expire()
    assert (core._by_key, core._by_tuple, core._by_owner) == _rebuilt(core)
    assert set(core.rows) == {made[0].uid} | {made[i].uid for i in range(21, 50)}  # lease 100 + i > 120
    assert core.count_of(HOST) == 30 and made[3].uid not in b.open_


def test_add_update_delete_with_ownership_and_one_uid_per_hole() -> None:
    core, b, clock = _core()
    p = asyncio.run(core.add(HOST, HOST, 8080, 6, "", 0, 3600))
    assert p.uid == 1 and b.open_[1] == (p, 3600)
    # the same hole asked again by the same host (from its IPv4 address): re-leased, same UniqueID
    again = asyncio.run(core.add(HOST4, "2001:db8:1:0::2", 8080, 6, "*", 0, 600))
    assert again.uid == 1 and b.open_[1][1] == 600 and len(core.rows) == 1
    # another host may neither see, nor re-lease, nor delete it
    assert _kind(core.update(OTHER, 1, 100)) == K.NOT_AUTHORIZED
    assert _kind(core.delete(OTHER, 1)) == K.NOT_AUTHORIZED
    assert _kind(core.packets(OTHER, 1)) == K.NOT_AUTHORIZED
    assert _kind(core.add(OTHER, HOST, 8080, 6, "", 0, 60)) == K.NOT_AUTHORIZED
    assert _kind(core.working(HOST, 1)) == K.NO_TRAFFIC
    b.counters[1] = 3
    assert asyncio.run(core.working(HOST, 1)) and asyncio.run(core.packets(HOST, 1)) == 3
    asyncio.run(core.update(HOST, 1, 7200))
    assert b.open_[1][1] == 7200 and core.remaining(core.rows[1]) == 7200
    asyncio.run(core.delete(HOST, 1))
    assert b.open_ == {} and _kind(core.delete(HOST, 1)) == K.NO_SUCH_ENTRY
    # a different remote host is a different hole, with its own UniqueID
    q = asyncio.run(core.add(HOST, HOST, 8080, 17, "2001:db8:20::10", 0, 60))
    r = asyncio.run(core.add(HOST, HOST, 8080, 17, "", 0, 60))
    assert q.uid != r.uid and q.remote_host == "2001:db8:20::10"
    clock.now += 61
    assert core.expire() == 2 and core.rows == {}


@pytest.mark.parametrize(("args", "kind"), [
    ((HOST, 8080, 65535, "", 0, 60), K.PROTOCOL_WILDCARD),
    ((HOST, 8080, 1, "", 0, 60), K.PROTOCOL),
    ((HOST, 0, 6, "", 0, 60), K.PORT_WILDCARD),
    (("", 8080, 6, "", 0, 60), K.CLIENT_WILDCARD),
    (("*", 8080, 6, "", 0, 60), K.CLIENT_WILDCARD),
    ((HOST, 8080, 6, "", 0, 0), K.INVALID),
    ((HOST, 8080, 6, "", 0, MAX_LEASE + 1), K.INVALID),
    (("192.168.1.2", 8080, 6, "", 0, 60), K.INVALID),
    ((HOST, 8080, 6, "not-an-address", 0, 60), K.INVALID),
    (("2001:db8:2::2", 8080, 6, "", 0, 60), K.NOT_AUTHORIZED),  # outside the LAN prefix
    ((OTHER, 8080, 6, "", 0, 60), K.NOT_AUTHORIZED),  # secure mode: another host
    ((HOST, 80, 6, "", 0, 60), K.NOT_AUTHORIZED),  # a privileged port, as miniupnpd
])
def test_refusals(args: tuple[str, int, int, str, int, int], kind: PinholeErrorKind) -> None:
    core, b, _ = _core()
    assert _kind(core.add(HOST, *args)) == kind
    assert b.open_ == {}


def test_switched_off_disabled_quota_shared_with_ipv4() -> None:
    assert _kind(_core(allowed=False)[0].add(HOST, HOST, 8080, 6, "", 0, 60)) == K.NOT_ALLOWED
    assert _kind(_core(FakeBackend(enabled=False))[0].add(HOST, HOST, 8080, 6, "", 0, 60)) == K.FIREWALL_DISABLED
    off = Pinholes(NoFirewall())
    asyncio.run(off.refresh())
    assert not off.firewall_enabled() and _kind(off.add(HOST, HOST, 8080, 6, "", 0, 60)) == K.FIREWALL_DISABLED
    # secure mode off: a host may open a pinhole to another LAN address
    assert asyncio.run(_core(secure_mode=False)[0].add(HOST, OTHER, 8080, 6, "", 0, 60)).owner == HOST
    # two IPv4 mappings + one pinhole fill a per-host quota of 3
    core, _, _ = _core(ipv4=2, max_per_host=3, max_total=0)
    asyncio.run(core.add(HOST, HOST, 8080, 6, "", 0, 60))
    assert _kind(core.add(HOST, HOST, 8081, 6, "", 0, 60)) == K.QUOTA
    core, _, _ = _core(ipv4=4, max_per_host=0, max_total=4)
    assert _kind(core.add(HOST, HOST, 8080, 6, "", 0, 60)) == K.QUOTA


def test_status_and_policy_changes_are_evented() -> None:
    b = FakeBackend(enabled=False)
    core, _, _ = _core(b)
    seen: list[tuple[bool, bool]] = []
    core.on_change = lambda: seen.append((core.firewall_enabled(), core.inbound_allowed()))
    b.enabled = True
    asyncio.run(core.refresh())
    asyncio.run(core.refresh())  # no change, no event
    core.set_policy(PinholePolicy(allowed=False))
    assert seen == [(True, True), (True, False)]


def test_outbound_timeout_from_conntrack_or_its_default() -> None:
    assert outbound_timeout(17, lambda path: "180\n") == 180
    assert outbound_timeout(6, lambda path: "x") == 432000
    with pytest.raises(PinholeError):
        outbound_timeout(47)


# --- over HTTP/SOAP on loopback -------------------------------------------------------------

def _envelope(action: str, args: dict[str, str]) -> bytes:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in args.items())
    return (f'<?xml version="1.0"?><s:Envelope xmlns:s="{soap.SOAP_ENV}"><s:Body>'
            f'<u:{action} xmlns:u="{FW}">{inner}</u:{action}></s:Body></s:Envelope>').encode()


async def _post(port: int, action: str, args: dict[str, str]) -> tuple[int, dict[str, str]]:
    body = _envelope(action, args)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"POST /igd2/ctl/IP6FCtl HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f'SOAPACTION: "{FW}#{action}"\r\nContent-Length: {len(body)}\r\n\r\n').encode() + body)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    status = int(raw.split(b" ", 2)[1])
    root = ET.fromstring(raw.partition(b"\r\n\r\n")[2])
    return status, {el.tag.rpartition("}")[2]: (el.text or "") for el in root.iter() if len(el) == 0}


async def _serve(backend: FakeBackend | NoFirewall, test: object) -> None:
    core = Pinholes(backend)
    await core.refresh()
    gw = gateway("both", lambda k: k)
    no_core = cast(Iwf, SimpleNamespace(stats=Stats()))  # the pinhole actions need only the counters
    server = UpnpHttpServer(gw, IgdActions(no_core, gw, core), lambda: ["127.0.0.0/8"])
    port = await server.start("127.0.0.1", 0)
    try:
        await test(port)  # type: ignore[operator]
    finally:
        server.close()


ADD = {"RemoteHost": "", "RemotePort": "0", "InternalClient": HOST, "InternalPort": "8080", "Protocol": "6",
       "LeaseTime": "3600"}


def test_soap_actions_and_error_codes() -> None:
    b = FakeBackend()

    async def test(port: int) -> None:
        assert await _post(port, "GetFirewallStatus", {}) == (
            200, {"FirewallEnabled": "1", "InboundPinholeAllowed": "1"})
        status, out = await _post(port, "AddPinhole", ADD)
        assert status == 200 and out["UniqueID"] == "1"
        codes = {}
        for name, change in {"707": {"Protocol": "65535"}, "705": {"Protocol": "47"},
                             "706": {"InternalPort": "0"}, "708": {"InternalClient": ""},
                             "606": {"InternalClient": OTHER}, "402": {"LeaseTime": "86401"}}.items():
            codes[name] = (await _post(port, "AddPinhole", {**ADD, **change}))[1].get("errorCode")
        assert codes == {c: c for c in codes}
        assert (await _post(port, "AddPinhole", {k: v for k, v in ADD.items() if k != "LeaseTime"}))[1][
            "errorCode"] == "402"
        assert (await _post(port, "CheckPinholeWorking", {"UniqueID": "1"}))[1]["errorCode"] == "709"
        b.counters[1] = 5
        assert (await _post(port, "GetPinholePackets", {"UniqueID": "1"}))[1]["PinholePackets"] == "5"
        assert (await _post(port, "CheckPinholeWorking", {"UniqueID": "1"}))[1]["IsWorking"] == "1"
        assert (await _post(port, "UpdatePinhole", {"UniqueID": "1", "NewLeaseTime": "60"}))[0] == 200
        assert b.open_[1][1] == 60
        assert (await _post(port, "UpdatePinhole", {"UniqueID": "9", "NewLeaseTime": "60"}))[1][
            "errorCode"] == "704"
        timeout = await _post(port, "GetOutboundPinholeTimeout", {**ADD, "Protocol": "17"})
        assert timeout[0] == 200 and int(timeout[1]["OutboundPinholeTimeout"]) > 0
        # async-upnp-client writes the wildcard remote host as "::": the same pinhole
        assert (await _post(port, "AddPinhole", {**ADD, "RemoteHost": "::"}))[1]["UniqueID"] == "1"
        assert (await _post(port, "DeletePinhole", {"UniqueID": "1"}))[0] == 200
        assert (await _post(port, "DeletePinhole", {"UniqueID": "1"}))[1]["errorCode"] == "704"

    asyncio.run(_serve(b, test))


def test_soap_without_natd_pinholes_is_firewall_disabled() -> None:
    async def test(port: int) -> None:
        assert await _post(port, "GetFirewallStatus", {}) == (
            200, {"FirewallEnabled": "0", "InboundPinholeAllowed": "0"})
        assert (await _post(port, "AddPinhole", ADD))[1]["errorCode"] == "702"
        assert (await _post(port, "GetOutboundPinholeTimeout", ADD))[1]["errorCode"] == "702"
        assert (await _post(port, "DeletePinhole", {"UniqueID": "1"}))[1]["errorCode"] == "704"

    asyncio.run(_serve(NoFirewall(), test))


@pytest.mark.skipif(shutil.which("upnpc") is None, reason="miniupnpc's upnpc is installed by scripts/setup")
def test_upnpc_add_and_delete_pinhole() -> None:
    b = FakeBackend()

    async def upnpc(port: int, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "upnpc", "-u", f"http://127.0.0.1:{port}/igd2/rootDesc.xml", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        return out.decode()

    async def test(port: int) -> None:
        added = await upnpc(port, "-A", "empty", "0", HOST, "8080", "TCP", "600")
        uid = re.search(r"Pinhole ID = (\d+)", added)
        assert uid, added
        p, lease = b.open_[int(uid[1])]
        assert (p.int_client, p.int_port, p.proto, p.remote_host, lease) == (HOST, 8080, 6, "", 600)
        assert p.owner == HOST4  # upnpc spoke IPv4; the neighbour table ties it to HOST
        deleted = await upnpc(port, "-D", uid[1])
        assert "failed" not in deleted.lower(), deleted
        assert b.open_ == {}
        refused = await upnpc(port, "-A", "empty", "0", OTHER, "8080", "TCP", "600")
        assert "606" in refused, refused

    asyncio.run(_serve(b, test))


def test_ipv4_mapping_quota_counts_the_hosts_pinholes() -> None:
    from controld.core.model import CoreError
    from controld.core.policy import Policy

    core, _, _ = _core()
    asyncio.run(core.add(HOST4, HOST, 8080, 6, "", 0, 60))  # opened over IPv4 by the host
    policy = Policy(max_per_host=2, max_total=0, pinholes_of=core.count_of, pinholes_total=lambda: len(core.rows))
    policy.check_quota(HOST4, 0, 0)  # one pinhole + no mapping: room for one more
    with pytest.raises(CoreError):
        policy.check_quota(HOST4, 1, 1)  # one pinhole + one mapping: full
    policy.check_quota("192.168.1.50", 1, 1)  # another host's quota is its own


def test_rows_survive_a_restart_in_sqlite_with_their_remaining_lease(tmp_path) -> None:
    import sqlite3

    from controld.core.pinhole_store import PinholeStore

    db = sqlite3.connect(tmp_path / "m.sqlite3", isolation_level=None)
    clock, wall = Clock(), [5000.0]
    b = FakeBackend()
    store = PinholeStore(db, clock, lambda: wall[0])
    writes: list[int] = []
    store.on_write = lambda: writes.append(1)  # controld's QuietTrim (its WAL checkpoint) counts them
    core = Pinholes(b, clock=clock, store=store)
    asyncio.run(core.refresh())
    keep = asyncio.run(core.add(HOST, HOST, 8080, 6, "", 0, 600))
    gone = asyncio.run(core.add(HOST, HOST, 8081, 6, "", 0, 60))
    short = asyncio.run(core.add(HOST, HOST, 8082, 6, "", 0, 100))
    asyncio.run(core.delete(HOST, gone.uid))
    assert len(writes) == 4  # three rows written, one deleted
    # a restart 50 s later, on a new monotonic clock: the same rows, their remaining leases
    clock2, wall[0] = Clock(), 5050.0
    clock2.now = 7.0
    again = Pinholes(b, clock=clock2, store=PinholeStore(db, clock2, lambda: wall[0]))
    assert sorted(again.rows) == [keep.uid, short.uid]
    assert again.remaining(again.rows[keep.uid]) == 550 and again.rows[keep.uid].owner == HOST
    # a later restart past the short lease: that row is gone from disk too
    wall[0] = 5200.0
    third = Pinholes(b, clock=clock2, store=PinholeStore(db, clock2, lambda: wall[0]))
    assert sorted(third.rows) == [keep.uid]
    assert db.execute("SELECT COUNT(*) FROM pinholes").fetchone()[0] == 1


def test_permission_rules_apply_per_address_family() -> None:
    from controld.core.policy import Permissions, RuleError, parse_rule

    assert str(parse_rule("allow 1024-65535 2001:db8:1::5/64 1024-65535")) == \
        "allow 1024-65535 2001:db8:1::/64 1024-65535"
    with pytest.raises(RuleError):
        parse_rule("allow 1 2001:db8::/129 1")
    ipv4_only = Permissions.parse(["allow 1024-65535 192.168.1.0/24 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535"])
    core, _, _ = _core(permissions=ipv4_only)  # miniupnpd's shipped IPv4 rules do not decide pinholes
    assert asyncio.run(core.add(HOST, HOST, 8080, 6, "", 0, 60)).uid == 1
    both = Permissions.parse(["allow 8000-8999 2001:db8:1::/64 8000-8999", "deny 0-65535 ::/0 0-65535",
                              "allow 1024-65535 192.168.1.0/24 1024-65535"])
    core, _, _ = _core(permissions=both)
    assert asyncio.run(core.add(HOST, HOST, 8080, 6, "", 0, 60)).uid == 1
    assert _kind(core.add(HOST, HOST, 9090, 6, "", 0, 60)) == K.NOT_AUTHORIZED
    # IPv6 rules never decide an IPv4 mapping
    assert both.allowed(9090, "192.168.1.2", 9090) and not both.allowed(80, "192.168.1.2", 80)
    assert Permissions.parse(["deny 0-65535 ::/0 0-65535"]).allowed(9090, "192.168.1.2", 9090)
