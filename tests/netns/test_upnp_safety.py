"""UPnP hardening, end to end against a running controld (miniupnpd's HTTP layer
hardening): Host must be an IP literal (DNS rebinding),
bounded headers/bodies, request deadline, connection cap, XML without DTDs/entities and
with a depth limit, LAN sources only; and a property-based test that throws random and
mutated SOAP envelopes and checks every answer is a SOAP fault or a 4xx, and that the
daemon still answers correctly afterwards."""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from tests.bed import testbed as tb
from tests.bed.fixtures import NsClient, http_request, soap_envelope
from tests.bed.stack import HTTP_PORT, Stack

pytestmark = pytest.mark.netns

HOST = f"{tb.ROUTER_LAN_IP}:{HTTP_PORT}"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"


def _status(resp: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", resp)
    return int(m[1]) if m else 0


def _error_code(resp: bytes) -> int | None:
    m = re.search(rb"<errorCode>(\d+)</errorCode>", resp)
    return int(m[1]) if m else None


def _post(c: NsClient, action: str, body: bytes, service: str = WANIP2, path: str = "/ctl/WANIPCn",
          extra: dict[str, str] | None = None) -> bytes:
    headers = {"SOAPACTION": f'"{service}#{action}"', "Content-Type": 'text/xml; charset="utf-8"', **(extra or {})}
    return c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request("POST", path, HOST, headers, body))[0]


BOMB = b"""<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">]><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">
<s:Body><u:GetExternalIPAddress xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2">&lol3;
</u:GetExternalIPAddress></s:Body></s:Envelope>"""
XXE = b"""<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<u:GetExternalIPAddress xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2">&xxe;</u:GetExternalIPAddress>
</s:Body></s:Envelope>"""


def test_http_hardening(make_stack) -> None:
    st: Stack = make_stack(controld_args=["--igd-version", "2"])
    c = NsClient(st.bed)
    try:
        ok = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request("GET", "/rootDesc.xml", HOST))[0]
        assert _status(ok) == 200 and b"InternetGatewayDevice:2" in ok
        # DNS rebinding: a name in Host is refused; so is a missing Host
        for host in ("router.example", "192.168.1.1.nip.io:5000", ""):
            resp = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request("GET", "/rootDesc.xml", host))[0]
            assert _status(resp) == 403, host
        resp = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request("GET", "/ctl/WANIPCn", HOST))[0]
        assert _status(resp) == 405 and b"Allow: POST" in resp
        assert _status(c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request("GET", "/etc/passwd", HOST))[0]) == 404
        assert _status(c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, http_request("DELETE", "/", HOST))[0]) == 405
        # size limits: headers, declared body, missing length
        big = http_request("GET", "/rootDesc.xml", HOST, {"X-Pad": "a" * 9000})
        assert _status(c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, big)[0]) == 431
        huge = http_request("POST", "/ctl/WANIPCn", HOST, {"SOAPACTION": f'"{WANIP2}#GetStatusInfo"',
                                                          "Content-Length": "10000000"})
        assert _status(c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, huge.replace(b"Content-Length: 0\r\n", b""))[0]) == 413
        nolen = b"POST /ctl/WANIPCn HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n"
        assert _status(c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, nolen)[0]) == 411
        assert _status(c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, b"\x00\xff garbage\r\n\r\n")[0]) == 400
        # XML: entity expansion and external entities are refused, depth and size bounded
        for body in (BOMB, XXE, soap_envelope("GetStatusInfo", service=WANIP2).replace(
                b"<s:Body>", b"<s:Body>" + b"<a>" * 100).replace(b"</s:Body>", b"</a>" * 100 + b"</s:Body>")):
            resp = _post(c, "GetExternalIPAddress" if b"&" in body else "GetStatusInfo", body)
            assert _status(resp) == 500 and _error_code(resp) == 402, resp[:300]
            assert b"root:" not in resp
        # unknown action, and a :2 action on a :1 SOAPACTION is still the v2 service's business
        assert _error_code(_post(c, "Frobnicate", soap_envelope("Frobnicate", service=WANIP2))) == 401
        # Expect: 100-continue is honoured (miniupnpd does too)
        resp = _post(c, "GetStatusInfo", soap_envelope("GetStatusInfo", service=WANIP2),
                     extra={"Expect": "100-continue"})
        assert resp.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
        # request deadline: a client that stops mid-headers gets 408, not a hung connection
        data, _, elapsed = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, b"GET /rootDesc.xml HTTP/1.1\r\nHost: ", timeout=9)
        assert _status(data) == 408 and elapsed < 7.5
    finally:
        c.close()

    # connection cap per host (controld.upnp.fairness): of 64 idle connections from one host the
    # first MAX_PER_HOST are held, the next are answered 503 at once; then it recovers
    script = r"""
import socket, sys, time
held = []
for _ in range(64):
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); held.append(s)
time.sleep(0.3)
x = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
try:
    x.sendall(b"GET /rootDesc.xml HTTP/1.1\r\nHost: " + sys.argv[1].encode() + b"\r\n\r\n")
    over = x.recv(100)
except ConnectionResetError:
    over = b""  # closed by the server (when over MAX_REFUSING)
for s in held: s.close()
time.sleep(0.3)
y = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
y.sendall(b"GET /rootDesc.xml HTTP/1.1\r\nHost: " + sys.argv[1].encode() + b"\r\n\r\n")
print(repr(over), repr(y.recv(15)))
"""
    res = st.bed.run("lan", [sys.executable, "-c", script, tb.ROUTER_LAN_IP, str(HTTP_PORT)], timeout=30)
    out = res.stdout.strip()
    assert out.startswith("b'HTTP/1.1 503 ") and out.endswith(" b'HTTP/1.1 200 OK'"), res.stdout + res.stderr


def test_sources_outside_the_lan_are_ignored(make_stack) -> None:
    """A host on another subnet (routable to the router, not a configured LAN) gets neither
    HTTP nor SSDP answers; a LAN host does (as miniupnpd does with its listening_ip list)."""
    st: Stack = make_stack()
    st.bed.run("lan", ["ip", "addr", "add", "192.168.2.2/24", "dev", tb.LAN_HOST_IF])
    st.bed.run("cpe", ["ip", "addr", "add", "192.168.2.1/24", "dev", tb.ROUTER_LAN_IF])
    c = NsClient(st.bed)
    try:
        get = http_request("GET", "/rootDesc.xml", HOST)
        data, err, _ = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, get, source="192.168.2.2", timeout=3)
        assert data == b"", (data, err)
        assert _status(c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, get, source=tb.LAN_HOST_IP)[0]) == 200
        search = (b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\n"
                  b"MX: 1\r\nST: upnp:rootdevice\r\n\r\n")
        assert c.udp(tb.ROUTER_LAN_IP, 1900, search, listen=1.0, source="192.168.2.2") == []
        # two root devices by default, IGD:1 and IGD:2 (docs/upnp.md "Both IGD versions by default")
        assert len(c.udp(tb.ROUTER_LAN_IP, 1900, search, listen=1.0, source=tb.LAN_HOST_IP)) == 2
    finally:
        c.close()


# --- property-based: random and mutated SOAP envelopes ----------------------------------------

ACTIONS = ["AddPortMapping", "AddAnyPortMapping", "DeletePortMapping", "DeletePortMappingRange",
           "GetSpecificPortMappingEntry", "GetGenericPortMappingEntry", "GetListOfPortMappings",
           "GetExternalIPAddress", "GetStatusInfo", "SetConnectionType", "Bogus"]
ARGS = ["NewRemoteHost", "NewExternalPort", "NewProtocol", "NewInternalPort", "NewInternalClient", "NewEnabled",
        "NewPortMappingDescription", "NewLeaseDuration", "NewPortMappingIndex", "NewStartPort", "NewEndPort",
        "NewManage", "NewNumberOfPorts"]
_values = hs.one_of(hs.sampled_from(["", "0", "1", "65535", "65536", "-1", "TCP", "udp", tb.LAN_HOST_IP,
                                      "192.168.1.200", "*", "4294967296", "9" * 30]),
                    hs.text(max_size=40))


@hs.composite
def envelopes(draw: hs.DrawFn) -> tuple[str, bytes]:
    action = draw(hs.sampled_from(ACTIONS))
    args = draw(hs.dictionaries(hs.sampled_from(ARGS), _values, max_size=9))
    body = soap_envelope(action, args, service=WANIP2)
    how = draw(hs.sampled_from(["as is", "flip", "cut", "insert", "random"]))
    if how == "flip" and body:
        i = draw(hs.integers(0, len(body) - 1))
        body = body[:i] + bytes([draw(hs.integers(0, 255))]) + body[i + 1:]
    elif how == "cut":
        body = body[:draw(hs.integers(0, len(body)))]
    elif how == "insert":
        i = draw(hs.integers(0, len(body)))
        body = body[:i] + draw(hs.sampled_from([b"<", b">", b"&", b"]]>", b"<!DOCTYPE a>", b"<x>" * 20,
                                                b"\x00", b"&#0;", b"<?pi?>"])) + body[i:]
    elif how == "random":
        body = draw(hs.binary(max_size=300))
    soapaction = draw(hs.one_of(hs.just(f'"{WANIP2}#{action}"'), hs.text(max_size=80).filter(
        lambda t: "\r" not in t and "\n" not in t)))
    return soapaction, body


def _well_formed_answer(resp: bytes) -> bool:
    status = _status(resp)
    if status == 200:
        ET.fromstring(resp.partition(b"\r\n\r\n")[2])
        return True
    if status == 500:
        return _error_code(resp) is not None
    return 400 <= status < 500


def test_random_and_mutated_soap_never_break_controld(make_stack) -> None:
    st: Stack = make_stack(controld_args=["--igd-version", "2"])
    c = NsClient(st.bed)
    try:
        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(envelopes())
        def throw(case: tuple[str, bytes]) -> None:
            soapaction, body = case
            head = http_request("POST", "/ctl/WANIPCn", HOST, {"SOAPACTION": soapaction.encode(
                "utf-8", "replace").decode("latin-1")}, body)
            resp, err, _ = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, head, timeout=5)
            assert _well_formed_answer(resp), (soapaction, body, resp[:300], err)

        throw()
        # still answering, and answering correctly
        resp = _post(c, "GetExternalIPAddress", soap_envelope("GetExternalIPAddress", service=WANIP2))
        assert _status(resp) == 200 and tb.NAT2_PUBLIC_IP.encode() in resp
        assert "Found valid IGD" in st.upnpc("-s").stdout
        assert st.procs["controld"].poll() is None
    finally:
        c.close()
