"""PCP over IPv6 and MAP in IPv6 firewall mode (docs/lan-pcp.md "PCP over IPv6", docs/pinholes.md):
the sans-I/O decisions (controld/pcpserver/firewall.py, FILTER, the IPv6 checks of pcp.py), the
pinhole core's PCP operations (nonce ownership, re-lease, re-point, persistence), and the socket
edge on the IPv6 loopback. Time is passed in; nothing sleeps."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sqlite3

import pytest

from controld.core.pinhole import FirewallStatus, Pinhole, PinholeError, PinholeErrorKind, Pinholes
from controld.core.pinhole_store import PinholeStore
from controld.core.service import Iwf
from controld.pcpserver import firewall, pcp
from controld.pcpserver.epoch import Announcer, ServerEpoch
from controld.pcpserver.events import DeleteWanted, Done, Drop, MapWanted, Refused, Reply, remote_filter
from controld.pcpserver.server import LanPcpServer, LanServerConfig, lan6_hosts
from shared.pcp import Filter, Result
from tests.bed import pcp_client as pc
from tests.bed.iwf import ScriptedLink, run

HOST = "2001:db8:1::2"
OTHER = "2001:db8:1::99"
V6 = ipaddress.IPv6Address
SRC = V6(HOST)
INET6 = "2001:db8:20::10"
NONCE = bytes(range(12))
K = PinholeErrorKind


def handle(data: bytes, source: ipaddress.IPv4Address | ipaddress.IPv6Address = SRC) -> object:
    return pcp.handle_datagram(data, source, 40000, 77, pcp.ServerPolicy(peer=False))


def wanted_map(options: bytes = b"", lifetime: int = 600, port: int = 9000, **kw: object) -> MapWanted:
    ev = handle(pc.map_request(HOST, NONCE, 6, port, lifetime, options=options, **kw))  # type: ignore[arg-type]
    assert isinstance(ev, MapWanted), ev
    return ev


# --- the sans-I/O checks -------------------------------------------------------------------------


def test_map_over_ipv6_is_wanted_with_an_ipv6_internal_address_and_family_rfc6887_11_1() -> None:
    ev = wanted_map()
    assert (ev.internal_ip, ev.family, ev.requester.address, ev.requester.nonce) == (SRC, 6, SRC, NONCE)
    # the Client IP field must be the source (§8.2): another host's address is ADDRESS_MISMATCH
    out = handle(pc.map_request(OTHER, NONCE, 6, 9000, 600))
    assert isinstance(out, Reply) and pc.parse_pcp(out.payload).result == Result.ADDRESS_MISMATCH


@pytest.mark.parametrize("data", [pc.natpmp_address_request(), b"\x00\x05", pc.natpmp_map_request(2, 80, 80, 60)],
                         ids=["address", "unknown-opcode", "map"])
def test_natpmp_over_ipv6_is_dropped_before_decoding_rfc6886(data: bytes) -> None:
    assert isinstance(handle(data), Drop)
    assert not isinstance(handle(data, ipaddress.IPv4Address("192.168.1.2")), Drop)  # IPv4 still served


@pytest.mark.parametrize(("filters", "version", "remote"), [
    ((), 6, ""),
    ((Filter(0, 0, V6("::")),), 6, ""),  # prefix 0 clears (§13.3, erratum 3891)
    ((Filter(128, 0, V6(INET6)),), 6, INET6),
    ((Filter(64, 0, V6(INET6)),), 6, None),  # shorter prefix: refused, never widened
    ((Filter(128, 443, V6(INET6)),), 6, None),  # a remote port natd cannot keep
    ((Filter(128, 0, ipaddress.IPv4Address("198.20.0.10")),), 6, None),  # the other family
    ((Filter(128, 0, V6(INET6)), Filter(128, 0, V6("2001:db8:20::11"))), 6, None),  # two peers
    ((Filter(128, 0, ipaddress.IPv4Address("198.20.0.10")),), 4, "198.20.0.10"),
])
def test_filter_becomes_one_remote_host_or_excessive_remote_peers_rfc6887_13_3(filters, version, remote) -> None:
    assert remote_filter(filters, version) == remote


def test_pinhole_ask_clamps_the_lease_and_checks_prefer_failure_rfc6887_11_3() -> None:
    ask = firewall.pinhole_ask(wanted_map(lifetime=200000), 86400 * 2)
    assert isinstance(ask, firewall.PinholeAsk)
    assert (ask.owner, ask.nonce, ask.int_client, ask.int_port, ask.protocol, ask.remote_host, ask.lease) == \
        (HOST, NONCE, HOST, 9000, 6, "", 86400)
    ask = firewall.pinhole_ask(wanted_map(lifetime=7200), 600)
    assert isinstance(ask, firewall.PinholeAsk) and ask.lease == 600
    with_filter = firewall.pinhole_ask(wanted_map(pc.filter_option(128, 0, INET6)), 600)
    assert isinstance(with_filter, firewall.PinholeAsk) and with_filter.remote_host == INET6
    assert firewall.pinhole_ask(wanted_map(pc.filter_option(120, 0, INET6)), 600) == \
        Refused(Result.EXCESSIVE_REMOTE_PEERS)
    # external = internal: only that (or nothing) can be suggested with PREFER_FAILURE (§13.2)
    pf = pc.prefer_failure()
    assert isinstance(firewall.pinhole_ask(wanted_map(pf, suggested_port=9000, suggested_ip=HOST), 600),
                      firewall.PinholeAsk)
    cpe = Refused(Result.CANNOT_PROVIDE_EXTERNAL)
    assert firewall.pinhole_ask(wanted_map(pf, suggested_port=9001), 600) == cpe
    assert firewall.pinhole_ask(wanted_map(pf, suggested_port=9000, suggested_ip=OTHER), 600) == cpe
    assert firewall.pinhole_ask(wanted_map(pf, suggested_port=9000, suggested_ip="0.0.0.0"), 600) == cpe
    # without it a suggestion never fails the request (§11.3)
    assert isinstance(firewall.pinhole_ask(wanted_map(suggested_port=9001, suggested_ip="0.0.0.0"), 600),
                      firewall.PinholeAsk)


def test_every_pinhole_error_kind_has_a_pcp_result_and_a_missing_delete_succeeds() -> None:
    assert set(firewall.PINHOLE_RESULTS) == set(PinholeErrorKind)
    ev = wanted_map()
    delete = DeleteWanted(ev.requester, SRC, 6, 9000, 6)
    assert firewall.pinhole_refusal(delete, K.NO_SUCH_ENTRY) == Done()  # §15.1
    assert firewall.pinhole_refusal(ev, K.NO_SUCH_ENTRY) == Refused(Result.NOT_AUTHORIZED)
    assert firewall.pinhole_refusal(ev, K.NOT_AUTHORIZED, 42) == Refused(Result.NOT_AUTHORIZED, 42)
    assert firewall.pinhole_refusal(ev, K.FIREWALL_DISABLED) == Refused(Result.NOT_AUTHORIZED)
    assert firewall.pinhole_refusal(ev, K.QUOTA) == Refused(Result.NO_RESOURCES)
    assert firewall.pinhole_refusal(ev, K.UNAVAILABLE) == Refused(Result.NO_RESOURCES)
    assert firewall.pinhole_refusal(ev, K.INVALID) == Refused(Result.MALFORMED_REQUEST)


def test_granted_answer_says_external_is_internal_rfc6887_11_3() -> None:
    ev = wanted_map(pc.description("game"), lifetime=500)
    a = pc.parse_pcp(pcp.respond(ev, firewall.granted(ev, 500), 77))
    assert (a.result, a.nonce, str(a.external_ip), a.external_port, a.lifetime) == (0, NONCE, HOST, 9000, 500)
    assert (pc.OPT_DESCRIPTION, b"game") in a.options


def test_announcer_copies_to_ff02_1_only_with_ipv6_rfc6887_14_1_3() -> None:
    ann = Announcer(ServerEpoch(0.0), natpmp=False)
    ann.lose_state(0.0, None)
    assert {d.host for d in ann.on_timer(0.0)} == {"224.0.0.1"}
    ann.ipv6 = True
    assert {(d.host, d.port) for d in ann.on_timer(1.0)} == {("224.0.0.1", 5350), ("ff02::1", 5350)}


def test_bed_client_writes_an_ipv6_hosts_fields_rfc6887_5() -> None:
    raw = pc.map_request("fe80::2%eth0", NONCE, 6, 9000, 600)  # a link-local client, scope left out
    assert raw[8:24] == V6("fe80::2").packed and raw[44:60] == bytes(16)  # no preference: IPv6's ::
    assert pc.map_request("192.168.1.2", NONCE, 6, 9000, 600)[44:60] == bytes(10) + b"\xff\xff" + bytes(4)


def test_lan6_hosts_are_the_unicast_addresses_link_local_with_its_scope() -> None:
    assert lan6_hosts(["2001:db8:1::1", "fd00::1", "fe80::1", "ff02::1", "::1"], "br-lan") == \
        ["2001:db8:1::1", "fd00::1", "fe80::1%br-lan"]


# --- the pinhole core's PCP operations -----------------------------------------------------------


class Natd:
    """natd's pinhole side as the core sees it: its LAN prefixes and the elements it holds."""

    def __init__(self, prefixes: tuple[str, ...] = ("2001:db8:1::/64",)) -> None:
        self.prefixes = prefixes
        self.enabled = True
        self.open_: dict[int, tuple[Pinhole, int]] = {}

    async def status(self) -> FirewallStatus:
        return FirewallStatus(self.enabled, self.prefixes)

    async def open(self, p: Pinhole, lease: int) -> None:
        self.open_[p.uid] = (p, lease)

    async def close(self, uid: int) -> None:
        self.open_.pop(uid, None)

    async def packets(self, uid: int) -> int:
        return 0

    async def same_host(self, a: str, b: str) -> bool:
        return a == b


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pinholes(db: sqlite3.Connection | None = None) -> tuple[Pinholes, Natd, Clock]:
    b, clock = Natd(), Clock()
    core = Pinholes(b, clock=clock, store=PinholeStore(db, clock) if db is not None else None)
    asyncio.run(core.refresh())
    return core, b, clock


def _error(coro: object) -> PinholeError:
    with pytest.raises(PinholeError) as exc:
        asyncio.run(coro)  # type: ignore[arg-type]
    return exc.value


def test_lan_map_is_owned_by_address_and_nonce_releases_and_repoints_rfc6887_11_3() -> None:
    core, b, clock = _pinholes()
    p = asyncio.run(core.lan_map(HOST, NONCE, HOST, 9000, 6, "", 600))
    assert (p.uid, p.nonce, p.owner) == (1, NONCE, HOST) and b.open_[1] == (p, 600)
    clock.now += 100
    # another nonce, or another host, is NOT_AUTHORIZED with the remaining lease; a delete too
    err = _error(core.lan_map(HOST, b"x" * 12, HOST, 9000, 6, "", 600))
    assert (err.kind, err.lifetime) == (K.NOT_AUTHORIZED, 500)
    assert _error(core.lan_delete(HOST, b"x" * 12, HOST, 9000, 6)).lifetime == 500
    assert _error(core.lan_map(OTHER, NONCE, HOST, 9000, 6, "", 600)).kind == K.NOT_AUTHORIZED  # secure mode
    # the owner's MAP re-leases the same UniqueID, re-pointed at FILTER's remote host in one PinholeAdd
    again = asyncio.run(core.lan_map(HOST, NONCE, HOST, 9000, 6, INET6, 300))
    assert (again.uid, again.remote_host, again.nonce) == (1, INET6, NONCE) and b.open_[1] == (again, 300)
    assert len(core.rows) == 1
    asyncio.run(core.lan_delete(HOST, NONCE, HOST, 9000, 6))
    assert core.rows == {} and b.open_ == {}
    assert _error(core.lan_delete(HOST, NONCE, HOST, 9000, 6)).kind == K.NO_SUCH_ENTRY


def test_a_upnp_pinhole_on_the_tuple_is_someone_elses_to_pcp() -> None:
    core, _, _ = _pinholes()
    asyncio.run(core.add(HOST, HOST, 9000, 17, "", 0, 600))
    assert _error(core.lan_map(HOST, NONCE, HOST, 9000, 17, "", 600)).kind == K.NOT_AUTHORIZED
    assert _error(core.lan_delete(HOST, NONCE, HOST, 9000, 17)).kind == K.NOT_AUTHORIZED
    # the policy is the UPnP front end's: a privileged port or a non-LAN address is refused
    assert _error(core.lan_map(HOST, NONCE, HOST, 80, 6, "", 600)).kind == K.NOT_AUTHORIZED
    assert _error(core.lan_map("2001:db8:99::1", NONCE, "2001:db8:99::1", 9000, 6, "", 600)).kind == \
        K.NOT_AUTHORIZED


def test_the_nonce_is_stored_and_old_tables_gain_its_column(tmp_path) -> None:
    db = sqlite3.connect(str(tmp_path / "m.sqlite3"), isolation_level=None)
    db.execute("CREATE TABLE pinholes (uid INTEGER PRIMARY KEY, owner TEXT NOT NULL, int_client TEXT NOT NULL, "
               "int_port INTEGER NOT NULL, proto INTEGER NOT NULL, remote_host TEXT NOT NULL, remote_port INTEGER "
               "NOT NULL, lease INTEGER NOT NULL, expires REAL NOT NULL)")
    core, _, _ = _pinholes(db)
    asyncio.run(core.lan_map(HOST, NONCE, HOST, 9000, 6, "", 600))
    again, _, _ = _pinholes(db)
    assert [p.nonce for p in again.rows.values()] == [NONCE]
    asyncio.run(again.lan_map(HOST, NONCE, HOST, 9000, 6, "", 600))  # the restarted core knows its owner
    assert _error(again.lan_map(HOST, b"y" * 12, HOST, 9000, 6, "", 600)).kind == K.NOT_AUTHORIZED


# --- the socket edge on the IPv6 loopback --------------------------------------------------------


def test_edge_serves_pcp_on_an_ipv6_socket_and_maps_to_pinholes(tmp_path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        b = Natd(("::1/128",))
        pinholes = Pinholes(b)
        await pinholes.refresh()
        server = LanPcpServer(iwf, LanServerConfig(pcp.ServerPolicy(peer=False), rate=100, burst=100,
                                                   max_lifetime=600), pinholes=pinholes)
        try:
            await server.listen6(["::1"], "lo", 0)
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback: {exc}")
        port = server.v6["::1"].port

        async def ask(payload: bytes) -> bytes | None:
            # the bed's client (a connected IPv6 socket) off the loop, which serves the answer meanwhile
            return await asyncio.get_running_loop().run_in_executor(None, pc.exchange, "::1", payload, port, 1.0, 1)

        try:
            m = pc.parse_pcp(await ask(pc.map_request("::1", NONCE, 6, 9000, 7200)) or b"")
            assert (m.result, str(m.external_ip), m.external_port, m.lifetime) == (0, "::1", 9000, 600)
            [p] = pinholes.rows.values()
            assert (p.int_client, p.nonce, b.open_[p.uid][1]) == ("::1", NONCE, 600)
            theft = pc.parse_pcp(await ask(pc.map_request("::1", b"z" * 12, 6, 9000, 0)) or b"")
            assert theft.result == Result.NOT_AUTHORIZED and 0 < theft.lifetime <= 600
            gone = pc.parse_pcp(await ask(pc.map_request("::1", NONCE, 6, 9000, 0)) or b"")
            assert (gone.result, gone.lifetime) == (0, 0) and pinholes.rows == {}
            assert await ask(pc.natpmp_address_request()) is None  # NAT-PMP is IPv4 only
            assert server.announcer.ipv6
            await server.listen6([], "lo", 0)  # the address went away: its socket closes
            assert server.v6 == {} and not server.announcer.ipv6
        finally:
            server.close()
    run(tmp_path, body, mode="nat1-only")


def test_lan_map_asks_natd_again_for_an_address_outside_the_known_prefixes() -> None:
    core, b, _ = _pinholes()
    core.status = FirewallStatus(True, ("2001:db8:2::/64",))  # what natd said before the prefix changed
    p = asyncio.run(core.lan_map(HOST, NONCE, HOST, 9000, 6, "", 600))
    assert p.uid in b.open_ and core.status.lan_prefixes == ("2001:db8:1::/64",)
    core.status = FirewallStatus(False)  # natd did not answer at our start
    assert asyncio.run(core.lan_map(HOST, NONCE, HOST, 9001, 6, "", 600)).uid in b.open_
    b.enabled = False  # natd's firewall is off: FirewallDisabled, nothing opened
    core.status = FirewallStatus(False)
    assert _error(core.lan_map(HOST, NONCE, HOST, 9002, 6, "", 600)).kind == K.FIREWALL_DISABLED
    assert len(b.open_) == 2
