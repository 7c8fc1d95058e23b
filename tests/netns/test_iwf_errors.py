"""The RFC 6970 §4.3 error table, row by row, and the PCP client's error paths, end to end.

Real natd and controld in the namespace bed; upstream a scripted PCP server
(tests/bed/fake_pcp.py) for the result codes real miniupnpd never produces. controld finds
that server the way a router would: the shipped udhcpc hook turns DHCP option 158 into
the server file (RFC 6887 §8.1, RFC 7291; docs/requirements.md IWF-10).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import pytest

from tests.bed import testbed as tb
from tests.bed.stack import Stack
from tests.bed.upnp import HOOKS, WANIP1, WANIP2, add, wait_for
from tests.bed.upnp import error_code as _code
from tests.bed.upnp import out_value as _value

pytestmark = pytest.mark.netns

FAKE_IP = "100.64.0.3"
# (PCP result, UPnP error under IGD:1, under IGD:2): docs/requirements.md §16, exactly as the reference gives it.
ROWS = [(1, 501, 501), (2, 718, 606), (3, 501, 501), (4, 501, 501), (5, 501, 501), (6, 501, 501),
        (7, 501, 501), (8, 501, 728), (9, 501, 501), (10, 501, 728), (11, 718, 718), (12, 501, 501),
        (13, 501, 501), (24, 501, 501)]  # 24: a later code (RFC 7843) -> 501 (§16 impl. note)


@pytest.fixture
def fake_stack(make_testbed):
    bed = make_testbed()
    bed.run("isp", ["ip", "addr", "add", f"{FAKE_IP}/24", "dev", tb.ISP_INT_IF])
    log_path = bed.path("fake-pcp.jsonl")
    fake = bed.popen("isp", [sys.executable, "-m", "tests.bed.fake_pcp", "--bind", FAKE_IP, "--log", log_path],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     cwd=os.path.join(os.path.dirname(__file__), "..", ".."))
    assert select.select([fake.stdout], [], [], 10)[0] and b"ready" in fake.stdout.readline()
    # DHCP offered option 158 = one server, 100.64.0.3 (list-length 4): the hook writes the file.
    env = dict(os.environ, opt158="0464400003", IGDPCP_PCP_SERVER_FILE=bed.path("pcp-server"))
    subprocess.run(["sh", os.path.join(HOOKS, "udhcpc-pcp-server"), "bound"], env=env, check=True, timeout=10)
    st = Stack(bed, controld_args=["--igd-version", "2", "--pcp-timeout", "3", "--pcp-short-error-retry", "0.5"])
    try:
        st.start()
        yield st, log_path
    finally:
        st.close()


def _requests(log_path: str, eport: int | None = None) -> list[dict]:
    with open(log_path) as f:
        reqs = [json.loads(line) for line in f]
    return [r for r in reqs if eport is None or r.get("eport") == eport]


def test_error_table_retries_version_and_announce(fake_stack) -> None:
    st, log_path = fake_stack
    assert "PCP server is 100.64.0.3 (dhcp)" in st.log("controld")

    # Every row of the table, under IGD:1 and IGD:2 (the service version the CP invoked).
    for result, v1, v2 in ROWS:
        for service, want in ((WANIP1, v1), (WANIP2, v2)):
            status, body = add(st, 20000 + result, 1000 + result, service=service)
            assert (status, _code(body)) == (500, want), (result, service, body)
    assert st.nat1_forwards() == {}  # every refused mapping left nothing in NAT1
    # AddPortMapping always carried PREFER_FAILURE (docs/requirements.md IWF-49); short-lifetime errors were
    # retried once, CANNOT_PROVIDE_EXTERNAL twice (IWF-46, IWF-51), the others never.
    assert all(r["prefer_failure"] for r in _requests(log_path) if 20000 < (r.get("eport") or 0) < 20100)
    counts = {result: len(_requests(log_path, 20000 + result)) for result, _, _ in ROWS}
    assert counts == {r: 2 * (3 if r == 11 else 2 if r in (7, 8, 10) else 1) for r, _, _ in ROWS}

    # A short error that clears: the retry after the configured wait gives the CP its mapping.
    status, body = add(st, 22000, 2200)
    assert status == 200, body
    assert [r["result"] for r in _requests(log_path, 22000)] == [7, 0]

    # AddAnyPortMapping: no PREFER_FAILURE; the answer names the port (docs/requirements.md IWF-42, IWF-44).
    status, body = add(st, 30000, 3000, any_port=True)
    assert status == 200 and _value(body, "NewReservedPort") == "30000"
    (req,) = _requests(log_path, 30000)
    assert not req["prefer_failure"] and req["third_party"] is None and req["description"].strip() == "iwf"

    # No answer at all: 501 within the configured bound, far below UPnP's 30 s (IWF-13).
    t0 = time.monotonic()
    status, body = add(st, 23000, 2300)
    assert (status, _code(body)) == (500, 501) and time.monotonic() - t0 < 6

    # GetSpecificPortMappingEntry probe answered with an error: mapped through the table (IWF-58).
    status, body = st_call(st, "GetSpecificPortMappingEntry", 20012)
    assert (status, _code(body)) == (500, 501)
    assert _requests(log_path, 20012)[-1]["iport"] == 9 and _requests(log_path, 20012)[-1]["prefer_failure"]

    # An unsolicited ANNOUNCE with an epoch that went back: every mapping is re-created at that
    # server with its stored nonce after a random 0-5 s (RFC 6887 §14.1.3; docs/requirements.md IWF-82).
    assert add(st, 25000, 2500)[0] == 200
    nonce = _requests(log_path, 22000)[-1]["nonce"]
    assert wait_for(lambda: len(_requests(log_path, 22000)) >= 3, 8), st.log("controld")[-1500:]
    assert _requests(log_path, 22000)[-1]["nonce"] == nonce and _requests(log_path, 22000)[-1]["prefer_failure"]
    assert "lost its state (ANNOUNCE)" in st.log("controld")

    # NO_RESOURCES with a 30 s error lifetime: no new mappings there meanwhile (RFC 6887 §11.4).
    status, body = add(st, 20108, 2108, service=WANIP2)
    assert (status, _code(body)) == (500, 728)
    status, body = add(st, 30500, 3050, service=WANIP2)
    assert (status, _code(body)) == (500, 728) and _requests(log_path, 30500) == []


def test_unsupported_version_from_a_v2_server_is_501_and_holds_nothing_off(fake_stack) -> None:
    """UNSUPP_VERSION proposing NAT-PMP (version 0) from a server that already answered
    version 2 (this one did, at start): it cannot be the answer to our request (RFC 6887 §9
    negotiates on first contact), so it is not believed: that add goes unanswered (501) and
    the next one is sent and served; a forged one cannot turn PCP off (issue 14 item 6). The
    hold-off after a genuine one (min(30 min, Lifetime)) is tests/unit/test_pcp_client.py's."""
    st, log_path = fake_stack
    status, body = add(st, 21000, 2100)
    assert (status, _code(body)) == (500, 501)
    status, body = add(st, 30600, 3060)
    assert status == 200, body
    assert len(_requests(log_path, 30600)) >= 1
    assert soap_ok(st)


def st_call(st: Stack, action: str, port: int) -> tuple[int, bytes]:
    from tests.bed.fixtures import soap_call

    return soap_call(st, action, {"NewRemoteHost": "", "NewExternalPort": str(port), "NewProtocol": "TCP"})


def soap_ok(st: Stack) -> bool:
    from tests.bed.fixtures import soap_call

    return soap_call(st, "GetStatusInfo", {})[0] == 200
