"""What real control points send beyond the tidy case, answered as miniupnpd (or the HTTP
and UDA specs) would: found in review against a running controld and Debian's miniupnpd."""

from __future__ import annotations

import re

import pytest

from tests.bed import testbed as tb
from tests.bed.fixtures import NsClient, http_request, soap_envelope
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
HOST = f"{tb.ROUTER_LAN_IP}:5000"


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


def _code(answer: bytes) -> int | None:
    m = re.search(rb"<errorCode>(\d+)</errorCode>", answer)
    return int(m.group(1)) if m else None


def _post(c: NsClient, body: bytes, soapaction: str, path: str = "/ctl/WANIPCn", extra: str = "",
          version: str = "HTTP/1.1", host: bool = True) -> bytes:
    head = f"POST {path} {version}\r\n" + (f"Host: {HOST}\r\n" if host else "")
    head += f"SOAPACTION: {soapaction}\r\nContent-Type: text/xml\r\n{extra}"
    if "chunked" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    return c.tcp(tb.ROUTER_LAN_IP, 5000, head.encode() + b"\r\n" + body)[0]


def test_real_world_request_shapes(make_stack) -> None:
    st: Stack = make_stack(mode="nat1-only", controld_args=["--igd-version", "2"])
    c = NsClient(st.bed)
    try:
        ext = soap_envelope("GetExternalIPAddress", service=WANIP2)
        # QueryStateVariable (UDA 1.0 §3.2.1), still sent by Windows' UPnP API and libupnp.
        qsv = (b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
               b'<u:QueryStateVariable xmlns:u="urn:schemas-upnp-org:control-1-0"><u:varName>ConnectionStatus'
               b'</u:varName></u:QueryStateVariable></s:Body></s:Envelope>')
        ans = _post(c, qsv, '"urn:schemas-upnp-org:control-1-0#QueryStateVariable"')
        assert _status(ans) == 200 and b"<return>Connected</return>" in ans, ans
        bad_var = qsv.replace(b"ConnectionStatus", b"NoSuchVariable")
        assert _code(_post(c, bad_var, '"urn:schemas-upnp-org:control-1-0#QueryStateVariable"')) == 404
        # An unusable SOAPACTION is 401 Invalid Action, not 402.
        assert _code(_post(c, ext, '"urn:example:nonsense"')) == 401
        # Single quotes and blanks inside them; a :1 header over a :2 body.
        for sa in (f"'{WANIP2}#GetExternalIPAddress'", f'" {WANIP2}#GetExternalIPAddress "',
                   f'"{WANIP1}#GetExternalIPAddress"'):
            assert _status(_post(c, ext, sa)) == 200, sa
        # HTTP/1.0 without Host is allowed (Host is optional there); HTTP/1.1 without it is 400.
        assert _status(_post(c, ext, f'"{WANIP2}#GetExternalIPAddress"', version="HTTP/1.0", host=False)) == 200
        assert _status(_post(c, ext, f'"{WANIP2}#GetExternalIPAddress"', host=False)) == 400
        # Absolute-form request target (RFC 7230 §5.3.2) and a trailing slash.
        for path in (f"http://{HOST}/ctl/WANIPCn", "/ctl/WANIPCn/", "//ctl//WANIPCn"):
            assert _status(_post(c, ext, f'"{WANIP2}#GetExternalIPAddress"', path=path)) == 200, path
        # A chunked body (RFC 7230 §4.1); arguments sloppy clients leave out get miniupnpd's defaults.
        add = soap_envelope("AddPortMapping", {"NewExternalPort": "9100", "NewProtocol": "TCP",
                                               "NewInternalPort": "9100", "NewInternalClient": tb.LAN_HOST_IP},
                            service=WANIP2)
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(add[i:i + 100]), add[i:i + 100]) for i in range(0, len(add), 100))
        ans = _post(c, chunked + b"0\r\n\r\n", f'"{WANIP2}#AddPortMapping"', extra="Transfer-Encoding: chunked\r\n")
        assert _status(ans) == 200, ans
        assert st.nat1_forwards() == {("tcp", 9100): (tb.LAN_HOST_IP, 9100)}
        # Still strict where it matters: without NewInternalPort it is 402.
        no_port = soap_envelope("AddPortMapping", {"NewExternalPort": "9101", "NewProtocol": "TCP",
                                                   "NewInternalClient": tb.LAN_HOST_IP}, service=WANIP2)
        assert _code(_post(c, no_port, f'"{WANIP2}#AddPortMapping"')) == 402
        # A description fetched with an absolute-form GET.
        desc = c.tcp(tb.ROUTER_LAN_IP, 5000, http_request("GET", f"http://{HOST}/rootDesc.xml", HOST))[0]
        assert _status(desc) == 200 and b"InternetGatewayDevice:2" in desc
        # SSDP with bare LF line ends still finds the router.
        search = (b"M-SEARCH * HTTP/1.1\nHOST: 239.255.255.250:1900\nMAN: \"ssdp:discover\"\nMX: 1\n"
                  b"ST: upnp:rootdevice\n\n")
        assert any(b"upnp:rootdevice" in d for _, d in c.udp(tb.ROUTER_LAN_IP, 1900, search, listen=1.5))
    finally:
        c.close()


def test_list_of_port_mappings_is_cut_in_port_order(make_stack) -> None:
    """GetListOfPortMappings sorts before NewNumberOfPorts cuts, so paging misses nothing."""
    st: Stack = make_stack(mode="nat1-only", controld_args=["--igd-version", "2"])
    c = NsClient(st.bed)
    try:
        for port in ("40030", "40020", "40025"):
            body = soap_envelope("AddPortMapping", {
                "NewRemoteHost": "", "NewExternalPort": port, "NewProtocol": "UDP", "NewInternalPort": port,
                "NewInternalClient": tb.LAN_HOST_IP, "NewEnabled": "1", "NewPortMappingDescription": "p",
                "NewLeaseDuration": "0"}, service=WANIP2)
            assert _status(_post(c, body, f'"{WANIP2}#AddPortMapping"')) == 200
        listing = soap_envelope("GetListOfPortMappings", {
            "NewStartPort": "40000", "NewEndPort": "40100", "NewProtocol": "UDP", "NewManage": "0",
            "NewNumberOfPorts": "2"}, service=WANIP2)
        ans = _post(c, listing, f'"{WANIP2}#GetListOfPortMappings"')
        ports = [int(p) for p in re.findall(rb"NewExternalPort>(\d+)<", ans)]
        assert ports == [40020, 40025], ans
    finally:
        c.close()
