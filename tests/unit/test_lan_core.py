"""The core's LAN PCP/NAT-PMP operations and the socket edge, with natd scripted
(tests/bed/fake_pcp.py answers upstream as NAT2 would): docs/lan-pcp.md, "What the wiring
needs from the core"."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sqlite3
from collections.abc import Awaitable, Callable

import pytest

from controld.core.model import CoreError, CreateRequest, ErrorKind, FrontEnd, NotOwner, Origin, upnp
from controld.core.service import Iwf
from controld.core.store import MappingTable
from controld.pcpserver.pcp import ServerPolicy
from controld.pcpserver.server import LanPcpServer, LanServerConfig
from shared import wire
from tests.bed import pcp_client as pc
from tests.bed.iwf import ScriptedLink, make_iwf

LAN = "192.168.1.2"
OTHER = "192.168.1.3"
SERVER = "100.64.0.1"
NONCE = bytes(range(12))


def run(tmp_path, body: Callable[[Iwf, ScriptedLink], Awaitable[None]], mode: str = "cascaded") -> None:
    async def main() -> None:
        link = ScriptedLink()
        iwf = make_iwf(tmp_path, link, mode=mode)
        await iwf.start()
        try:
            await body(iwf, link)
        finally:
            await iwf.stop()
            iwf.table.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def pcp_origin(nonce: bytes = NONCE, client: str = LAN) -> Origin:
    return Origin(FrontEnd.PCP, client, 1, nonce)


def req(port: int, lifetime: int = 3600, exact: bool = False, proto: int = 6) -> CreateRequest:
    return CreateRequest(proto, port, LAN, port, lifetime, "lan", exact)


def test_cascaded_grant_is_nat2s_address_port_and_lifetime_nonce_passed_up_rfc7648(tmp_path) -> None:
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        g = await iwf.lan_map(pcp_origin(), req(5000))
        (up,) = link.maps()
        assert up.map is not None and up.map.nonce == NONCE  # the client's nonce goes upstream unchanged
        assert g.ext_ip == "198.20.0.1" and g.ext_port == up.map.external_port
        assert 0 < g.lifetime <= 120  # FakePcp grants at most 120 s: never above NAT2's
        assert g.mapping.origin == "pcp" and iwf.table.listed() == [g.mapping]
        again = await iwf.lan_map(pcp_origin(), req(5000))
        assert again.mapping.id == g.mapping.id and again.ext_port == g.ext_port  # refresh, §11.3
    run(tmp_path, body)


def test_no_nat1_maps_with_third_party_upstream(tmp_path) -> None:
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        await iwf.lan_map(Origin(FrontEnd.NATPMP, LAN), req(5001))
        (up,) = link.maps()
        assert up.options.third_party == ipaddress.IPv4Address(LAN)
    run(tmp_path, body, mode="no-nat1")


def test_ownership_nonce_and_natpmp_delete_all(tmp_path) -> None:
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        p = await iwf.lan_map(pcp_origin(), req(6000))
        with pytest.raises(NotOwner) as exc:  # another nonce: NOT_AUTHORIZED, remaining lifetime (§11.3)
            await iwf.lan_map(pcp_origin(bytes(12)), req(6000))
        assert exc.value.kind == ErrorKind.NOT_AUTHORIZED and 0 < exc.value.lifetime <= 3600
        with pytest.raises(NotOwner):
            await iwf.lan_delete(pcp_origin(bytes(12)), 6, LAN, 6000)
        with pytest.raises(NotOwner):  # a NAT-PMP client cannot touch a PCP mapping
            await iwf.lan_delete(Origin(FrontEnd.NATPMP, LAN), 6, LAN, 6000)
        u = await iwf.create(upnp(LAN), CreateRequest(6, 7000, LAN, 7000, 0, "upnp", True))
        n1 = await iwf.lan_map(Origin(FrontEnd.NATPMP, LAN), req(6001))
        n2 = await iwf.lan_map(Origin(FrontEnd.NATPMP, LAN), req(6002, proto=17))
        assert await iwf.lan_delete_all(Origin(FrontEnd.NATPMP, LAN), 6) == 1  # RFC 6886 §3.4: its own, that proto
        ids = {m.id for m in iwf.table.listed()}
        assert ids == {p.mapping.id, u.id, n2.mapping.id} and n1.mapping.id not in ids
        with pytest.raises(CoreError) as gone:
            await iwf.lan_delete(pcp_origin(), 6, LAN, 6999)
        assert gone.value.kind == ErrorKind.NOT_FOUND
        await iwf.lan_delete(pcp_origin(), 6, LAN, 6000)
        with pytest.raises(CoreError) as taken:  # UPnP's port, exactly: CONFLICT (PREFER_FAILURE)
            await iwf.lan_map(pcp_origin(client=OTHER), CreateRequest(6, 7000, OTHER, 7000, 60, "", True))
        assert taken.value.kind == ErrorKind.CONFLICT
    run(tmp_path, body)


def test_state_loss_event_on_wan_change_and_restored_flag(tmp_path) -> None:
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        heard: list[str] = []
        iwf.watch_state_loss(heard.append)
        assert iwf.restored_all
        await iwf.on_natd_event(wire.WanChanged("100.64.0.9", SERVER))
        assert heard and "100.64.0.9" in heard[0]
        for _ in range(50):  # bounded: let the re-decision it started finish before the loop closes
            await asyncio.sleep(0.02)
    run(tmp_path, body)


def test_old_tables_gain_the_origin_column(tmp_path) -> None:
    db = sqlite3.connect(str(tmp_path / "mappings.sqlite3"))
    db.execute("CREATE TABLE mappings (id INTEGER PRIMARY KEY, cp TEXT NOT NULL, igd INTEGER NOT NULL, "
               "remote_host TEXT NOT NULL, ext_port INTEGER NOT NULL, proto INTEGER NOT NULL, int_client TEXT "
               "NOT NULL, int_port INTEGER NOT NULL, description TEXT NOT NULL, lease INTEGER NOT NULL, lease_end "
               "REAL, state TEXT NOT NULL, created REAL NOT NULL, nat1_port INTEGER, nonce BLOB, pcp_server TEXT, "
               "ext_ip TEXT, pcp_lifetime INTEGER, pcp_expiry REAL, prefer_failure INTEGER NOT NULL, "
               "mode TEXT NOT NULL)")
    db.execute("INSERT INTO mappings VALUES (1, ?, 1, '', 8080, 6, ?, 80, 'x', 0, NULL, 'active', 0, NULL, NULL, "
               "NULL, NULL, NULL, NULL, 1, 'nat1-only')", (LAN, LAN))
    db.commit()
    db.close()
    table = MappingTable(str(tmp_path))
    assert table.by_id[1].origin == "upnp"
    table.close()


def test_socket_edge_answers_natpmp_and_pcp_and_rate_limits(tmp_path) -> None:
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        loop = asyncio.get_running_loop()
        server = LanPcpServer(iwf, LanServerConfig(ServerPolicy(peer=False), rate=0.001, burst=3, max_lifetime=600))
        port = await server.start("127.0.0.1", 0)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))

        async def ask(payload: bytes) -> bytes | None:
            await loop.sock_sendall(sock, payload)
            try:
                return await asyncio.wait_for(loop.sock_recv(sock, 2048), 1.0)
            except TimeoutError:
                return None

        try:
            addr = pc.parse_natpmp(await ask(pc.natpmp_address_request()) or b"")
            assert (addr.opcode, addr.result, str(addr.address)) == (128, 0, "100.64.0.2")  # nat1-only: WAN
            # secure mode: 127.0.0.1 is not a LAN host natd accepts, but the core is asked (Bind is scripted)
            m = pc.parse_pcp(await ask(pc.map_request("127.0.0.1", NONCE, 6, 9000, 7200, 9000)) or b"")
            assert (m.result, m.external_port) == (0, 9000) and 595 <= m.lifetime <= 600  # capped: max lifetime
            assert await ask(pc.announce_request("127.0.0.1")) is not None
            assert await ask(pc.natpmp_address_request()) is None  # burst of 3 spent: dropped
        finally:
            sock.close()
            server.close()
        assert iwf.table.get_meta("lan_epoch")  # kept for the next start (RFC 6887 §8.5)
    run(tmp_path, body, mode="nat1-only")


def test_internal_index_survives_two_external_ports_on_one_tuple(tmp_path) -> None:
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        a = await iwf.create(upnp(LAN), CreateRequest(6, 8001, LAN, 80, 0, "a", True))
        b = await iwf.create(upnp(LAN), CreateRequest(6, 8002, LAN, 80, 0, "b", True))
        assert iwf.find_internal(6, LAN, 80) == a
        await iwf.delete(upnp(LAN), 6, 8001)
        assert iwf.find_internal(6, LAN, 80) == iwf.table.by_id[b.id]
        await iwf.delete(upnp(LAN), 6, 8002)
        assert iwf.find_internal(6, LAN, 80) is None
    run(tmp_path, body, mode="nat1-only")


def test_a_nonce_only_where_a_mapping_goes_upstream_and_one_creation_time_per_second(tmp_path) -> None:
    """A nat1-only UPnP row never goes upstream (a row keeps its mode): no nonce (48 bytes a row
    at 10k); a LAN PCP client's nonce is kept there all the same (§11.3 ownership), and a cascaded
    row gets one of its own. Rows made within one second share their creation time's object."""
    now = [1000.25]

    async def nat1(iwf: Iwf, link: ScriptedLink) -> None:
        iwf.wall = lambda: now[0]
        a = await iwf.create(upnp(LAN), CreateRequest(6, 8001, LAN, 8001, 0, "a", True))
        now[0] = 1000.5
        b = await iwf.create(upnp(LAN), CreateRequest(6, 8002, LAN, 8002, 0, "b", True))
        now[0] = 1000.75
        c = (await iwf.lan_map(pcp_origin(), req(8003))).mapping
        now[0] = 1001.0
        d = await iwf.create(upnp(LAN), CreateRequest(6, 8004, LAN, 8004, 0, "d", True))
        assert (a.nonce, b.nonce, c.nonce, d.nonce) == (None, None, NONCE, None)
        assert a.created == 1000.0 and b.created is a.created and c.created is a.created
        assert d.created == 1001.0
        rows = iwf.table.db.execute("SELECT ext_port, nonce, created FROM mappings ORDER BY ext_port").fetchall()
        assert rows == [(8001, None, 1000.0), (8002, None, 1000.0), (8003, NONCE, 1000.0), (8004, None, 1001.0)]
    run(tmp_path, nat1, mode="nat1-only")

    async def cascaded(iwf: Iwf, link: ScriptedLink) -> None:
        m = await iwf.create(upnp(LAN), CreateRequest(6, 8001, LAN, 8001, 0, "a", True))
        (up,) = link.maps()
        assert m.nonce is not None and len(m.nonce) == 12 and up.map is not None and up.map.nonce == m.nonce
    run(tmp_path / "c", cascaded)
