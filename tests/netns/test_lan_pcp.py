"""PCP and NAT-PMP for LAN hosts, end to end through both NATs (docs/lan-pcp.md).

Real clients on the LAN host (Debian's natpmpc; tests/bed/pcp_client.py, written from the
RFC figures), real natd and controld in the router, real miniupnpd as NAT2; asserted is
what a user sees: bytes from the Internet host on the LAN host, the addresses and ports
the clients print, NAT1's and NAT2's rules, the UPnP listing.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.bed import pcp_client as pc
from tests.bed import testbed as tb
from tests.bed.fixtures import soap_call
from tests.bed.stack import Stack
from tests.bed.upnp import error_code as _code
from tests.bed.upnp import out_value as _value

pytestmark = pytest.mark.netns

GW = tb.ROUTER_LAN_IP
CLIENT = "tests.bed.pcp_client"


def natpmpc(st: Stack, *args: str) -> str:
    """Debian's natpmpc on the LAN host against the gateway; its output and exit status."""
    res = st.bed.run("lan", ["natpmpc", "-g", GW, *args], check=False, timeout=30)
    return f"{res.stdout}{res.stderr}\nexit {res.returncode}"


def pcp_ask(st: Stack, payload: bytes, timeout: float = 2.0) -> bytes | None:
    """One PCP/NAT-PMP exchange from the LAN host's address to the gateway's port 5351."""
    return st.bed.udp_exchange("lan", GW, pc.SERVER_PORT, payload, bind=(tb.LAN_HOST_IP, 0), timeout=timeout)


def nat2_tcp(bed: tb.Testbed) -> dict[int, tuple[str, int]]:
    return {r.ext_port: (r.int_ip, r.int_port) for r in bed.nat2_dnat_rules() if r.proto == "tcp"}


def listing(st: Stack) -> list[tuple[int, str, int]]:
    """What a UPnP control point lists (GetGenericPortMappingEntry until 713)."""
    out = []
    for i in range(50):  # bounded
        status, body = soap_call(st, "GetGenericPortMappingEntry", {"NewPortMappingIndex": str(i)})
        if status != 200:
            assert _code(body) == 713, body
            return out
        out.append((int(_value(body, "NewExternalPort") or 0), _value(body, "NewInternalClient") or "",
                    int(_value(body, "NewInternalPort") or 0)))
    return out


def pcp_map(st: Stack, nonce: bytes, port: int, lifetime: int = 600, suggested: int = 0,
            options: bytes = b"") -> pc.PcpAnswer:
    raw = pcp_ask(st, pc.map_request(tb.LAN_HOST_IP, nonce, 6, port, lifetime, suggested, options=options))
    assert raw is not None, st.log("controld")[-2000:]
    return pc.parse_pcp(raw)


@pytest.mark.parametrize("layout", ["router", "split"])
def test_natpmpc_maps_through_both_nats_and_deletes(make_stack, layout: str) -> None:
    st = make_stack(layout=layout, mode="cascaded", natd_args=["--pcp-steer-to", tb.CTL_IP] if layout == "split"
                    else [])
    out = natpmpc(st, "-a", "40000", "40000", "tcp", "600")
    assert "exit 0" in out, out + st.log("controld")[-3000:]
    assert f"Public IP address : {tb.NAT2_PUBLIC_IP}" in out, out  # NAT2's, not our WAN address
    m = re.search(r"Mapped public port (\d+) protocol TCP to local port 40000 liftime (\d+)", out)
    assert m is not None, out
    ext, life = int(m.group(1)), int(m.group(2))
    assert 0 < life <= 600
    assert st.bed.internet_reaches(40000, ext)
    assert (ext, tb.LAN_HOST_IP, 40000) in listing(st)  # one table: UPnP lists it
    out = natpmpc(st, "-a", str(ext), "40000", "tcp", "0")
    assert "exit 0" in out, out
    assert ext not in nat2_tcp(st.bed) and not st.nat1_forwards()
    assert not listing(st)
