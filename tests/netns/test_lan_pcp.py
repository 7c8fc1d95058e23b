"""PCP and NAT-PMP for LAN hosts, end to end through both NATs (docs/lan-pcp.md).

Real clients on the LAN host (Debian's natpmpc; tests/bed/pcp_client.py, written from the
RFC figures), real natd and controld in the router, real miniupnpd as NAT2; asserted is
what a user sees: bytes from the Internet host on the LAN host, the addresses and ports
the clients print, NAT1's and NAT2's rules, the UPnP listing. The running server is
fuzzed by tests/netns/test_fuzz_live.py (targets pcp-lan and natpmp-lan).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.bed import pcp_client as pc
from tests.bed import testbed as tb
from tests.bed.fixtures import soap_call
from tests.bed.stack import Stack
from tests.bed.upnp import listing

pytestmark = pytest.mark.netns

GW = tb.ROUTER_LAN_IP
CLIENT = "tests.bed.pcp_client"


def natpmpc(st: Stack, *args: str) -> str:
    """Debian's natpmpc on the LAN host against the gateway; its output and exit status."""
    res = st.bed.run("lan", ["natpmpc", "-g", GW, *args], check=False, timeout=30)
    return f"{res.stdout}{res.stderr}\nexit {res.returncode}"


def nat2_tcp(bed: tb.Testbed) -> dict[int, tuple[str, int]]:
    return {r.ext_port: (r.int_ip, r.int_port) for r in bed.nat2_dnat_rules() if r.proto == "tcp"}


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


# --- PCP with the independent client (tests/bed/pcp_client.py) ------------------------------

# Runs on the LAN host: one exchange on a connected socket, so an answer from any source
# but the gateway's address is never read (RFC 6887 §8.3: answers come from where the request went).
_ASK = r"""
import socket, sys
server, payload, timeout, source = sys.argv[1], bytes.fromhex(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((source, 0))
s.connect((server, 5351))
s.settimeout(timeout)
for _ in range(3):
    s.send(payload)
    try:
        print(s.recv(2048).hex())
        break
    except socket.timeout:
        continue
"""


def ask(st: Stack, payload: bytes, source: str = tb.LAN_HOST_IP, timeout: float = 2.0) -> bytes | None:
    """One exchange from the LAN host (``source`` must be one of its addresses) with gateway:5351."""
    res = st.bed.run("lan", [sys.executable, "-c", _ASK, GW, payload.hex(), str(timeout), source], check=False,
                     timeout=timeout * 3 + 10)
    out = res.stdout.strip()
    return bytes.fromhex(out) if out else None


def pmap(st: Stack, nonce: bytes, port: int, lifetime: int = 600, suggested: int = 0, options: bytes = b"",
         client: str = tb.LAN_HOST_IP, proto: int = 6) -> pc.PcpAnswer:
    """A PCP MAP from the LAN host; the parsed answer (fails the test if none came)."""
    raw = ask(st, pc.map_request(client, nonce, proto, port, lifetime, suggested, options=options), client)
    assert raw is not None, st.log("controld")[-3000:]
    return pc.parse_pcp(raw)


def reaches(st: Stack, lan_port: int, ext_ip: str, ext_port: int) -> bool:
    """TCP from outside to ext_ip:ext_port arrives on the LAN host's lan_port (Internet host
    for NAT2's address; the ISP side for our own WAN address in nat1-only)."""
    if ext_ip == tb.NAT2_PUBLIC_IP:
        return st.bed.internet_reaches(lan_port, ext_port)
    listener = st.bed.tcp_listen("lan", lan_port, timeout=5)
    sent = st.bed.tcp_send("isp", ext_ip, ext_port, b"pcp nat1-only", timeout=3)
    got = listener.received(timeout=3 if sent else 0.5)
    listener.close()
    return sent and got == b"pcp nat1-only"


@pytest.mark.parametrize(("layout", "mode"), [("router", "cascaded"), ("split", "cascaded"),
                                              ("router", "nat1-only"), ("split", "nat1-only")])
def test_pcp_map_refresh_delete_end_to_end(make_stack, layout: str, mode: str) -> None:
    st = make_stack(layout=layout, mode=mode,
                    natd_args=["--pcp-steer-to", tb.CTL_IP] if layout == "split" else [])
    nonce = pc.new_nonce()
    a = pmap(st, nonce, 41000, 300, 41000, options=pc.description("pcp e2e"))
    assert (a.opcode, a.result, a.nonce, a.internal_port) == (1, 0, nonce, 41000), a
    outer = tb.NAT2_PUBLIC_IP if mode == "cascaded" else tb.ROUTER_WAN_IP
    assert str(a.external_ip) == outer and 0 < a.lifetime <= 300
    assert (pc.OPT_DESCRIPTION, b"pcp e2e") in a.options  # DESCRIPTION echoed (RFC 7220 §4)
    assert reaches(st, 41000, outer, a.external_port)
    # refresh: same external port; another nonce is someone else (RFC 6887 §11.3)
    again = pmap(st, nonce, 41000, 200)
    assert (again.result, again.external_port) == (0, a.external_port) and again.lifetime <= 200
    thief = pmap(st, pc.new_nonce(), 41000, 0)
    assert thief.result == 2 and 0 < thief.lifetime <= 200  # NOT_AUTHORIZED with the remaining lifetime
    gone = pmap(st, nonce, 41000, 0)
    assert (gone.result, gone.lifetime) == (0, 0)
    assert not st.nat1_forwards() and not listing(st)
    if mode == "cascaded":
        assert a.external_port not in nat2_tcp(st.bed)


def test_cross_protocol_listing_delete_and_prefer_failure(make_stack) -> None:
    st = make_stack(mode="nat1-only")
    a = pmap(st, pc.new_nonce(), 42000, 600, 42000)
    assert a.result == 0, a
    assert (a.external_port, tb.LAN_HOST_IP, 42000) in listing(st)  # PCP's mapping in UPnP's listing
    status, body = soap_call(st, "DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": str(a.external_port),
                                                       "NewProtocol": "TCP"})
    assert status == 200, body  # the owning host deletes it through UPnP
    assert not listing(st) and not st.nat1_forwards()
    # A UPnP mapping's port is refused to another host's MAP with PREFER_FAILURE (§13.2)
    other = "192.168.1.20"
    st.bed.run("lan", ["ip", "addr", "add", f"{other}/24", "dev", tb.LAN_HOST_IF])
    out = st.upnpc("-a", tb.LAN_HOST_IP, "43000", "43000", "TCP")
    assert "is redirected to internal" in out.stdout, out.stdout
    b = pmap(st, pc.new_nonce(), 43000, 600, 43000, options=pc.prefer_failure(), client=other)
    assert b.result == 11, b  # CANNOT_PROVIDE_EXTERNAL
    c = pmap(st, pc.new_nonce(), 43000, 600, 43000, client=other)
    assert c.result == 0 and c.external_port != 43000, c  # without it: another port
    assert st.nat1_forwards()[("tcp", 43000)] == (tb.LAN_HOST_IP, 43000)


def test_nat2_restart_announce_reaches_lan_and_mapping_is_back(make_stack) -> None:
    st = make_stack(mode="cascaded", controld_args=["--pcp-epoch-poll", "1"])
    a = pmap(st, pc.new_nonce(), 44000, 600, 44000)
    assert a.result == 0 and str(a.external_ip) == tb.NAT2_PUBLIC_IP, a
    collector = st.bed.popen("lan", [sys.executable, "-c", _COLLECT, "25"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # start-up announcements carry an epoch counted from controld's start
        restarted = time.time()
        st.bed.restart_nat2()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and a.external_port not in nat2_tcp(st.bed):  # bounded
            time.sleep(0.3)
        assert a.external_port in nat2_tcp(st.bed), st.log("controld")[-3000:]
        time.sleep(1)
    finally:
        collector.terminate()
        out, _ = collector.communicate(timeout=10)
    heard = []
    for line in out.splitlines():
        at, src, hexdata = line.split()
        data = bytes.fromhex(hexdata)
        if data[0] == 2:
            ann = pc.parse_pcp(data)
            heard.append((float(at), src, ann))
    # our reset ANNOUNCE: after the restart, with an epoch that started at it (RFC 6887 §14.1.3, §8.5)
    fresh = [(at, src, x) for at, src, x in heard if at > restarted and x.opcode == 0 and x.result == 0
             and x.epoch <= at - restarted + 0.5]
    assert fresh and all(src == GW for _, src, _ in fresh), heard
    assert st.bed.internet_reaches(44000, a.external_port)


_COLLECT = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5350))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, struct.pack("4s4s", socket.inet_aton("224.0.0.1"),
             socket.inet_aton("0.0.0.0")))
end = time.time() + float(sys.argv[1])
while time.time() < end:
    s.settimeout(max(0.05, end - time.time()))
    try:
        data, peer = s.recvfrom(2048)
    except (socket.timeout, OSError):
        continue
    print(f"{time.time():.3f} {peer[0]} {data.hex()}", flush=True)
"""

