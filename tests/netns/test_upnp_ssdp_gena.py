"""SSDP discovery and GENA eventing on the wire (UDA 1.1 §1 and §4; the checks that
miniupnpc does not cover), from the LAN host's namespace."""

from __future__ import annotations

import time

import pytest

from tests.bed import testbed as tb
from tests.bed.fixtures import NsClient, http_request, soap_envelope
from tests.bed.stack import HTTP_PORT, Stack
from tests.bed.upnp import Sink
from tests.bed.upnp import props as _props

pytestmark = pytest.mark.netns

HOST = f"{tb.ROUTER_LAN_IP}:{HTTP_PORT}"
LOCATION = f"http://{tb.ROUTER_LAN_IP}:{HTTP_PORT}/rootDesc.xml"


def msearch(st: str, mx: int = 1) -> bytes:
    return (f'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\nMX: {mx}\r\n'
            f"ST: {st}\r\n\r\n").encode()


def headers(datagram: bytes) -> dict[str, str]:
    lines = datagram.decode("latin-1").split("\r\n")
    return {k.strip().upper(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if ":" in x)}


def test_ssdp_answers_and_notify(make_testbed) -> None:
    bed = make_testbed()
    alive = bed.udp_listen("lan", 1900, group=tb.SSDP_GROUP)
    st = Stack(bed, controld_args=["--igd-version", "2"]).start()
    c = NsClient(bed)
    try:
        # NOTIFY ssdp:alive at start, with every UDA 1.1 header
        first = alive.received(timeout=5)
        h = headers(first)
        assert first.startswith(b"NOTIFY * HTTP/1.1") and h["NTS"] == "ssdp:alive"
        assert h["CACHE-CONTROL"] == "max-age=1800" and h["LOCATION"] == LOCATION
        assert h["BOOTID.UPNP.ORG"].isdigit() and h["CONFIGID.UPNP.ORG"].isdigit() and "UPnP/1.1" in h["SERVER"]

        # ssdp:all: one answer per type (11 for IGD:2 with WANIPv6FirewallControl), within MX, one LOCATION
        t0 = time.monotonic()
        answers = c.udp(tb.SSDP_GROUP, 1900, msearch("ssdp:all", mx=1), listen=0.8)
        sts = [headers(d)["ST"] for _, d in answers]
        assert len(sts) == len(set(sts)) == 11, sts
        assert {"upnp:rootdevice", "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
                "urn:schemas-upnp-org:service:WANIPConnection:2", "urn:schemas-upnp-org:service:Layer3Forwarding:1",
                "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1"} <= set(sts)
        assert all(headers(d)["LOCATION"] == LOCATION and headers(d)["BOOTID.UPNP.ORG"] == h["BOOTID.UPNP.ORG"]
                   for _, d in answers)
        assert all(a == tb.ROUTER_LAN_IP for a, _ in answers) and time.monotonic() - t0 < 3
        root_uuid = next(headers(d)["USN"] for _, d in answers if headers(d)["ST"] == "upnp:rootdevice")
        root_uuid = root_uuid.split("::")[0]

        # a lower version is echoed (UDA 1.1 §1.3.3); uuid search; unknown and higher versions get nothing
        v1 = c.udp(tb.SSDP_GROUP, 1900, msearch("urn:schemas-upnp-org:device:InternetGatewayDevice:1"), listen=0.8)
        assert [headers(d)["ST"] for _, d in v1] == ["urn:schemas-upnp-org:device:InternetGatewayDevice:1"]
        assert [headers(d)["USN"] for _, d in c.udp(tb.SSDP_GROUP, 1900, msearch(root_uuid), listen=0.8)] == [root_uuid]
        assert c.udp(tb.SSDP_GROUP, 1900, msearch("urn:schemas-upnp-org:service:WANIPConnection:3"), listen=0.8) == []
        assert c.udp(tb.SSDP_GROUP, 1900, msearch("urn:example:device:Toaster:1"), listen=0.8) == []
    finally:
        c.close()
    # rate limit per source: a burst of 40 searches from a fresh source gets at most the burst answered
    c2 = NsClient(bed, "ctl")
    try:
        burst = c2.udp(tb.ROUTER_LAN_IP, 1900, msearch("upnp:rootdevice"), listen=1.5, repeat=40)
        assert 1 <= len(burst) <= 12, len(burst)
    finally:
        c2.close()
    # ssdp:byebye on shutdown
    bye = bed.udp_listen("lan", 1900, group=tb.SSDP_GROUP)
    time.sleep(0.2)
    assert st.stop("controld") == 0
    assert headers(bye.received(timeout=3)).get("NTS") == "ssdp:byebye"
    st.close()


def test_gena_subscribe_events_and_limits(make_stack) -> None:
    st: Stack = make_stack(controld_args=["--igd-version", "2"])
    c = NsClient(st.bed)
    sink = Sink(st.bed, 4000)
    try:
        def gena(method: str, path: str = "/evt/WANIPCn", **hdrs: str) -> tuple[int, dict[str, str]]:
            resp = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request(method, path, HOST, hdrs))[0]
            status = int(resp[9:12]) if resp[:5] == b"HTTP/" else 0
            return status, headers(resp.partition(b"\r\n\r\n")[0])

        # CallStranger (CVE-2020-12695): callbacks anywhere but the subscriber are refused with 412
        for cb in (f"<http://{tb.INET_HOST_IP}:80/>", f"<http://{tb.CTL_IP}:4000/>", "<http://attacker.example/>"):
            assert gena("SUBSCRIBE", NT="upnp:event", CALLBACK=cb)[0] == 412, cb
        assert gena("SUBSCRIBE", NT="upnp:event", CALLBACK=f"<http://{tb.LAN_HOST_IP}:4000/e>",
                    SID="uuid:x")[0] == 400
        assert gena("SUBSCRIBE", "/evt/Nope", NT="upnp:event",
                    CALLBACK=f"<http://{tb.LAN_HOST_IP}:4000/e>")[0] == 404

        status, h = gena("SUBSCRIBE", NT="upnp:event", CALLBACK=f"<http://{tb.LAN_HOST_IP}:4000/e>",
                         TIMEOUT="Second-1800")
        assert status == 200 and h["SID"].startswith("uuid:") and h["TIMEOUT"] == "Second-1800"
        sid = h["SID"]
        ev = sink.event()
        assert ev and ev["line"] == "NOTIFY /e HTTP/1.1" and ev["h"]["SID"] == sid and ev["h"]["SEQ"] == "0"
        assert ev["h"]["NT"] == "upnp:event" and ev["h"]["NTS"] == "upnp:propchange"
        initial = _props(ev["body"])
        assert initial == {"PossibleConnectionTypes": "IP_Routed", "ConnectionStatus": "Connected",
                           "ExternalIPAddress": tb.NAT2_PUBLIC_IP, "PortMappingNumberOfEntries": "0",
                           "SystemUpdateID": initial["SystemUpdateID"]}

        add = {"NewRemoteHost": "", "NewExternalPort": "8400", "NewProtocol": "TCP", "NewInternalPort": "8400",
               "NewInternalClient": tb.LAN_HOST_IP, "NewEnabled": "1", "NewPortMappingDescription": "evt",
               "NewLeaseDuration": "600"}
        svc = "urn:schemas-upnp-org:service:WANIPConnection:2"
        c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request("POST", "/ctl/WANIPCn", HOST, {
            "SOAPACTION": f'"{svc}#AddPortMapping"'}, soap_envelope("AddPortMapping", add, svc)))
        ev = sink.event()
        assert ev and ev["h"]["SEQ"] == "1"
        changed = _props(ev["body"])
        assert changed["PortMappingNumberOfEntries"] == "1"
        assert int(changed["SystemUpdateID"]) != int(initial["SystemUpdateID"])  # IGD:2: changes with mappings
        assert "ExternalIPAddress" not in changed  # only what changed

        # renewal keeps the SID; an unknown SID is 412
        status, h = gena("SUBSCRIBE", SID=sid, TIMEOUT="Second-600")
        assert status == 200 and h["SID"] == sid and h["TIMEOUT"] == "Second-600"
        assert gena("SUBSCRIBE", SID="uuid:00000000-0000-0000-0000-000000000000")[0] == 412

        # bounded per host: 8 in all, the 9th is refused
        extra = [gena("SUBSCRIBE", "/evt/WANCfg", NT="upnp:event", CALLBACK=f"<http://{tb.LAN_HOST_IP}:4000/x>")
                 for _ in range(8)]
        assert [s for s, _ in extra] == [200] * 7 + [503]
        for _ in range(7):  # the WANCfg initial events
            assert sink.event() is not None, st.log("controld")[-2500:]

        # UNSUBSCRIBE: no more events for that SID
        assert gena("UNSUBSCRIBE", SID=sid)[0] == 200
        assert gena("UNSUBSCRIBE", SID=sid)[0] == 412
        c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request("POST", "/ctl/WANIPCn", HOST, {
            "SOAPACTION": f'"{svc}#DeletePortMapping"'}, soap_envelope("DeletePortMapping", {
                "NewRemoteHost": "", "NewExternalPort": "8400", "NewProtocol": "TCP"}, svc)))
        assert sink.event(timeout=1.0) is None
    finally:
        c.close()
        sink.proc.kill()
