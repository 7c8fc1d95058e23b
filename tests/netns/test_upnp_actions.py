"""IGD:2 actions and the UPnP layer's policy, end to end with two control points
(the LAN host 192.168.1.2 and the ctl namespace 192.168.1.3 on the same bridge):
ownership of DeletePortMappingRange / GetListOfPortMappings (NewManage only for manage
hosts; RFC 6970 §5.8, docs/requirements.md IWF-66), per-host and total quotas
(728; docs/requirements.md IWF-90), miniupnpd-syntax permission
rules (606 under IGD:2), the UPnP error codes of
docs/requirements.md §19 where they apply, stable GetGeneric indices, and real WAN counters."""

from __future__ import annotations

import re

import pytest

from tests.bed import testbed as tb
from tests.bed.fixtures import NsClient, http_request, soap_envelope
from tests.bed.stack import HTTP_PORT, Stack

pytestmark = pytest.mark.netns

WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANCFG = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1"
HOST = f"{tb.ROUTER_LAN_IP}:{HTTP_PORT}"
CTL = tb.CTL_IP


def call(c: NsClient, action: str, args: dict[str, str] | None = None, service: str = WANIP2,
         path: str = "/ctl/WANIPCn") -> tuple[int, bytes]:
    req = http_request("POST", path, HOST, {"SOAPACTION": f'"{service}#{action}"'},
                       soap_envelope(action, args, service))
    resp = c.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, req, timeout=15)[0]
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", resp)
    return (int(m[1]) if m else 0), resp


def code(resp: tuple[int, bytes]) -> int | None:
    m = re.search(rb"<errorCode>(\d+)</errorCode>", resp[1])
    return int(m[1]) if m else (0 if resp[0] == 200 else None)


def out(resp: tuple[int, bytes], name: str) -> str:
    m = re.search(rf"<{name}>(.*?)</{name}>".encode(), resp[1], re.S)
    assert m, resp
    return m[1].decode()


def add(c: NsClient, client: str, eport: int, iport: int | None = None, action: str = "AddPortMapping",
        **over: str) -> tuple[int, bytes]:
    args = {"NewRemoteHost": "", "NewExternalPort": str(eport), "NewProtocol": "TCP",
            "NewInternalPort": str(eport if iport is None else iport), "NewInternalClient": client, "NewEnabled": "1",
            "NewPortMappingDescription": "test", "NewLeaseDuration": "3600", **over}
    return call(c, action, args)


def listing(c: NsClient, manage: str, start: int = 1, end: int = 65535) -> list[tuple[int, str]]:
    r = call(c, "GetListOfPortMappings", {"NewStartPort": str(start), "NewEndPort": str(end), "NewProtocol": "TCP",
                                          "NewManage": manage, "NewNumberOfPorts": "0"})
    if r[0] != 200:
        return []
    doc = out(r, "NewPortListing")
    return sorted((int(p), ip) for p, ip in re.findall(
        r"<p:NewExternalPort>(\d+)</p:NewExternalPort>.*?<p:NewInternalClient>([\d.]+)<", doc, re.S))


def test_igd2_ownership_quotas_permissions_and_codes(make_stack) -> None:
    st: Stack = make_stack(controld_args=[
        "--igd-version", "2", "--max-mappings-per-host", "3", "--max-mappings", "5", "--manage-host", CTL,
        "--permission", "deny 6000-6010 0.0.0.0/0 1-65535",
        "--permission", "allow 1024-65535 192.168.1.0/24 1024-65535"])
    lan, ctl = NsClient(st.bed, "lan"), NsClient(st.bed, "ctl")
    try:
        L = tb.LAN_HOST_IP
        # quotas: 3 per host, 5 in total (728)
        assert [code(add(lan, L, p)) for p in (7001, 7002, 7003)] == [0, 0, 0]
        assert code(add(lan, L, 7004)) == 728
        assert code(add(lan, L, 7001, NewPortMappingDescription="renewed")) == 0  # a refresh is no new mapping
        assert [code(add(ctl, CTL, p)) for p in (7101, 7102)] == [0, 0]
        assert code(add(ctl, CTL, 7103)) == 728

        # listing: own only, unless NewManage=1 from a manage host
        mine = [(p, L) for p in (7001, 7002, 7003)]
        theirs = [(p, CTL) for p in (7101, 7102)]
        assert listing(lan, "1") == mine  # lan asks to manage but may not: own mappings only
        assert listing(ctl, "0") == theirs
        assert listing(ctl, "1") == sorted(mine + theirs)
        assert code(call(lan, "GetListOfPortMappings", {"NewStartPort": "9000", "NewEndPort": "1",
                                                        "NewProtocol": "TCP", "NewManage": "0",
                                                        "NewNumberOfPorts": "0"})) == 733
        assert listing(ctl, "1", 7002, 7101) == [(7002, L), (7003, L), (7101, CTL)]

        # GetGeneric indices are stable: deleting index 1 moves only what came after it
        def generic(i: int) -> str | None:
            r = call(lan, "GetGenericPortMappingEntry", {"NewPortMappingIndex": str(i)})
            return out(r, "NewExternalPort") if r[0] == 200 else None
        before = [generic(i) for i in range(6)]
        assert before == ["7001", "7002", "7003", "7101", "7102", None]
        assert code(call(lan, "GetGenericPortMappingEntry", {"NewPortMappingIndex": "5"})) == 713
        assert code(call(lan, "DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": "7002",
                                                    "NewProtocol": "TCP"})) == 0
        assert [generic(i) for i in range(5)] == ["7001", "7003", "7101", "7102", None]

        # another CP's mapping: 606 under IGD:2 (secure mode, RFC 6970 §5.8 IWF-61)
        assert code(call(lan, "DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": "7101",
                                                    "NewProtocol": "TCP"})) == 606
        # range delete by lan with NewManage=1 (not a manager): only its own go
        assert code(call(lan, "DeletePortMappingRange", {"NewStartPort": "7000", "NewEndPort": "7200",
                                                         "NewProtocol": "TCP", "NewManage": "1"})) == 0
        assert listing(ctl, "1") == theirs
        assert code(call(lan, "DeletePortMappingRange", {"NewStartPort": "7000", "NewEndPort": "7200",
                                                         "NewProtocol": "TCP", "NewManage": "1"})) == 730
        assert code(call(lan, "DeletePortMappingRange", {"NewStartPort": "7200", "NewEndPort": "7000",
                                                         "NewProtocol": "TCP", "NewManage": "0"})) == 733

        # permission rules (miniupnpd syntax): denied external or internal port is 606 under IGD:2
        assert code(add(lan, L, 6005)) == 606
        assert code(add(lan, L, 7010, 80)) == 606  # iport 80: no rule allows it, so denied
        r = add(lan, L, 6005, 6005, action="AddAnyPortMapping")  # steered to an allowed port
        assert r[0] == 200 and not 6000 <= int(out(r, "NewReservedPort")) <= 6010

        # argument errors (docs/requirements.md §19)
        assert code(add(lan, L, 0, 7020)) == 716
        assert code(add(lan, L, 7020, NewRemoteHost="198.20.0.10")) == 726
        assert code(add(lan, L, 7020, 0)) == 732
        assert code(add(lan, L, 7020, NewEnabled="maybe")) == 402
        assert code(add(lan, L, 7020, NewProtocol="SCTP")) == 402
        assert code(add(lan, "192.168.1.77", 7020)) == 606  # secure mode
        assert code(call(lan, "GetSpecificPortMappingEntry", {"NewRemoteHost": "", "NewExternalPort": "7999",
                                                              "NewProtocol": "TCP"})) == 714
        assert code(call(lan, "RequestConnection")) == 606
        assert code(call(lan, "GetStatusInfo", service="urn:schemas-upnp-org:service:WANIPConnection:3")) == 401

        # real counters from natd (ui4), growing with WAN traffic
        def counter(name: str) -> int:
            return int(out(call(lan, f"Get{name}", service=WANCFG, path="/ctl/WANCfg"), f"New{name}"))
        sent = counter("TotalBytesSent")
        pkts = counter("TotalPacketsSent")
        assert 0 < sent < 2**32 and counter("TotalBytesReceived") > 0 and counter("TotalPacketsReceived") > 0
        assert code(add(lan, L, 7030)) == 0  # a PCP MAP goes out on the WAN
        assert counter("TotalBytesSent") > sent and counter("TotalPacketsSent") > pkts
    finally:
        lan.close()
        ctl.close()


def test_igd1_permission_denied_is_718_and_no_v2_actions(make_stack) -> None:
    """IGD:1: a permission refusal is 718 as miniupnpd answers (as miniupnpd does); v2 actions 401."""
    st: Stack = make_stack(mode="nat1-only",
            controld_args=["--permission", "allow 1024-65535 192.168.1.0/24 1024-65535"])
    lan = NsClient(st.bed, "lan")
    try:
        v1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
        args = {"NewRemoteHost": "", "NewExternalPort": "1000", "NewProtocol": "UDP", "NewInternalPort": "1000",
                "NewInternalClient": tb.LAN_HOST_IP, "NewEnabled": "1", "NewPortMappingDescription": "",
                "NewLeaseDuration": "0"}
        assert code(call(lan, "AddPortMapping", args, service=v1)) == 718
        assert code(call(lan, "AddAnyPortMapping", args, service=v1)) == 401
        assert code(call(lan, "AddPortMapping", {**args, "NewExternalPort": "5555", "NewInternalPort": "5555"},
                         service=v1)) == 0
        assert st.nat1_forwards() == {("udp", 5555): (tb.LAN_HOST_IP, 5555)}
    finally:
        lan.close()
