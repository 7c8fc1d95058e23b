"""async-upnp-client (Home Assistant's UPnP library) on the LAN host against controld, IGD:2.

SSDP search, description and SCPD parsing in strict mode (non_strict=False: every
value is checked against the declared types and allowed values), IgdDevice actions,
and a GENA subscription that receives the initial event and an event after a mapping
is added (UDA 1.1 §4; PortMappingNumberOfEntries and SystemUpdateID change).
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.bed import testbed as tb
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

SCRIPT = r"""
import asyncio, json, sys
from datetime import timedelta
from ipaddress import IPv4Address
from async_upnp_client.aiohttp import AiohttpNotifyServer, AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.profiles.igd import IgdDevice
from async_upnp_client.search import async_search

LAN = "192.168.1.2"

async def main():
    out = {"search": [], "events": []}
    async def on_search(headers):
        out["search"].append({k.lower(): v for k, v in headers.items() if isinstance(v, str)})
    await async_search(on_search, timeout=2, search_target="ssdp:all", source=(LAN, 0))
    igd = "urn:schemas-upnp-org:device:InternetGatewayDevice"
    location = next(h["location"] for h in out["search"] if h.get("st", "").startswith(igd))
    requester = AiohttpRequester()
    device = await UpnpFactory(requester, non_strict=False).async_create_device(location)
    out["device_type"] = device.device_type
    out["services"] = sorted(s.service_type for s in device.all_services)
    server = AiohttpNotifyServer(requester, source=(LAN, 0))
    await server.async_start_server()
    igd = IgdDevice(device, server.event_handler)
    got = asyncio.Event()
    def on_event(service, variables):
        out["events"].append({"service": service.service_type, "vars": {v.name: str(v.value) for v in variables}})
        got.set()
    igd.on_event = on_event
    await igd.async_subscribe_services()
    for _ in range(50):  # the initial events of the three services
        if len(out["events"]) >= 3:
            break
        await asyncio.sleep(0.1)
    out["initial_count"] = len(out["events"])
    out["external"] = await igd.async_get_external_ip_address()
    status = await igd.async_get_status_info()
    out["status"] = status.connection_status if status else None
    link = await igd.async_get_common_link_properties()
    out["link"] = link.wan_access_type if link else None
    out["bytes_received"] = await igd.async_get_total_bytes_received()
    got.clear()
    await igd.async_add_port_mapping(IPv4Address("0.0.0.0"), 8300, "TCP", 8000, IPv4Address(LAN), True,
                                     "async client", timedelta(seconds=600))
    try:
        await asyncio.wait_for(got.wait(), 5)
    except asyncio.TimeoutError:
        pass
    out["entry"] = [str(x) for x in (await igd.async_get_generic_port_mapping_entry(0))]
    out["eventvars"] = {"entries": igd.port_mapping_number_of_entries, "ip": igd.external_ip_address,
                        "status": igd.connection_status}
    await igd.async_delete_port_mapping(IPv4Address("0.0.0.0"), 8300, "TCP")
    await igd.async_unsubscribe_services()
    await server.async_stop_server()
    await requester.async_close() if hasattr(requester, "async_close") else None
    print(json.dumps(out))

asyncio.run(main())
"""


def test_async_upnp_client_strict_igd2_with_events(make_stack) -> None:
    st: Stack = make_stack(controld_args=["--igd-version", "2"])
    res = st.bed.run("lan", [sys.executable, "-c", SCRIPT], check=False, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    sts = {h["st"] for h in out["search"] if h.get("location", "").startswith(f"http://{tb.ROUTER_LAN_IP}:")}
    assert "urn:schemas-upnp-org:device:InternetGatewayDevice:2" in sts
    assert "urn:schemas-upnp-org:service:WANIPConnection:2" in sts and "upnp:rootdevice" in sts
    assert out["device_type"] == "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
    assert "urn:schemas-upnp-org:service:WANIPConnection:2" in out["services"]
    assert out["external"] == tb.NAT2_PUBLIC_IP and out["status"] == "Connected" and out["link"] == "Ethernet"
    assert isinstance(out["bytes_received"], int) and out["bytes_received"] > 0

    initial = out["events"][:out["initial_count"]]
    wanip = [e["vars"] for e in initial if "WANIPConnection" in e["service"]]
    assert wanip and wanip[0] == {"PossibleConnectionTypes": "IP_Routed", "ConnectionStatus": "Connected",
                                  "ExternalIPAddress": tb.NAT2_PUBLIC_IP, "PortMappingNumberOfEntries": "0",
                                  "SystemUpdateID": wanip[0]["SystemUpdateID"]}
    assert any(e["vars"].get("PhysicalLinkStatus") == "Up" for e in initial)
    later = [e["vars"] for e in out["events"][out["initial_count"]:] if "WANIPConnection" in e["service"]]
    assert later and later[0].get("PortMappingNumberOfEntries") == "1", out["events"]
    assert int(later[0]["SystemUpdateID"]) != int(wanip[0]["SystemUpdateID"])
    assert out["eventvars"]["ip"] == tb.NAT2_PUBLIC_IP and out["eventvars"]["status"] == "Connected"
    assert out["entry"][1:5] == ["8300", "TCP", "8000", tb.LAN_HOST_IP]
