"""Unit tests of the UPnP layer's sans-I/O parts: permission rules, GENA subscriptions,
SSDP matching and rate limit, descriptions (IGD:1/IGD:2, Microsoft downgrade), SOAP CDATA.
No namespaces; the behaviour a user sees end to end is in tests/test_upnp_*.py and
tests/test_clients_*.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from controld.core.policy import Permissions, RuleError, parse_rule
from controld.upnp import gena, soap, ssdp
from controld.upnp.description import IGD2_PREFIX, Device, gateway, scpd_xml, wants_igd1
from controld.upnp.xmltext import escape

SCPD_NS = "{urn:schemas-upnp-org:service-1-0}"


# --- permissions (as miniupnpd does) --------------------------------------------------------

def test_rule_syntax_as_miniupnpd_writes_it() -> None:
    r = parse_rule("allow 1024-65535 192.168.1.0/24 1024-65535")
    assert str(r) == "allow 1024-65535 192.168.1.0/24 1024-65535"
    assert str(parse_rule("deny 0-65535 0.0.0.0/0 0-65535")) == "deny 0-65535 0.0.0.0/0 0-65535"
    # dotted mask, bare address (/32), single ports, host bits masked off as miniupnpd does
    assert str(parse_rule("allow 80 192.168.1.7/255.255.255.0 8080")) == "allow 80 192.168.1.0/24 8080"
    assert str(parse_rule("DENY 22 10.0.0.1 22")) == "deny 22 10.0.0.1/32 22"
    assert parse_rule('allow 1-65535 0.0.0.0/0 1-65535 "^game"').regex is not None


@pytest.mark.parametrize("bad", [
    "permit 1 1.2.3.4 1", "allow 1-2 1.2.3.4", "allow 5-1 1.2.3.4 1", "allow 1 1.2.3.4 70000",
    "allow 1 1.2.3.400 1", "allow 1 1.2.3.4/33 1", 'allow 1 1.2.3.4 1 "(unclosed"', 'allow 1 1.2.3.4 1 "x',
    "allow a-b 1.2.3.4 1",
])
def test_bad_rules_are_refused_with_the_line(bad: str) -> None:
    with pytest.raises(RuleError):
        parse_rule(bad)


def test_first_match_wins_and_no_match_denies() -> None:
    p = Permissions.parse(["# OpenWrt's defaults", "deny 6000 0.0.0.0/0 1-65535",
                           "allow 1024-65535 192.168.1.0/24 1024-65535", 'deny 1-65535 0.0.0.0/0 1-65535 "evil"',
                           "allow 1-1023 192.168.1.2 1-65535", ""])
    assert p.allowed(8080, "192.168.1.2", 8080)
    assert not p.allowed(6000, "192.168.1.2", 8080)  # first rule
    assert not p.allowed(8080, "192.168.1.2", 80)  # iport below 1024, not allowed by a later rule
    assert p.allowed(80, "192.168.1.2", 80, "evil app") is False  # the regex rule comes first
    assert p.allowed(80, "192.168.1.2", 80, "fine app")
    assert not p.allowed(8080, "10.0.0.5", 8080)  # no rule matches: deny (miniupnpd would allow)
    assert Permissions().allowed(1, "10.0.0.5", 1)  # no rules at all: allow


def test_nearest_allowed_port_for_add_any() -> None:
    p = Permissions.parse(["deny 5000-5009 0.0.0.0/0 1-65535", "allow 1024-65535 192.168.1.0/24 1-65535"])
    assert p.nearest_allowed(4000, "192.168.1.2", 80) == 4000
    assert p.nearest_allowed(5003, "192.168.1.2", 80) in (4999, 5010)
    assert p.nearest_allowed(0, "192.168.1.2", 80) == 1024
    assert p.nearest_allowed(5003, "10.1.1.1", 80) is None


# --- GENA core (UDA 1.1 §4) -----------------------------------------------

PEER = "192.168.1.2"


def _sub(subs: gena.Subscriptions, peer: str = PEER, cb: str | None = None, now: float = 0.0,
         timeout: str = "Second-1800") -> gena.Subscription:
    h = {"nt": "upnp:event", "callback": f"<http://{peer}:4000/evt>" if cb is None else cb, "timeout": timeout}
    out = subs.request("SUBSCRIBE", "/evt/WANIPCn", h, peer, now)
    assert out is not None
    return out


def test_callstranger_callback_must_be_the_subscriber() -> None:
    subs = gena.Subscriptions()
    for cb in ("<http://198.20.0.10:80/x>", "<http://evil.example/x>", "<https://192.168.1.2/x>",
               "http://192.168.1.2/x", "<http://192.168.1.3:80/>", ""):
        with pytest.raises(gena.GenaError) as e:
            _sub(subs, cb=cb)
        assert e.value.status == 412, cb
    # a foreign URL first is skipped; the subscriber's own is used
    s = _sub(subs, cb="<http://198.20.0.10/x><http://192.168.1.2:4000/cb?a=1>")
    assert s.callback == "http://192.168.1.2:4000/cb?a=1"
    assert b"NOTIFY /cb?a=1 HTTP/1.1" in gena.notify_request(s, b"")


def test_subscribe_renew_unsubscribe_and_header_rules() -> None:
    subs = gena.Subscriptions()
    s = _sub(subs, timeout="Second-100")
    assert s.sid.startswith("uuid:") and s.timeout == 100 and s.expires == 100
    assert _sub(subs, timeout="Second-5").timeout == gena.MIN_TIMEOUT
    assert _sub(subs, timeout="Second-infinite").timeout == gena.DEFAULT_TIMEOUT
    renewed = subs.request("SUBSCRIBE", "/evt/WANIPCn", {"sid": s.sid, "timeout": "Second-300"}, PEER, 50)
    assert renewed is s and s.expires == 350
    cases = [
        ({"sid": s.sid, "nt": "upnp:event"}, 400),  # SID with NT
        ({"nt": "upnp:propchange", "callback": f"<http://{PEER}/>"}, 412),
        ({"sid": "uuid:nope"}, 412),
    ]
    for h, status in cases:
        with pytest.raises(gena.GenaError) as e:
            subs.request("SUBSCRIBE", "/evt/WANIPCn", h, PEER, 60)
        assert e.value.status == status, h
    with pytest.raises(gena.GenaError):  # another host cannot renew or cancel it
        subs.request("UNSUBSCRIBE", "/evt/WANIPCn", {"sid": s.sid}, "192.168.1.9", 60)
    with pytest.raises(gena.GenaError):  # nor at another event URL
        subs.request("UNSUBSCRIBE", "/evt/WANCfg", {"sid": s.sid}, PEER, 60)
    assert subs.request("UNSUBSCRIBE", "/evt/WANIPCn", {"sid": s.sid}, PEER, 60) is None
    assert s.sid not in subs.by_sid


def test_subscriptions_are_bounded_and_expire() -> None:
    subs = gena.Subscriptions(max_per_host=2, max_total=3)
    _sub(subs, timeout="Second-60")
    _sub(subs, timeout="Second-600")
    with pytest.raises(gena.GenaError) as e:
        _sub(subs)
    assert e.value.status == 503
    _sub(subs, peer="192.168.1.9")
    with pytest.raises(gena.GenaError):
        _sub(subs, peer="192.168.1.10")  # total reached
    assert subs.expire(61) == 1  # the 60 s one
    assert len(subs.by_sid) == 2
    _sub(subs, peer="192.168.1.10", now=61)


def test_propertyset_escapes_values() -> None:
    body = gena.propertyset({"ExternalIPAddress": "198.20.0.1", "X": "<&>"})
    root = ET.fromstring(body)
    assert [p[0].tag for p in root] == ["ExternalIPAddress", "X"]
    assert root[1][0].text == "<&>"


# --- SSDP (UDA 1.1 §1) -------------------------------------------------------------------------

def test_ssdp_targets_and_version_echo() -> None:
    dev = Device("r", "w", "c", igd_version=2)
    targets = ssdp.search_targets(dev)
    assert len(ssdp.matches(targets, "ssdp:all")) == len(targets) == 11  # WANIPv6FirewallControl too
    assert len({t.st for t in targets}) == 11  # one answer per type
    got = ssdp.matches(targets, "urn:schemas-upnp-org:device:InternetGatewayDevice:1")
    assert [t.st for t in got] == ["urn:schemas-upnp-org:device:InternetGatewayDevice:1"]
    assert got[0].usn == "uuid:r::urn:schemas-upnp-org:device:InternetGatewayDevice:1"
    assert ssdp.matches(targets, "urn:schemas-upnp-org:service:WANIPConnection:3") == []
    assert [t.usn for t in ssdp.matches(targets, "uuid:w")] == ["uuid:w"]
    v1 = ssdp.search_targets(Device("r", "w", "c", igd_version=1))
    assert ssdp.matches(v1, "urn:schemas-upnp-org:service:WANIPConnection:2") == []


IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:"
WANIP = "urn:schemas-upnp-org:service:WANIPConnection:"


def _uuids(key: str) -> str:
    return key.replace("uuid_", "")


def test_both_serves_an_igd1_and_an_igd2_root_device_each_searched_by_its_own_version() -> None:
    gw = gateway("both", _uuids)
    v1, v2 = gw.devices
    assert (v1.igd_version, v2.igd_version) == (1, 2)
    assert {v1.uuid_root, v1.uuid_wan, v1.uuid_wcd}.isdisjoint({v2.uuid_root, v2.uuid_wan, v2.uuid_wcd})
    targets = ssdp.search_targets(gw)

    def where(st: str) -> list[tuple[str, str]]:
        return [(t.usn, t.root_path) for t in ssdp.matches(targets, st)]

    # an IGD:2-only control point finds the IGD:2 device, and only it
    assert where(IGD + "2") == [(f"uuid:root2::{IGD}2", f"{IGD2_PREFIX}/rootDesc.xml")]
    assert where(WANIP + "2") == [(f"uuid:wcd2::{WANIP}2", f"{IGD2_PREFIX}/rootDesc.xml")]
    # an IGD:1-only one finds the IGD:1 device, and is not handed the IGD:2 description
    assert where(IGD + "1") == [(f"uuid:root::{IGD}1", "/rootDesc.xml")]
    assert where(WANIP + "1") == [(f"uuid:wcd::{WANIP}1", "/rootDesc.xml")]
    assert len(where("upnp:rootdevice")) == 2 and len(where("ssdp:all")) == len(targets)
    assert {t.config_id for t in targets} == {v1.config_id, v2.config_id} and v1.config_id != v2.config_id
    # the descriptions at each path, and the Windows downgrade on the IGD:2 device's paths
    assert IGD.encode() + b"1" in (gw.description("/rootDesc.xml", "upnpc") or b"")
    assert IGD.encode() + b"2" in (gw.description(f"{IGD2_PREFIX}/rootDesc.xml", "upnpc") or b"")
    ms = gw.description(f"{IGD2_PREFIX}/rootDesc.xml", "Microsoft-Windows/10.0 UPnP/1.0") or b""
    assert IGD.encode() + b"1" in ms and b"WANIPv6FirewallControl" not in ms
    assert b"AddAnyPortMapping" in (gw.description(f"{IGD2_PREFIX}/WANIPCn.xml", "x") or b"")
    assert b"AddAnyPortMapping" not in (gw.description("/WANIPCn.xml", "x") or b"")
    assert b"AddPinhole" in (gw.description(f"{IGD2_PREFIX}/IP6FCtl.xml", "x") or b"")
    assert gw.description("/IP6FCtl.xml", "x") is None
    assert gw.device_of(gw.services[f"{IGD2_PREFIX}/ctl/L3F"]) is v2
    assert gw.device_of(gw.services["/ctl/L3F"]) is v1
    server = ssdp.SsdpServer(gw, "192.168.1.1", "http://192.168.1.1:5000/rootDesc.xml", lambda: [])
    assert {server.location_of(t) for t in targets} == {"http://192.168.1.1:5000/rootDesc.xml",
                                                        f"http://192.168.1.1:5000{IGD2_PREFIX}/rootDesc.xml"}


def test_igd_version_1_and_2_serve_one_root_device() -> None:
    one = ssdp.search_targets(gateway("1", _uuids))
    assert ssdp.matches(one, IGD + "2") == [] and len(ssdp.matches(one, "upnp:rootdevice")) == 1
    two = ssdp.search_targets(gateway("2", _uuids))
    assert [t.root_path for t in ssdp.matches(two, IGD + "1")] == ["/rootDesc.xml"]  # lower version echoed
    with pytest.raises(ValueError):
        gateway("3", _uuids)


def test_ssdp_messages_carry_the_uda11_headers() -> None:
    t = ssdp.Target("upnp:rootdevice", "uuid:r::upnp:rootdevice")
    r = ssdp.response(t, "http://192.168.1.1:5000/rootDesc.xml", 7, 9).decode()
    for h in ("CACHE-CONTROL: max-age=1800", "EXT:", "LOCATION: http://192.168.1.1:5000/rootDesc.xml",
              "SERVER: ", "BOOTID.UPNP.ORG: 7", "CONFIGID.UPNP.ORG: 9", "USN: uuid:r::upnp:rootdevice"):
        assert h in r
    bye = ssdp.notify(t, "ssdp:byebye", "http://x/", 7, 9).decode()
    assert "NTS: ssdp:byebye" in bye and "LOCATION" not in bye and "BOOTID.UPNP.ORG: 7" in bye
    upd = ssdp.notify(t, "ssdp:update", "http://192.168.1.4:5000/rootDesc.xml", 7, 9, 8).decode()
    for h in ("NTS: ssdp:update", "LOCATION: http://192.168.1.4:5000/rootDesc.xml", "BOOTID.UPNP.ORG: 7",
              "NEXTBOOTID.UPNP.ORG: 8", "NT: upnp:rootdevice"):  # UDA 1.1 §1.2.4
        assert h in upd
    assert ssdp.NOTIFY_INTERVAL + ssdp.NOTIFY_JITTER < ssdp.MAX_AGE / 2  # repeated well within max-age


def test_ssdp_rate_limit_per_source_is_bounded() -> None:
    rl = ssdp.RateLimit(burst=3, rate=1, sources=2)
    assert [rl.allow("a", 0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("b", 0)  # other sources are unaffected
    assert rl.allow("a", 1.0)  # one token back after a second
    rl.allow("c", 1.0)
    assert len(rl.buckets) == 2


# --- descriptions -----------------------------------------------------------------------------

def _actions(xml: bytes) -> set[str]:
    return {a.findtext(f"{SCPD_NS}name") or "" for a in ET.fromstring(xml).iter(f"{SCPD_NS}action")}


def test_every_argument_names_a_declared_state_variable() -> None:
    for v in (1, 2):
        dev = Device("r", "w", "c", igd_version=v)
        for s in dev.services.values():
            root = ET.fromstring(scpd_xml(s))
            names = {x.findtext(f"{SCPD_NS}name") for x in root.iter(f"{SCPD_NS}stateVariable")}
            for arg in root.iter(f"{SCPD_NS}argument"):
                assert arg.findtext(f"{SCPD_NS}relatedStateVariable") in names


def test_igd2_actions_only_when_served_and_ms_agents_get_igd1() -> None:
    v2 = Device("r", "w", "c", igd_version=2)
    v2_only = {"AddAnyPortMapping", "DeletePortMappingRange", "GetListOfPortMappings"}
    assert v2_only <= _actions(v2.scpd_by_path("/WANIPCn.xml") or b"")
    assert not v2_only & _actions(Device("r", "w", "c").scpd_by_path("/WANIPCn.xml") or b"")
    assert wants_igd1("Microsoft-Windows/10.0 UPnP/1.0") and wants_igd1("FDSSDP")
    assert not wants_igd1("Linux UPnP/1.1 MiniUPnPc/2.2.4")
    ms = v2.view("Mozilla/4.0 (compatible; UPnP/1.0; Windows 9x) Microsoft")
    assert b"InternetGatewayDevice:1" in ms.root_xml() and b"WANIPConnection:1" in ms.root_xml()
    assert not v2_only & _actions(ms.scpd_by_path("/WANIPCn.xml") or b"")
    assert b"InternetGatewayDevice:2" in v2.view("upnpc").root_xml()
    assert v2.config_id != ms.config_id


def test_cdata_out_argument_stays_well_formed() -> None:
    body = soap.response("urn:x:service:WANIPConnection:2", "GetListOfPortMappings",
                         {"NewPortListing": soap.Cdata("<a>]]></a>")})
    root = ET.fromstring(body)
    assert "".join(root.itertext()) == "<a>]]></a>"


def test_xml_escape_is_what_saxutils_did() -> None:
    """controld escapes without xml.sax.saxutils (its imports cost ~2.6 MB): same output."""
    from xml.sax.saxutils import escape as sax_escape

    for text in ("", "plain", "a&b<c>d", "&amp;", "<![CDATA[x]]>", "\"quotes\" 'too'", "ü & ß < 𝄞"):
        assert escape(text) == sax_escape(text), text
    root = ET.fromstring(f"<d>{escape('x&<y>&amp;')}</d>")
    assert root.text == "x&<y>&amp;"
