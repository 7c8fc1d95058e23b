"""Field behaviour profiles (IETF 80 interworking slides; RFC 6970 §5.6.2, §5.7) against
controld in cascaded mode, with the wanted external port already held at NAT2 by another
subscriber (a PCP MAP from NAT2's own inside address, 100.64.0.1).

Each profile is the control point's real call sequence, scripted: it gets the answers
RFC 6970 prescribes (718 on conflict, 714 from GetSpecificPortMappingEntry when the CP
has no entry: docs/requirements.md IWF-51, IWF-59, IWF-60) and ends with a working mapping or the right
error. "Without flooding NAT2" is measured: an nft counter in NAT2's namespace counts the
PCP requests that reach it from the router.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re

import pytest

from shared import pcp
from tests.bed import testbed as tb
from tests.bed.fixtures import soap_call
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

HELD = 8500


def _hold_at_nat2(bed: tb.Testbed, port: int, proto: int = 6) -> None:
    """Another subscriber (100.64.0.1) maps ``port`` at NAT2 first."""
    req = pcp.Request(pcp.Opcode.MAP, 3600, ipaddress.IPv4Address(tb.ISP_INT_IP),
                      pcp.MapData(os.urandom(12), proto, 9999, port, pcp.any_address(4)),
                      pcp.Options(prefer_failure=True))
    raw = bed.udp_exchange("isp", tb.ISP_INT_IP, tb.PCP_PORT, pcp.encode_request(req), bind=(tb.ISP_INT_IP, 0))
    assert raw is not None and pcp.decode_response(raw).result == pcp.Result.SUCCESS
    assert any(r.ext_port == port and r.int_ip == tb.ISP_INT_IP for r in bed.nat2_dnat_rules())


def _count_pcp(bed: tb.Testbed) -> None:
    bed.nft("isp", "table ip pcpcount {\n chain c {\n type filter hook input priority -300; policy accept;\n"
                   f" ip saddr {tb.ROUTER_WAN_IP} udp dport {tb.PCP_PORT} counter\n }}\n}}\n")


def _pcp_requests(bed: tb.Testbed) -> int:
    out = json.loads(bed.run("isp", ["nft", "-j", "list", "table", "ip", "pcpcount"]).stdout)
    for item in out["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise AssertionError("no counter")


def _add(st: Stack, port: int, iport: int = 8000, proto: str = "TCP", desc: str = "p2p") -> tuple[int, bytes]:
    return soap_call(st, "AddPortMapping", {
        "NewRemoteHost": "", "NewExternalPort": str(port), "NewProtocol": proto, "NewInternalPort": str(iport),
        "NewInternalClient": tb.LAN_HOST_IP, "NewEnabled": "1", "NewPortMappingDescription": desc,
        "NewLeaseDuration": "0"})


def _code(body: bytes) -> int | None:
    m = re.search(rb"<errorCode>(\d+)</errorCode>", body)
    return int(m[1]) if m else None


def test_field_profiles_azureus_emule_utorrent(make_stack) -> None:
    st: Stack = make_stack(mode="cascaded", controld_args=["--pcp-timeout", "2"])
    bed = st.bed
    _hold_at_nat2(bed, HELD)
    _count_pcp(bed)

    # Azureus: AddPortMapping; on conflict the same port 5 more times, then it gives up.
    answers = [_add(st, HELD, desc="Azureus UPnP TCP") for _ in range(6)]
    assert [(s, _code(b)) for s, b in answers] == [(500, 718)] * 6
    # NAT2 (miniupnpd 2.3.1) ignores PREFER_FAILURE and grants the next port, which controld
    # deletes at once: two requests per attempt, no retry storm (docs/requirements.md IWF-51, default no 30 s retry)
    assert _pcp_requests(bed) <= 2 * 6
    assert st.nat1_forwards() == {}  # nothing left behind (docs/core.md)

    # eMule: one AddPortMapping, error on conflict.
    before = _pcp_requests(bed)
    status, body = _add(st, HELD, desc="eMule")
    assert (status, _code(body)) == (500, 718)
    assert _pcp_requests(bed) - before <= 2
    assert st.nat1_forwards() == {}

    # uTorrent: GetSpecificPortMappingEntry over candidates until one is "free", then AddPortMapping.
    before = _pcp_requests(bed)
    mapped = None
    for port in range(HELD, HELD + 4):
        status, body = soap_call(st, "GetSpecificPortMappingEntry",
                                 {"NewRemoteHost": "", "NewExternalPort": str(port), "NewProtocol": "TCP"})
        assert (status, _code(body)) == (500, 714)  # the CP has no entry there (docs/requirements.md IWF-59, IWF-60)
        status, body = _add(st, port, desc="uTorrent")
        if status == 200:
            mapped = port
            break
        assert _code(body) == 718  # held at NAT2: ConflictInMappingEntry (docs/requirements.md IWF-51)
    assert mapped == HELD + 1
    assert _pcp_requests(bed) - before <= 10  # two candidates: a probe (+ delete) and a MAP (+ delete) each
    assert bed.internet_reaches(8000, mapped, b"profile")
    status, body = soap_call(st, "GetSpecificPortMappingEntry",
                             {"NewRemoteHost": "", "NewExternalPort": str(mapped), "NewProtocol": "TCP"})
    assert status == 200 and b"uTorrent" in body
