"""controld's device and address options on the wire (issue 11's defaults), seen from the LAN
host: the configured UUID, friendly name, presentation URL and NOTIFY interval in SSDP and the
description, kept when the state dir (RAM on OpenWrt) is lost; the external address without PCP
from ``external_ip`` and from natd's STUN probe against a real STUN server (coturn)."""

from __future__ import annotations

import re
import shutil
import signal

import pytest

from tests.bed import testbed as tb
from tests.bed.coturn import STUN_PORT, start_coturn
from tests.bed.fixtures import NsClient, http_request, soap_envelope
from tests.bed.stack import HTTP_PORT, Stack
from tests.bed.upnp import Sink, out_value, props, wait_for

pytestmark = pytest.mark.netns

HOST = f"{tb.ROUTER_LAN_IP}:{HTTP_PORT}"
U = "2fac1234-31f8-11b4-a222-08002b34c003"
PRESENTATION = "http://192.168.1.1/cgi-bin/luci/admin/services/igdpcp"
SEARCH = (b'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\nMX: 1\r\n'
          b"ST: ssdp:all\r\n\r\n")
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"


def _headers(datagram: bytes) -> dict[str, str]:
    lines = datagram.decode("latin-1").split("\r\n")
    return {k.strip().upper(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if ":" in x)}


def _seen(c: NsClient) -> tuple[set[str], list[str], str]:
    """(USNs answering ssdp:all, the description's UDNs, the description)."""
    usns = {_headers(d)["USN"] for _, d in c.udp(tb.SSDP_GROUP, 1900, SEARCH, listen=1.0)}
    body = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request("GET", "/rootDesc.xml", HOST))[0].decode()
    return usns, re.findall(r"<UDN>(.*?)</UDN>", body), body


def test_configured_identity_and_notify_interval(make_testbed) -> None:
    bed = make_testbed()
    alive = bed.udp_listen("lan", 1900, group=tb.SSDP_GROUP)
    st = Stack(bed, controld_args=["--uuid", U, "--friendly-name", "Den & Co router", "--presentation-url",
                                   PRESENTATION, "--notify-interval", "40"]).start()
    c = NsClient(bed)
    try:
        first = _headers(alive.received(timeout=5))
        assert first["CACHE-CONTROL"] == "max-age=120"  # three NOTIFY intervals
        usns, udns, body = _seen(c)
        assert udns[0] == f"uuid:{U}" and len(set(udns)) == 3
        assert f"uuid:{U}::upnp:rootdevice" in usns and set(udns) <= {u.split("::")[0] for u in usns}
        assert "<friendlyName>Den &amp; Co router</friendlyName>" in body
        assert f"<presentationURL>{PRESENTATION}</presentationURL>" in body

        # a reboot on OpenWrt loses the state dir (RAM): the same config gives the same device
        assert st.stop("controld") == 0
        shutil.rmtree(bed.path("state"))
        st.start_controld()
        again = _seen(c)
        assert again[0] == usns and again[1] == udns
    finally:
        c.close()
        st.close()


def test_external_address_without_pcp_from_option_and_stun(make_testbed) -> None:
    """nat1-only behind NAT2's masquerade: ``external_ip`` is what control points get; with it
    removed (SIGHUP), natd's STUN answer from coturn: NAT2's address, evented over GENA."""
    bed = make_testbed()
    start_coturn(bed)
    conf = bed.path("controld.conf")
    with open(conf, "w") as f:
        f.write("config controld 'controld'\n\toption external_ip '203.0.113.5'\n")
    st = Stack(bed, mode="nat1-only", controld_args=["--config", conf],
               natd_args=["--stun-server", tb.INET_HOST_IP, "--stun-port", str(STUN_PORT)]).start()
    c = NsClient(bed)
    sink = Sink(bed, 4000)
    try:
        assert "ExternalIPAddress = 203.0.113.5" in st.upnpc("-s").stdout
        resp = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request(
            "POST", "/ctl/WANIPCn", HOST, {"SOAPACTION": f'"{WANIP1}#GetExternalIPAddress"'},
            soap_envelope("GetExternalIPAddress", {}, WANIP1)))[0]
        assert out_value(resp, "NewExternalIPAddress") == "203.0.113.5"
        sub = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request(
            "SUBSCRIBE", "/evt/WANIPCn", HOST, {"NT": "upnp:event", "CALLBACK": f"<http://{tb.LAN_HOST_IP}:4000/e>",
                                               "TIMEOUT": "Second-300"}))[0]
        assert sub.startswith(b"HTTP/1.1 200")
        ev = sink.event()
        assert ev and props(ev["body"])["ExternalIPAddress"] == "203.0.113.5"

        # the override goes (SIGHUP): natd's STUN probe tells what the Internet sees, NAT2's address
        with open(conf, "w") as f:
            f.write("config controld 'controld'\n")
        st.procs["controld"].send_signal(signal.SIGHUP)
        values: list[str | None] = []  # "" first if natd's (repeated, every 10 s) STUN answer has not come in yet
        while (ev := sink.event(timeout=25)) is not None and len(values) < 4:
            values.append(props(ev["body"]).get("ExternalIPAddress"))
            if values[-1] == tb.NAT2_PUBLIC_IP:
                break
        assert values and values[-1] == tb.NAT2_PUBLIC_IP and set(values) <= {"", tb.NAT2_PUBLIC_IP}, values
        assert f"ExternalIPAddress = {tb.NAT2_PUBLIC_IP}" in st.upnpc("-s").stdout
        assert wait_for(lambda: "STUN" in st.log("controld"), 5)
    finally:
        sink.proc.kill()
        c.close()
        st.close()
