"""UPnP WANIPv6FirewallControl:1 wired to natd's pinholes, end to end (docs/upnp.md "IPv6 pinholes").

The LAN host's ``upnpc -A`` / ``-D`` (miniupnpc 2.2.4: AddPinhole, DeletePinhole) on the IGD:2
device opens and closes a hole in natd's own IPv6 firewall (``--ipv6-firewall own``): bytes
from the Internet host reach the LAN host's global address only while it is open, and the
kernel's set holds the element only then.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.bed import testbed as tb
from tests.bed.natd import PAYLOAD, wait_until
from tests.bed.stack import HTTP_PORT, Stack

pytestmark = pytest.mark.netns

IGD2 = f"http://{tb.ROUTER_LAN_IP}:{HTTP_PORT}/igd2/rootDesc.xml"
LAN6 = tb.LAN_HOST_IP6


def tcp_in(bed: tb.Testbed, port: int, timeout: float = 2.0) -> bool:
    """Does a TCP connection from the Internet host to the LAN host's global address deliver bytes?"""
    listener = bed.tcp_listen("lan", port, host="::", timeout=timeout + 2)
    sent = bed.tcp_send("inet", LAN6, port, PAYLOAD, timeout=timeout)
    got = listener.received(timeout=timeout if sent else 0.3)
    listener.close()
    return sent and got == PAYLOAD


def elements(bed: tb.Testbed) -> set[tuple]:
    """natd's any-remote pinhole set as the kernel holds it."""
    res = bed.run("cpe", ["nft", "-j", "list", "set", "ip6", "igdpcp", "pin6"], check=False)
    assert res.returncode == 0, res.stderr
    return {tuple(e["elem"]["val"]["concat"]) for item in json.loads(res.stdout)["nftables"]
            for e in item.get("set", {}).get("elem", [])}


def upnpc(st: Stack, *args: str) -> str:
    return st.bed.run("lan", ["upnpc", "-u", IGD2, *args], check=False, timeout=30).stdout


def test_upnpc_add_and_delete_pinhole_open_and_close_natd_firewall(make_stack) -> None:
    # secure mode off: the caller speaks from its IPv4 address and no neighbour table ties it to
    # its IPv6 one yet (docs/upnp.md "IPv6 pinholes"); the secure-mode refusal is asserted below
    st: Stack = make_stack(controld_args=["--no-secure-mode"], natd_args=["--ipv6-firewall", "own"],
                           bed_kwargs={"ipv6": True})
    bed = st.bed
    assert not tcp_in(bed, 8080)  # natd's default drop
    out = upnpc(st, "-A", "empty", "0", LAN6, "8080", "TCP", "600")
    found = re.search(r"Pinhole ID = (\d+)", out)
    assert found, out
    uid = found.group(1)
    assert elements(bed) == {(LAN6, "tcp", 8080)}
    assert tcp_in(bed, 8080)
    assert not tcp_in(bed, 8081)  # only the port asked for
    # natd restarts (its stop closes every pinhole): controld sees the new boot id and re-syncs
    st.stop("natd")
    st.start_natd()
    assert wait_until(lambda: elements(bed) == {(LAN6, "tcp", 8080)}, 10, 0.2) is not None, st.log("controld")
    assert tcp_in(bed, 8080)
    # both restart: controld re-sends its stored rows at start
    st.stop("controld")
    st.stop("natd")
    st.start_natd()
    st.start_controld()
    assert wait_until(lambda: elements(bed) == {(LAN6, "tcp", 8080)}, 10, 0.2) is not None, st.log("controld")
    assert tcp_in(bed, 8080)
    out = upnpc(st, "-D", uid)
    assert "failed" not in out.lower(), out
    assert elements(bed) == set()
    assert not tcp_in(bed, 8080)
    # a privileged port: refused by the core's policy, nothing reaches natd
    assert "606" in upnpc(st, "-A", "empty", "0", LAN6, "80", "TCP", "600")
    assert elements(bed) == set()


def test_secure_mode_refuses_a_pinhole_asked_from_the_ipv4_address(make_stack) -> None:
    st: Stack = make_stack(natd_args=["--ipv6-firewall", "own"], bed_kwargs={"ipv6": True})
    out = upnpc(st, "-A", "empty", "0", LAN6, "8080", "TCP", "600")
    assert "606" in out, out
    assert elements(st.bed) == set()
    assert not tcp_in(st.bed, 8080)
