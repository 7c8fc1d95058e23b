"""Every control point served in the DEFAULT configuration (docs/upnp.md "Both IGD versions by
default"): an IGD:1 and an IGD:2 root device over one mapping table.

On the wire (SSDP: which device answers which search), with real clients: async-upnp-client
searching only for InternetGatewayDevice:2 (as a P2P port mapper does) maps a port that carries
bytes through both NATs; upnpc's own discovery (IGD:1) sees that mapping and deletes it;
upnpc against the IGD:2 device's description URL uses the IGD:2 actions.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.bed import testbed as tb
from tests.bed.fixtures import NsClient, http_request, soap_call
from tests.bed.stack import HTTP_PORT, Stack
from tests.bed.upnp import Sink, error_code, out_value, props

pytestmark = pytest.mark.netns

IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:"
BASE = f"http://{tb.ROUTER_LAN_IP}:{HTTP_PORT}"


def msearch(st: str, agent: str = "") -> bytes:
    ua = f"USER-AGENT: {agent}\r\n" if agent else ""
    return (f'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\nMX: 1\r\n'
            f"ST: {st}\r\n{ua}\r\n").encode()


def headers(datagram: bytes) -> dict[str, str]:
    lines = datagram.decode("latin-1").split("\r\n")
    return {k.strip().upper(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if ":" in x)}


ASYNC_IGD2_ONLY = r"""
import asyncio, json, sys
from datetime import timedelta
from ipaddress import IPv4Address, IPv6Address
from async_upnp_client.exceptions import UpnpActionResponseError
from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.profiles.igd import IgdDevice
from async_upnp_client.search import async_search

LAN = "192.168.1.2"
IGD2 = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"

async def main():
    found = []
    async def on_search(headers):
        found.append({k.lower(): v for k, v in headers.items() if isinstance(v, str)})
    await async_search(on_search, timeout=2, search_target=IGD2, source=(LAN, 0))
    out = {"found": found}
    if not found:
        print(json.dumps(out)); return
    requester = AiohttpRequester()
    device = await UpnpFactory(requester, non_strict=False).async_create_device(found[0]["location"])
    out["device_type"] = device.device_type
    out["services"] = sorted(s.service_type for s in device.all_services)
    igd = IgdDevice(device, None)
    out["external"] = await igd.async_get_external_ip_address()
    await igd.async_add_port_mapping(IPv4Address("0.0.0.0"), 8400, "TCP", 8000, IPv4Address(LAN), True,
                                     "p2p", timedelta(seconds=600))
    out["entry"] = [str(x) for x in (await igd.async_get_generic_port_mapping_entry(0))]
    fw = await igd.async_get_firewall_status()
    out["firewall"] = [fw.firewall_enabled, fw.inbound_pinhole_allowed]
    try:
        await igd.async_add_pinhole(IPv6Address("::"), 0, IPv6Address("2001:db8:1::2"), 8080, 6,
                                    timedelta(seconds=600))
        out["pinhole"] = "added"
    except UpnpActionResponseError as exc:
        out["pinhole"] = exc.error_code
    print(json.dumps(out))

asyncio.run(main())
"""


def test_default_answers_each_version_with_its_own_root_device(make_stack) -> None:
    st: Stack = make_stack()
    c = NsClient(st.bed)
    try:
        def ask(target: str, agent: str = "") -> list[dict[str, str]]:
            return [headers(d) for _, d in c.udp(tb.SSDP_GROUP, 1900, msearch(target, agent), listen=0.8)]

        v2 = ask(IGD + "2")
        assert [(h["ST"], h["LOCATION"]) for h in v2] == [(IGD + "2", f"{BASE}/igd2/rootDesc.xml")]
        v1 = ask(IGD + "1", "Microsoft-Windows/10.0 UPnP/1.0")
        assert [(h["ST"], h["LOCATION"]) for h in v1] == [(IGD + "1", f"{BASE}/rootDesc.xml")]
        wanip1 = ask("urn:schemas-upnp-org:service:WANIPConnection:1")
        assert [h["LOCATION"] for h in wanip1] == [f"{BASE}/rootDesc.xml"]
        fw = ask("urn:schemas-upnp-org:service:WANIPv6FirewallControl:1")
        assert [h["LOCATION"] for h in fw] == [f"{BASE}/igd2/rootDesc.xml"]
        roots = ask("upnp:rootdevice")
        assert sorted(h["LOCATION"] for h in roots) == [f"{BASE}/igd2/rootDesc.xml", f"{BASE}/rootDesc.xml"]
        assert len({h["USN"] for h in roots}) == 2  # two UDNs, one description each
        # each LOCATION serves the version it was found by; Windows gets IGD:1 wherever it looks
        def get(path: str, agent: str = "upnpc") -> bytes:
            raw = http_request("GET", path, f"{tb.ROUTER_LAN_IP}:{HTTP_PORT}", {"User-Agent": agent})
            answer = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, raw)[0]
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            return answer

        body = get("/igd2/rootDesc.xml")
        assert (IGD + "2").encode() in body and b"WANIPv6FirewallControl:1" in body
        body = get("/rootDesc.xml")
        assert (IGD + "1").encode() in body and b":2<" not in body
        assert (IGD + "1").encode() in get("/igd2/rootDesc.xml", "Microsoft-Windows/10.0 UPnP/1.0")
    finally:
        c.close()


def test_igd2_only_client_and_igd1_client_share_one_table(make_stack) -> None:
    st: Stack = make_stack()
    res = st.bed.run("lan", [sys.executable, "-c", ASYNC_IGD2_ONLY], check=False, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert [h["location"] for h in out["found"]] == [f"{BASE}/igd2/rootDesc.xml"], out["found"]
    assert out["device_type"] == IGD + "2"
    assert {"urn:schemas-upnp-org:service:WANIPConnection:2",
            "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"} <= set(out["services"])
    assert out["external"] == tb.NAT2_PUBLIC_IP
    assert out["entry"][1:5] == ["8400", "TCP", "8000", tb.LAN_HOST_IP]
    assert st.bed.internet_reaches(8000, 8400, b"igd2-only client")
    # its pinhole calls reach WANIPv6FirewallControl: no IPv6 firewall under natd yet -> 702
    assert out["firewall"] == [False, False] and out["pinhole"] == 702

    # upnpc with its own discovery (IGD:1 first) finds the IGD:1 device and sees the same row
    found = st.bed.run("lan", ["upnpc", "-l"], check=False, timeout=30)
    assert f"desc: {BASE}/rootDesc.xml" in found.stdout, found.stdout
    assert "8400->192.168.1.2:8000" in found.stdout.replace(" ", ""), found.stdout
    gone = st.bed.run("lan", ["upnpc", "-d", "8400", "TCP"], check=False, timeout=30)
    assert gone.returncode == 0, gone.stdout
    assert ("tcp", 8400) not in st.nat1_forwards()
    assert not st.bed.internet_reaches(8000, 8400, b"closed")

    # upnpc pointed at the IGD:2 description uses the IGD:2 actions (AddAnyPortMapping, -L)
    v2 = st.bed.run("lan", ["upnpc", "-u", f"{BASE}/igd2/rootDesc.xml", "-r", "8500", "TCP"],
                    check=False, timeout=30)
    assert v2.returncode == 0 and "8500" in v2.stdout, v2.stdout
    listing = st.bed.run("lan", ["upnpc", "-u", f"{BASE}/igd2/rootDesc.xml", "-L"], check=False, timeout=30)
    assert "8500" in listing.stdout, listing.stdout


def test_pinhole_service_in_the_bed_before_natd_has_pinholes(make_stack) -> None:
    """WANIPv6FirewallControl:1 on the IGD:2 device of the default configuration: while natd has
    no IPv6 firewall (docs/upnp.md "IPv6 pinholes"), upnpc -A gets 702 FirewallDisabled, the
    status says so, and a GENA subscriber is told FirewallEnabled=0, InboundPinholeAllowed=0."""
    st: Stack = make_stack()
    fw = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
    added = st.bed.run("lan", ["upnpc", "-u", f"{BASE}/igd2/rootDesc.xml", "-A", "empty", "0",
                               "2001:db8:1::2", "8080", "TCP", "600"], check=False, timeout=30)
    assert "702" in added.stdout, added.stdout
    status, body = soap_call(st, "GetFirewallStatus", {}, service=fw, path="/igd2/ctl/IP6FCtl")
    assert status == 200 and out_value(body, "FirewallEnabled") == "0", body
    assert out_value(body, "InboundPinholeAllowed") == "0"
    status, body = soap_call(st, "DeletePinhole", {"UniqueID": "1"}, service=fw, path="/igd2/ctl/IP6FCtl")
    assert status == 500 and error_code(body) == 704
    # an IGD:1 control URL does not serve it (a service type not served at a path: 402, as before)
    status, body = soap_call(st, "GetFirewallStatus", {}, service=fw, path="/ctl/WANIPCn")
    assert status == 500 and error_code(body) == 402

    c = NsClient(st.bed)
    sink = Sink(st.bed, 4000)
    try:
        raw = http_request("SUBSCRIBE", "/igd2/evt/IP6FCtl", f"{tb.ROUTER_LAN_IP}:{HTTP_PORT}",
                           {"NT": "upnp:event", "CALLBACK": f"<http://{tb.LAN_HOST_IP}:4000/e>"})
        assert c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, raw)[0].startswith(b"HTTP/1.1 200")
        ev = sink.event()
        assert ev is not None and props(ev["body"]) == {"FirewallEnabled": "0", "InboundPinholeAllowed": "0"}
    finally:
        c.close()
        sink.proc.kill()
        sink.proc.wait()


BINDING = r"""
import json, sys, miniupnpc
v2 = miniupnpc.UPnP()
out = {"igd2": v2.selectigd(sys.argv[1])}
out["any"] = v2.addanyportmapping(8600, "UDP", "192.168.1.2", 8000, "binding v2", "")
v1 = miniupnpc.UPnP()
v1.discoverdelay = 1000
v1.discover()
out["igd1"] = v1.selectigd()
out["seen_by_v1"] = list(v1.getspecificportmapping(out["any"], "UDP") or [])
out["deleted_by_v1"] = v1.deleteportmapping(out["any"], "UDP")
print(json.dumps(out))
"""


def test_miniupnpc_binding_on_either_device(make_stack) -> None:
    """The miniupnpc binding on the IGD:2 device (AddAnyPortMapping, an IGD:2 action) and on the
    IGD:1 device its own discovery finds: one table, so v1 reads and deletes what v2 made."""
    st: Stack = make_stack()
    res = st.bed.run("lan", [sys.executable, "-c", BINDING, f"{BASE}/igd2/rootDesc.xml"], check=False, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["igd2"].startswith(f"{BASE}/igd2/ctl/WANIPCn") and out["igd1"].startswith(f"{BASE}/ctl/WANIPCn")
    assert out["any"] == 8600 and out["seen_by_v1"][:3] == [tb.LAN_HOST_IP, 8000, "binding v2"]
    assert out["deleted_by_v1"] is True and ("udp", 8600) not in st.nat1_forwards()
