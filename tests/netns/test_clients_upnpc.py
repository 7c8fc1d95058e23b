"""The real `upnpc` (miniupnpc 2.2.4, Debian) against controld, IGD:1 and IGD:2, cascaded mode.

The oracle is what upnpc prints against miniupnpd; where igdpcp
answers differently on purpose, the test says so (README "UPnP", documented differences).
Bytes through both NATs prove a mapping works; the NAT1 map and NAT2's rules prove a
delete leaves nothing behind.
"""

from __future__ import annotations

import re

import pytest

from shared.const import IGD2_MAX_LEASE
from tests.bed import testbed as tb
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

PAYLOAD = b"igdpcp upnpc"


def _entries(out: str) -> list[tuple[str, int, str, int]]:
    """(proto, ext port, client, int port) of each ``upnpc -l`` line."""
    return [(p, int(e), c, int(i)) for p, e, c, i in
            re.findall(r"^\s*\d+ (TCP|UDP)\s+(\d+)->([\d.]+):(\d+)", out, re.M)]


def _listing(out: str) -> list[tuple[str, int, str, int]]:
    """(proto, ext port, client, int port) of each ``upnpc -L`` (GetListOfPortMappings) line."""
    return [(p, int(e), c, int(i)) for p, e, c, i in
            re.findall(r"^\s*\d+ (TCP|UDP)\s+(\d+)->([\d.]+):(\d+)", out, re.M)]


def test_upnpc_igd2_every_command(make_stack) -> None:
    """RFC 6970 §5.6-§5.8 through upnpc: -s -a -r -e -l -L -n -N -d, plus -A (a pinhole: not served)."""
    st: Stack = make_stack(controld_args=["--igd-version", "2"])
    bed = st.bed

    s = st.upnpc("-s")
    assert "Found valid IGD" in s.stdout, s.stdout
    assert f"ExternalIPAddress = {tb.NAT2_PUBLIC_IP}" in s.stdout  # PCP-learned, not 100.64.0.2
    assert re.search(r"Connection Type : IP_Routed", s.stdout)
    assert re.search(r"Status : Connected", s.stdout)
    assert re.search(r"Bytes:\s+Sent:\s+\d+\s+Recv:\s+\d+", s.stdout)

    # -a with a lease and -e description; upnpc reads it back with GetSpecificPortMappingEntry
    add = st.upnpc("-e", "game server", "-a", tb.LAN_HOST_IP, "8000", "8080", "TCP", "3600")
    assert add.returncode == 0, add.stdout
    assert f"external {tb.NAT2_PUBLIC_IP}:8080 TCP is redirected to internal {tb.LAN_HOST_IP}:8000" in add.stdout
    duration = re.search(r"duration=(\d+)", add.stdout)
    assert duration and 3500 < int(duration[1]) <= 3600
    assert bed.internet_reaches(8000, 8080, PAYLOAD)

    # -a without a lease on IGD:2: RFC 6970 §4.1 (docs/requirements.md IWF-71) turns 0 into IGD2_MAX_LEASE, so the
    # mapping is not permanent (the remaining lease may be reported as what NAT2 granted)
    add0 = st.upnpc("-a", tb.LAN_HOST_IP, "9000", "9000", "UDP")
    lease0 = re.search(r"duration=(\d+)", add0.stdout)
    assert add0.returncode == 0 and lease0 and 0 < int(lease0[1]) <= IGD2_MAX_LEASE, add0.stdout

    # secure mode: another internal client is 606 under IGD:2 (docs/requirements.md IWF-88)
    other = st.upnpc("-a", "192.168.1.50", "8000", "8081", "TCP")
    assert other.returncode != 0 and "606" in other.stdout, other.stdout

    # -r: map the caller's own ports
    r = st.upnpc("-r", "7000", "7001", "TCP")
    assert "is redirected to internal" in r.stdout and ":7001 TCP" in r.stdout, r.stdout

    # -n: AddAnyPortMapping; 8080 is taken, so another port is reserved (RFC 6970 §5.6.1)
    n = st.upnpc("-n", tb.LAN_HOST_IP, "8100", "8080", "TCP", "600")
    m = re.search(rf"external {re.escape(tb.NAT2_PUBLIC_IP)}:(\d+) TCP is redirected to internal "
                  rf"{re.escape(tb.LAN_HOST_IP)}:8100", n.stdout)
    assert m and int(m[1]) != 8080, n.stdout
    any_port = int(m[1])
    assert bed.internet_reaches(8100, any_port, PAYLOAD)

    want = {("TCP", 8080, tb.LAN_HOST_IP, 8000), ("UDP", 9000, tb.LAN_HOST_IP, 9000),
            ("TCP", 7001, tb.LAN_HOST_IP, 7000), ("TCP", any_port, tb.LAN_HOST_IP, 8100)}
    listed = _entries(st.upnpc("-l").stdout)
    assert set(listed) == want and len(listed) == 4  # GetGeneric: exactly the set, no duplicates
    assert set(_listing(st.upnpc("-L").stdout)) == want  # GetListOfPortMappings agrees

    # -N: range delete; 733 when reversed, 730 when empty, then only TCP in range goes
    assert "733" in st.upnpc("-N", "9000", "8000", "TCP").stdout
    assert "730" in st.upnpc("-N", "100", "200", "TCP").stdout
    st.upnpc("-N", "7000", "8090", "TCP")
    left = set(_entries(st.upnpc("-l").stdout))
    assert left == want - {("TCP", 8080, tb.LAN_HOST_IP, 8000), ("TCP", 7001, tb.LAN_HOST_IP, 7000)} \
        - ({("TCP", any_port, tb.LAN_HOST_IP, 8100)} if 7000 <= any_port <= 8090 else set())
    assert not bed.internet_reaches(8000, 8080, PAYLOAD)

    # -d, then 714 on a repeat (RFC 6970 §5.8)
    d = st.upnpc("-d", "9000", "UDP")
    assert "returned : 0" in d.stdout, d.stdout
    assert "714" in st.upnpc("-d", "9000", "UDP").stdout

    # -A asks for WANIPv6FirewallControl (a pinhole), which an IPv4 IGD does not serve
    a = st.upnpc("-A", "", "0", tb.LAN_HOST_IP, "8000", "TCP", "600")
    assert a.returncode != 0 or "UniqueID" not in a.stdout
    assert "Found valid IGD" in st.upnpc("-s").stdout  # and controld still answers

    # what is left is exactly what upnpc sees, in NAT1 too
    st.upnpc("-d", str(any_port), "TCP")
    assert _entries(st.upnpc("-l").stdout) == []
    assert st.nat1_forwards() == {}


def test_upnpc_igd1_description_and_errors(make_stack) -> None:
    """IGD:1 (the default): v1 types, no v2 actions, secure mode 606, lease 0 is permanent."""
    st: Stack = make_stack()
    assert "Found valid IGD" in st.upnpc("-s").stdout
    add = st.upnpc("-a", tb.LAN_HOST_IP, "8000", "8088", "TCP")
    assert add.returncode == 0 and "duration=0" in add.stdout, add.stdout  # permanent (IGD:1)
    other = st.upnpc("-a", "192.168.1.50", "8000", "8089", "TCP")
    # secure mode: 606 on IGD:1 too (issue #3; miniupnpd answers 718 here: a documented difference)
    assert other.returncode != 0 and "606" in other.stdout, other.stdout
    n = st.upnpc("-n", tb.LAN_HOST_IP, "8000", "8090", "TCP")
    assert "401" in n.stdout or "Invalid Action" in n.stdout, n.stdout  # no AddAnyPortMapping on IGD:1
    assert _entries(st.upnpc("-l").stdout) == [("TCP", 8088, tb.LAN_HOST_IP, 8000)]
    assert "returned : 0" in st.upnpc("-d", "8088", "TCP").stdout
