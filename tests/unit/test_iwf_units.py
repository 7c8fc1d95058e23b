"""The interworking core in process: exact PCP requests for each UPnP action, leases, policy.

natd is replaced by a scripted link that answers with tests/bed/fake_pcp.py's rules (the
real path is covered by test_iwf_e2e.py); what is asserted is the bytes the IWF asks
natd to send upstream, decoded, and what the control point gets back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import subprocess

import pytest

from controld.core.lifecycle import State
from controld.core.service import Iwf
from controld.core.store import MappingTable
from controld.core.upstream_io import _description
from controld.pcp.discovery import choose_server, parse_server_file
from controld.upnp import igd as upnp_igd
from controld.upnp.errors import UPnPError
from shared import pcp, wire
from shared.const import IGD2_MAX_LEASE
from tests.bed.iwf import LAN, SERVER, ScriptedLink, add, make_iwf, run


def test_add_and_delete_are_byte_exact(tmp_path) -> None:
    """AddPortMapping -> MAP + PREFER_FAILURE + suggested port + DESCRIPTION (docs/requirements.md IWF-21, IWF-23,
    IWF-47, IWF-49); delete -> lifetime 0, same nonce, port 0, ::ffff:0:0, no options (IWF-63, IWF-67;
    RFC 6887 erratum 3621); infinite IGD:1 lease -> 0xFFFFFFFF (IWF-69, docs/requirements.md §18 item 1)."""
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        m = await add(iwf, 8080)
        (req,) = link.maps(8080)
        assert req.lifetime == pcp.MAX_LIFETIME and req.options.prefer_failure
        assert req.options.third_party is None  # cascaded: no THIRD_PARTY (IWF-39)
        assert req.options.description == "web " and req.map.internal_port == 80
        assert m.nonce == req.map.nonce and m.state == State.ACTIVE and m.ext_ip == "198.20.0.1"
        assert iwf.external_ip(LAN) == "198.20.0.1" and iwf.external_ip("192.168.1.9") == "198.20.0.1"
        await upnp_igd.delete_port_mapping(iwf, LAN, 1, "", 8080, pcp.PROTO_TCP)
        dreq = link.maps(0)[-1]
        assert dreq.lifetime == 0 and dreq.map.nonce == m.nonce and dreq.map.external_port == 0
        assert dreq.map.external_ip == ipaddress.IPv4Address(0) and dreq.options == pcp.Options()
        assert pcp.encode_request(dreq.request)[44:60] == b"\0" * 10 + b"\xff\xff" + b"\0" * 4
        assert iwf.table.count() == 0 and link.unbound == [m.id]
        with pytest.raises(UPnPError) as exc:
            await upnp_igd.delete_port_mapping(iwf, LAN, 1, "", 8080, pcp.PROTO_TCP)
        assert exc.value.code == 714  # nothing local: nothing sent (IWF-62)
    run(tmp_path, body)


def test_leases_refresh_and_what_the_cp_sees(tmp_path) -> None:
    """IGD:2 lease 0 -> 604800 (IWF-71); a finite lease is the requested lifetime (IWF-70);
    the lease shown never exceeds NAT2's grant (120 s here); a re-add by the owner reuses
    the nonce (IWF-54)."""
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        m2 = await add(iwf, 8081, lease=0, igd=2)
        assert m2.lease == IGD2_MAX_LEASE and link.maps(8081)[-1].lifetime <= IGD2_MAX_LEASE
        m = await add(iwf, 8082, lease=3600)
        assert 3590 <= link.maps(8082)[-1].lifetime <= 3600
        assert 110 <= iwf.lease_remaining(m) <= 120
        assert iwf.lease_remaining(await add(iwf, 8083)) == 0  # IGD:1 infinite: kept by renewals
        again = await add(iwf, 8082, lease=600, desc="new")
        # The same mapping (rows are immutable: the same id, as stored now), same nonce upstream.
        assert again.id == m.id and again == iwf.table.by_id[m.id] and iwf.table.count() == 3
        assert link.maps(8082)[-1].map.nonce == m.nonce and again.description == "new"
        # The same client re-adding with another internal port overwrites (WANIPConnection, as
        # miniupnpd); only NAT1 changes, the nonce and the upstream mapping stay.
        moved = await upnp_igd.add_port_mapping(iwf, LAN, 1, "", 8082, pcp.PROTO_TCP, 81, LAN, True, "x", 0)
        assert moved.id == m.id and moved == iwf.table.by_id[m.id] and moved.int_port == 81
        assert link.maps(8082)[-1].map.nonce == m.nonce and iwf.table.count() == 3
        with pytest.raises(UPnPError) as exc:
            await upnp_igd.add_port_mapping(iwf, "192.168.1.9", 1, "", 8082, pcp.PROTO_TCP, 81, "192.168.1.9", True,
                                            "x", 0)
        assert exc.value.code == 718  # another client on a port we hold: local conflict
    run(tmp_path, body)


def test_refusals_before_anything_is_sent(tmp_path) -> None:
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        cases = [
            (upnp_igd.add_port_mapping(iwf, LAN, 1, "", 8080, 6, 80, LAN, False, "", 0), 402),  # item 16
            (upnp_igd.add_port_mapping(iwf, LAN, 1, "", 0, 6, 80, LAN, True, "", 0), 716),  # IWF-49, our choice
            (upnp_igd.add_port_mapping(iwf, LAN, 1, "", 5351, 17, 80, LAN, True, "", 0), 718),  # RFC 6887 §11.3
            (upnp_igd.add_port_mapping(iwf, LAN, 1, "", 8080, 6, 80, "192.168.1.9", True, "", 0), 606),  # item 88
            (upnp_igd.delete_port_mapping_range(iwf, LAN, 2, 1, 100, 6, False), 730),  # item 62
        ]
        for coro, code in cases:
            with pytest.raises(UPnPError) as exc:
                await coro
            assert exc.value.code == code
        assert link.maps() == []
        m = await upnp_igd.add_any_port_mapping(iwf, LAN, 2, "", 5351, pcp.PROTO_UDP, 80, LAN, True, "", 0)
        assert m.ext_port != 5351 and link.maps()[-1].map.external_port == 0  # never suggest PCP's port
        assert not link.maps()[-1].options.prefer_failure  # item 42
    run(tmp_path, body)


def test_short_error_retry_is_off_by_default(tmp_path) -> None:
    """docs/requirements.md §18 item 4: the 30 s retry is configurable and off by default."""
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        with pytest.raises(UPnPError) as exc:
            await add(iwf, 22000)
        assert exc.value.code == 501 and len(link.maps(22000)) == 1
        assert iwf.table.count() == 0
    run(tmp_path, body)


def test_get_specific_probes_only_when_nothing_local(tmp_path) -> None:
    """RFC 6970 §5.7 (IWF-56 to IWF-60): the whole local table first; else a 60 s PREFER_FAILURE
    probe from the discard port, deleted again; the CP gets 714 either way."""
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        m = await add(iwf, 8080)
        assert await upnp_igd.get_specific(iwf, "192.168.1.77", "", 8080, pcp.PROTO_TCP) == iwf.table.by_id[m.id]
        before = len(link.sent)
        with pytest.raises(UPnPError) as exc:
            await upnp_igd.get_specific(iwf, LAN, "", 9100, pcp.PROTO_TCP)
        assert exc.value.code == 714
        probe, delete = (r for _, r in link.sent[before:])
        assert probe.lifetime == 60 and probe.options.prefer_failure and probe.map.external_port == 9100
        assert probe.map.internal_port == 9 and delete.lifetime == 0 and delete.map.nonce == probe.map.nonce
    run(tmp_path, body)


def test_no_nat1_sends_third_party_and_filter(tmp_path) -> None:
    """No NAT in the IGD: THIRD_PARTY = InternalClient (IWF-22, IWF-33), nothing bound in NAT1;
    RemoteHost -> FILTER prefix 128, all ports (IWF-20)."""
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        m = await upnp_igd.add_port_mapping(iwf, LAN, 1, "198.20.0.10", 8080, 6, 80, LAN, True, "", 0)
        (req,) = link.maps(8080)
        assert req.options.third_party == ipaddress.IPv4Address(LAN) and m.nat1_port is None
        assert req.options.filters == (pcp.Filter(128, 0, ipaddress.IPv4Address("198.20.0.10")),)
        assert link.sent[-1][0].mid is None
        assert await iwf.host_left(LAN) == 1 and iwf.table.count() == 0  # IWF-79, 80
        assert link.maps(0)[-1].options.third_party == ipaddress.IPv4Address(LAN)
    run(tmp_path, body, mode="no-nat1")


# --- discovery, admin, description -------------------------------------------------


def _hook_158(tmp_path, hex_option: str) -> list[list[str]] | None:
    """Run the shipped udhcpc hook on option 158 data; the servers it wrote, None for no file."""
    out = tmp_path / "pcp-server"
    out.unlink(missing_ok=True)
    hook = os.path.join(os.path.dirname(__file__), "..", "..", "packaging", "hooks", "udhcpc-pcp-server")
    env = dict(os.environ, opt158=hex_option, IGDPCP_PCP_SERVER_FILE=str(out))
    subprocess.run(["sh", hook, "bound"], env=env, check=True, timeout=10)
    return parse_server_file(out.read_text()) if out.exists() else None


def test_server_discovery_order_and_option_158(tmp_path) -> None:
    """RFC 6887 §8.1: configured, else DHCP, else the default router (docs/requirements.md IWF-10);
    RFC 7291 §4: option 158 lists, multicast/loopback discarded, malformed ignored."""
    assert choose_server("100.64.0.9", [["100.64.0.3"]], SERVER) == ("100.64.0.9", "configured")
    assert choose_server(None, [["100.64.0.3", "100.64.0.4"]], SERVER) == ("100.64.0.3", "dhcp")
    assert choose_server(None, [], SERVER) == (SERVER, "default-router")
    assert choose_server(None, [], None) == (None, "none")
    # The shipped hook is the one parser of option 158 (what runs on the router).
    assert _hook_158(tmp_path, "04644000030cc6140001c6140002e0000001047f000001") == [
        ["100.64.0.3"], ["198.20.0.1", "198.20.0.2"]]
    for bad in ("05644000030a", "00", "08c6140001"):
        assert _hook_158(tmp_path, bad) is None  # malformed: ignored, no file
    assert parse_server_file("100.64.0.3\n# x\n224.0.0.1 127.0.0.1\n::ffff:198.20.0.1, junk\n") == [
        ["100.64.0.3"], ["198.20.0.1"]]


def test_description_padding() -> None:
    for text in ("x", "abcd", "\u00e9t\u00e9", "a" * 2000):
        raw = _description(text).encode()
        assert len(raw) % 4 == 0 and len(raw) <= pcp.MAX_DESCRIPTION and not raw.endswith(b"\0")
    assert pcp.description_bytes("\u00e9" * 600).decode("utf-8") == "\u00e9" * 508  # cut on a character


class SlowDeletes(ScriptedLink):
    """natd stand-in whose PCP deletes are answered after ``delay``; counts deletes in flight."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay, self.in_flight, self.peak = delay, 0, 0

    async def call(self, msg: wire.Message, timeout: float = 5.0) -> wire.Message:
        if isinstance(msg, wire.PcpExchange) and pcp.decode_request(msg.packet).lifetime == 0:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            await asyncio.sleep(self.delay)
            self.in_flight -= 1
        return await super().call(msg, timeout)


def test_range_delete_is_paced_and_answers_in_time(tmp_path) -> None:
    """DeletePortMappingRange: one MAP delete per mapping (docs/requirements.md IWF-26, IWF-66), never more
    than the recovery window at NAT2 at once, and the CP is answered within pcp_timeout even while
    deletes continue (IWF-67 MAY)."""
    link = SlowDeletes(delay=0.1)

    async def main() -> None:
        iwf = make_iwf(tmp_path, link, pcp_timeout=0.5, recovery_window=4)
        await iwf.start()
        try:
            for port in range(9000, 9040):
                await add(iwf, port, iport=port)
            t0 = asyncio.get_running_loop().time()
            assert await upnp_igd.delete_port_mapping_range(iwf, LAN, 2, 9000, 9039, pcp.PROTO_TCP, False) == 40
            assert asyncio.get_running_loop().time() - t0 < 0.9  # 40 deletes / 4 x 0.1 s = 1 s of work
            for _ in range(100):  # bounded wait for the background rest
                if iwf.table.count() == 0 and link.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert iwf.table.count() == 0 and sorted(link.unbound) == sorted(range(1, 41))
            assert len([r for r in link.maps(0) if r.lifetime == 0]) == 40 and link.peak == 4
        finally:
            await iwf.stop()
            iwf.table.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_unanswered_delete_is_kept_and_retried_until_nat2_answers(tmp_path) -> None:
    """A delete NAT2 does not answer: the row and NAT1 go, the upstream delete stays ours on disk
    (across restarts) and is sent again, unbound, with the internal port NAT2 knows (the NAT1
    port) until NAT2 answers (issue 14 item 4)."""
    async def body(iwf: Iwf, link: ScriptedLink) -> None:
        m = await add(iwf, 8080)
        real = link.fake.answer
        link.fake.answer = lambda req, raw: None  # type: ignore[method-assign]  # NAT2 unreachable
        with pytest.raises(UPnPError):
            await upnp_igd.delete_port_mapping(iwf, LAN, 1, "", 8080, pcp.PROTO_TCP)
        assert iwf.table.count() == 0 and link.unbound == [m.id]
        (pending,) = iwf.table.pending_deletes()
        assert (pending.id, pending.nonce, pending.int_port) == (m.id, m.nonce, m.nat1_port)
        assert MappingTable(str(tmp_path)).pending_deletes() == [pending]  # persisted
        link.fake.answer = real  # type: ignore[method-assign]
        iwf.table.save_pending_delete(dataclasses.replace(pending, due=0.0))
        await iwf._retry_deletes()
        retry = link.sent[-1]
        assert retry[0].mid is None and retry[1].lifetime == 0 and retry[1].map.nonce == m.nonce
        assert retry[1].map.internal_port == m.nat1_port
        assert iwf.table.pending_deletes() == []
    run(tmp_path, body, pcp_timeout=0.5)
