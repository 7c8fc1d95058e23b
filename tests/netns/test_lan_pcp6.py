"""PCP over IPv6 from LAN hosts and MAP in IPv6 firewall mode, end to end (docs/lan-pcp.md
"PCP over IPv6", docs/pinholes.md).

One bed for the module (``Testbed(ipv6=True)``, natd owning the IPv6 default drop with
``--ipv6-firewall own``, controld in nat1-only: no NAT2 needed for IPv6). The LAN host runs the
independent client (tests/bed/pcp_client.py, written from the RFC figures) against the router's
LAN IPv6 address; asserted is what a user sees: the answer's fields, bytes from the Internet host
(2001:db8:20::10) on the LAN host's global address, natd's nft set elements, natd's pinhole
status, the stored row, and the ANNOUNCE on [ff02::1]:5350.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator

import pytest

from natd.client import NatdClient
from shared import wire
from tests.bed import pcp_client as pc
from tests.bed import testbed as tb
from tests.bed.fixtures import ipv6_stack
from tests.bed.natd import wait_until
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

GW6 = tb.ROUTER_LAN_IP6
LAN6 = tb.LAN_HOST_IP6
INET6 = tb.INET_HOST_IP6
TCP, UDP = 6, 17
NOT_AUTHORIZED, UNSUPP_OPTION, ADDRESS_MISMATCH, EXCESSIVE_REMOTE_PEERS = 2, 5, 12, 13


@pytest.fixture(scope="module")
def st() -> Iterator[Stack]:
    """natd (own IPv6 firewall) and controld (nat1-only) on an IPv6 bed, shared by the module."""
    yield from ipv6_stack(mode="nat1-only", natd_args=["--ipv6-firewall", "own"])


def ask(st: Stack, payload: bytes, server: str = GW6, source: str = LAN6, timeout: float = 2.0) -> bytes | None:
    """One exchange from the LAN host on a socket connected to ``server``:5351 (RFC 6887 §8.3)."""
    res = st.bed.run("lan", [sys.executable, pc.__file__, "ask", server, payload.hex(), "--source", source,
                             "--timeout", str(timeout)], check=False, timeout=timeout * 3 + 10)
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip()
    return bytes.fromhex(out) if out else None


def pmap(st: Stack, nonce: bytes, port: int, lifetime: int = 600, options: bytes = b"", client: str = LAN6,
         proto: int = TCP) -> pc.PcpAnswer:
    """A PCP MAP over IPv6 from the LAN host; the parsed answer (fails the test if none came)."""
    raw = ask(st, pc.map_request(client, nonce, proto, port, lifetime, options=options))
    assert raw is not None, st.log("controld")[-3000:]
    return pc.parse_pcp(raw)


def elements(bed: tb.Testbed, name: str = "pin6") -> set[tuple]:
    """natd's pinhole set (pin6: any remote host, pin6r: one) as the kernel holds it."""
    res = bed.run("cpe", ["nft", "-j", "list", "set", "ip6", "igdpcp", name], check=False)
    assert res.returncode == 0, res.stderr
    return {tuple(e["elem"]["val"]["concat"]) for item in json.loads(res.stdout)["nftables"]
            for e in item.get("set", {}).get("elem", [])}


def rows(st: Stack) -> list[tuple]:
    """controld's stored pinhole rows (uid, owner, int_client, int_port, proto, remote_host, nonce)."""
    with sqlite3.connect(os.path.join(st.bed.path("state"), "mappings.sqlite3")) as db:
        return db.execute("SELECT uid, owner, int_client, int_port, proto, remote_host, nonce FROM pinholes "
                          "ORDER BY uid").fetchall()


def link_local(bed: tb.Testbed, ns: str, dev: str) -> str:
    out = bed.run(ns, ["ip", "-6", "-j", "addr", "show", "dev", dev, "scope", "link"]).stdout
    return next(a["local"] for i in json.loads(out) for a in i["addr_info"] if a.get("local"))


def test_map_over_ipv6_opens_a_pinhole_refreshes_and_deletes_it(st: Stack) -> None:
    bed, port, nonce = st.bed, 8400, pc.new_nonce()
    assert not bed.tcp_in6(port)  # natd's default drop
    a = pmap(st, nonce, port, 600, options=pc.description("pcp6"))
    assert (a.opcode, a.result, a.nonce, a.protocol, a.internal_port) == (1, 0, nonce, TCP, port), a
    # IPv6 firewall: no translation, external = internal (RFC 6887 §11.3)
    assert (str(a.external_ip), a.external_port) == (LAN6, port) and 0 < a.lifetime <= 600
    assert (pc.OPT_DESCRIPTION, b"pcp6") in a.options
    assert elements(bed) == {(LAN6, "tcp", port)}
    assert bed.tcp_in6(port)
    [(uid, owner, client, iport, proto, remote, stored)] = rows(st)
    assert (owner, client, iport, proto, remote, stored) == (LAN6, LAN6, port, TCP, "", nonce)
    # the owner's renewal re-leases the same pinhole; another nonce is someone else (§11.3)
    again = pmap(st, nonce, port, 300)
    assert (again.result, again.external_port) == (0, port) and 0 < again.lifetime <= 300
    assert [r[0] for r in rows(st)] == [uid]
    thief = pmap(st, pc.new_nonce(), port, 0)
    assert thief.result == NOT_AUTHORIZED and 0 < thief.lifetime <= 300, thief  # the remaining lifetime
    assert elements(bed) == {(LAN6, "tcp", port)}
    gone = pmap(st, nonce, port, 0)
    assert (gone.result, gone.lifetime) == (0, 0), gone
    assert elements(bed) == set() and rows(st) == []
    assert not bed.tcp_in6(port)


def test_another_hosts_address_natpmp_and_link_local(st: Stack) -> None:
    other = "2001:db8:1::99"
    # the Client IP field must be the source (RFC 6887 §8.2); THIRD_PARTY only from a manager (§13.1)
    raw = ask(st, pc.map_request(other, pc.new_nonce(), TCP, 8401, 600))
    assert raw is not None and pc.parse_pcp(raw).result == ADDRESS_MISMATCH
    assert pmap(st, pc.new_nonce(), 8401, options=pc.third_party(other)).result == UNSUPP_OPTION
    assert elements(st.bed) == set()
    # NAT-PMP is IPv4 only (RFC 6886): no answer over IPv6
    assert ask(st, pc.natpmp_address_request(), timeout=0.5) is None
    # the router's link-local address serves too; a link-local internal address is no LAN prefix's
    gw_ll, host_ll = link_local(st.bed, "cpe", tb.ROUTER_LAN_IF), link_local(st.bed, "lan", tb.LAN_HOST_IF)
    server, source = f"{gw_ll}%{tb.LAN_HOST_IF}", f"{host_ll}%{tb.LAN_HOST_IF}"
    ann = ask(st, pc.announce_request(host_ll), server, source)
    assert ann is not None and (pc.parse_pcp(ann).opcode, pc.parse_pcp(ann).result) == (0, 0)
    raw = ask(st, pc.map_request(host_ll, pc.new_nonce(), TCP, 8402, 600), server, source)
    assert raw is not None and pc.parse_pcp(raw).result == NOT_AUTHORIZED
    assert elements(st.bed) == set()


def test_filter_of_one_remote_host_and_shorter_prefixes_refused(st: Stack) -> None:
    nonce, port = pc.new_nonce(), 8403
    wide = pmap(st, nonce, port, options=pc.filter_option(64, 0, INET6))
    assert wide.result == EXCESSIVE_REMOTE_PEERS, wide  # never widened (docs/lan-pcp.md)
    a = pmap(st, nonce, port, options=pc.filter_option(128, 0, INET6))
    assert a.result == 0 and any(code == pc.OPT_FILTER for code, _ in a.options), a
    assert elements(st.bed, "pin6r") == {(INET6, LAN6, "tcp", port)} and elements(st.bed) == set()
    assert st.bed.tcp_in6(port)
    assert pmap(st, nonce, port, 0).result == 0
    assert elements(st.bed, "pin6r") == set()


def test_pcp_pinhole_is_the_shared_cores_and_survives_a_controld_crash(st: Stack) -> None:
    bed, nonce, port = st.bed, pc.new_nonce(), 8404
    assert pmap(st, nonce, port, 600, proto=UDP).result == 0
    [(uid, *_)] = rows(st)
    c = NatdClient(st.rpc)
    try:
        status = c.call(wire.PinholeStatus())
    finally:
        c.close()
    assert isinstance(status, wire.PinholeStatusReply) and status.pinholes == 1, status
    st.kill("controld")  # no clean stop: no epoch record is kept, so the restart announces
    # listening only now: the killed controld's own start-up announcements are over for good
    hear = bed.popen("lan", [sys.executable, pc.__file__, "hear", "6", "20"], stdout=subprocess.PIPE, text=True)
    try:
        assert hear.stdout is not None and hear.stdout.readline().strip() == "ready"
        st.start_controld()
        heard, _ = hear.communicate(timeout=25)
    finally:
        hear.kill()
    # our reset ANNOUNCE on [ff02::1]:5350 from a router address and port 5351 (RFC 6887 §14.1.3)
    assert heard, st.log("controld")[-3000:]
    src, sport, data = heard.split()
    ann = pc.parse_pcp(bytes.fromhex(data))
    assert (ann.opcode, ann.result, ann.lifetime) == (0, 0, 0) and ann.epoch < 10, ann
    assert sport == "5351" and (src == GW6 or src.startswith("fe80:")), heard
    # the row came back from the table; the same nonce renews the same pinhole
    assert wait_until(lambda: elements(bed) == {(LAN6, "udp", port)}, 10, 0.1) is not None
    again = pmap(st, nonce, port, 600, proto=UDP)
    assert (again.result, str(again.external_ip), again.external_port) == (0, LAN6, port), again
    assert [r[0] for r in rows(st)] == [uid]
    assert pmap(st, nonce, port, 0, proto=UDP).result == 0
    assert elements(bed) == set() and rows(st) == []
