"""IGD device and service descriptions (UPnP Device Architecture 1.1, IGD:1 and IGD:2).

The service list and each service's actions and state variables are data below;
the XML is generated from them, so the SCPD always declares exactly what is served.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

from controld.upnp.xmltext import escape
from shared import config

# Control and event URLs, one per service (served by controld.upnp.http).
ROOT_PATH = "/rootDesc.xml"
# With --igd-version both, the IGD:2 root device lives under this prefix beside the IGD:1
# one at the plain paths (docs/upnp.md "Both IGD versions by default").
IGD2_PREFIX = "/igd2"
IGD_VERSIONS = ("both", "1", "2")

# User agents known to break on IGD:2 descriptions get the IGD:1 view, as miniupnpd does
# (Windows, Xbox, MS BITS: miniupnp issues #277, #539). Lower case.
IGD1_ONLY_AGENTS = ("microsoft", "fdssdp")


def wants_igd1(user_agent: str) -> bool:
    """True for a control point that must be described IGD:1 even when IGD:2 is served."""
    ua = user_agent.lower()
    return any(a in ua for a in IGD1_ONLY_AGENTS)


@dataclass(frozen=True)
class Arg:
    name: str
    direction: str  # "in" or "out"
    variable: str


@dataclass(frozen=True)
class Var:
    name: str
    type: str
    evented: bool = False
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Service:
    name: str  # WANIPConnection
    version: int
    service_id: str
    short: str  # path stem
    actions: dict[str, tuple[Arg, ...]]
    variables: tuple[Var, ...]
    prefix: str = ""  # URL prefix of the root device serving it ("" or IGD2_PREFIX)

    @property
    def type(self) -> str:
        return f"urn:schemas-upnp-org:service:{self.name}:{self.version}"

    @property
    def scpd_url(self) -> str:
        return f"{self.prefix}/{self.short}.xml"

    @property
    def control_url(self) -> str:
        return f"{self.prefix}/ctl/{self.short}"

    @property
    def event_url(self) -> str:
        return f"{self.prefix}/evt/{self.short}"


def _a(spec: str) -> tuple[Arg, ...]:
    """'in:NewRemoteHost:RemoteHost out:...' -> args."""
    out = []
    for item in spec.split():
        d, n, v = item.split(":")
        out.append(Arg(n, d, v))
    return tuple(out)


_PM_KEY = "in:NewRemoteHost:RemoteHost in:NewExternalPort:ExternalPort in:NewProtocol:PortMappingProtocol"
_PM_VALUE = ("InternalPort:InternalPort InternalClient:InternalClient Enabled:PortMappingEnabled "
             "PortMappingDescription:PortMappingDescription LeaseDuration:PortMappingLeaseDuration")


def _out(prefix: str, spec: str) -> str:
    return " ".join(f"{prefix}:New{s}" for s in spec.split())


def wanipconnection(version: int) -> Service:
    actions: dict[str, tuple[Arg, ...]] = {
        "SetConnectionType": _a("in:NewConnectionType:ConnectionType"),
        "GetConnectionTypeInfo": _a("out:NewConnectionType:ConnectionType "
                                    "out:NewPossibleConnectionTypes:PossibleConnectionTypes"),
        "RequestConnection": (),
        "ForceTermination": (),
        "GetStatusInfo": _a("out:NewConnectionStatus:ConnectionStatus out:NewLastConnectionError:LastConnectionError "
                            "out:NewUptime:Uptime"),
        "GetNATRSIPStatus": _a("out:NewRSIPAvailable:RSIPAvailable out:NewNATEnabled:NATEnabled"),
        "GetGenericPortMappingEntry": _a(
            "in:NewPortMappingIndex:PortMappingNumberOfEntries out:NewRemoteHost:RemoteHost "
            "out:NewExternalPort:ExternalPort out:NewProtocol:PortMappingProtocol " + _out("out", _PM_VALUE)),
        "GetSpecificPortMappingEntry": _a(_PM_KEY + " " + _out("out", _PM_VALUE)),
        "AddPortMapping": _a(_PM_KEY + " " + _out("in", _PM_VALUE)),
        "DeletePortMapping": _a(_PM_KEY),
        "GetExternalIPAddress": _a("out:NewExternalIPAddress:ExternalIPAddress"),
    }
    if version >= 2:
        # WANIPConnection:2 actions (IGD:2; RFC 6970 §5.6.1, §5.7, §5.8)
        actions["AddAnyPortMapping"] = _a(_PM_KEY + " " + _out("in", _PM_VALUE)
                                          + " out:NewReservedPort:ExternalPort")
        actions["DeletePortMappingRange"] = _a(
            "in:NewStartPort:ExternalPort in:NewEndPort:ExternalPort in:NewProtocol:PortMappingProtocol "
            "in:NewManage:A_ARG_TYPE_Manage")
        actions["GetListOfPortMappings"] = _a(
            "in:NewStartPort:ExternalPort in:NewEndPort:ExternalPort in:NewProtocol:PortMappingProtocol "
            "in:NewManage:A_ARG_TYPE_Manage in:NewNumberOfPorts:PortMappingNumberOfEntries "
            "out:NewPortListing:A_ARG_TYPE_PortListing")
    variables = [
        Var("ConnectionType", "string"),
        Var("PossibleConnectionTypes", "string", True, ("Unconfigured", "IP_Routed", "IP_Bridged")),
        Var("ConnectionStatus", "string", True, ("Unconfigured", "Connecting", "Connected",
                                                 "PendingDisconnect", "Disconnecting", "Disconnected")),
        Var("Uptime", "ui4"),
        Var("LastConnectionError", "string", False, ("ERROR_NONE",)),
        Var("RSIPAvailable", "boolean"),
        Var("NATEnabled", "boolean"),
        Var("ExternalIPAddress", "string", True),
        Var("PortMappingNumberOfEntries", "ui2", True),
        Var("PortMappingEnabled", "boolean"),
        Var("PortMappingLeaseDuration", "ui4"),
        Var("RemoteHost", "string"),
        Var("ExternalPort", "ui2"),
        Var("InternalPort", "ui2"),
        Var("PortMappingProtocol", "string", False, ("TCP", "UDP")),
        Var("InternalClient", "string"),
        Var("PortMappingDescription", "string"),
    ]
    if version >= 2:
        variables += [Var("SystemUpdateID", "ui4", True), Var("A_ARG_TYPE_Manage", "boolean"),
                      Var("A_ARG_TYPE_PortListing", "string")]
    return Service("WANIPConnection", version, "urn:upnp-org:serviceId:WANIPConn1", "WANIPCn",
                   actions, tuple(variables))


def wancommonifc() -> Service:
    actions = {
        "GetCommonLinkProperties": _a(
            "out:NewWANAccessType:WANAccessType out:NewLayer1UpstreamMaxBitRate:Layer1UpstreamMaxBitRate "
            "out:NewLayer1DownstreamMaxBitRate:Layer1DownstreamMaxBitRate "
            "out:NewPhysicalLinkStatus:PhysicalLinkStatus"),
        "GetTotalBytesSent": _a("out:NewTotalBytesSent:TotalBytesSent"),
        "GetTotalBytesReceived": _a("out:NewTotalBytesReceived:TotalBytesReceived"),
        "GetTotalPacketsSent": _a("out:NewTotalPacketsSent:TotalPacketsSent"),
        "GetTotalPacketsReceived": _a("out:NewTotalPacketsReceived:TotalPacketsReceived"),
    }
    variables = (
        Var("WANAccessType", "string", False, ("DSL", "POTS", "Cable", "Ethernet")),
        Var("Layer1UpstreamMaxBitRate", "ui4"),
        Var("Layer1DownstreamMaxBitRate", "ui4"),
        Var("PhysicalLinkStatus", "string", True, ("Up", "Down")),
        Var("TotalBytesSent", "ui4"),
        Var("TotalBytesReceived", "ui4"),
        Var("TotalPacketsSent", "ui4"),
        Var("TotalPacketsReceived", "ui4"),
    )
    return Service("WANCommonInterfaceConfig", 1, "urn:upnp-org:serviceId:WANCommonIFC1", "WANCfg",
                   actions, variables)


def layer3forwarding() -> Service:
    actions = {
        "SetDefaultConnectionService": _a("in:NewDefaultConnectionService:DefaultConnectionService"),
        "GetDefaultConnectionService": _a("out:NewDefaultConnectionService:DefaultConnectionService"),
    }
    return Service("Layer3Forwarding", 1, "urn:upnp-org:serviceId:L3Forwarding1", "L3F", actions,
                   (Var("DefaultConnectionService", "string", True),))


def wanipv6firewallcontrol() -> Service:
    """WANIPv6FirewallControl:1 (IGD:2): IPv6 pinholes, served by :mod:`controld.upnp.pinholes`."""
    ip6 = "in:RemoteHost:A_ARG_TYPE_RemoteHost in:RemotePort:A_ARG_TYPE_RemotePort " \
          "in:InternalClient:A_ARG_TYPE_InternalClient in:InternalPort:A_ARG_TYPE_InternalPort " \
          "in:Protocol:A_ARG_TYPE_Protocol"
    uid = "in:UniqueID:A_ARG_TYPE_UniqueID"
    actions = {
        "GetFirewallStatus": _a("out:FirewallEnabled:FirewallEnabled "
                                "out:InboundPinholeAllowed:InboundPinholeAllowed"),
        "GetOutboundPinholeTimeout": _a(ip6 + " out:OutboundPinholeTimeout:A_ARG_TYPE_OutboundPinholeTimeout"),
        "AddPinhole": _a(ip6 + " in:LeaseTime:A_ARG_TYPE_LeaseTime out:UniqueID:A_ARG_TYPE_UniqueID"),
        "UpdatePinhole": _a(uid + " in:NewLeaseTime:A_ARG_TYPE_LeaseTime"),
        "DeletePinhole": _a(uid),
        "GetPinholePackets": _a(uid + " out:PinholePackets:A_ARG_TYPE_PinholePackets"),
        "CheckPinholeWorking": _a(uid + " out:IsWorking:A_ARG_TYPE_Boolean"),
    }
    # name:type, ":e" when evented (one spec string, as the arguments above)
    variables = tuple(Var(n, t, bool(e)) for n, t, *e in (v.split(":") for v in (
        "FirewallEnabled:boolean:e InboundPinholeAllowed:boolean:e A_ARG_TYPE_OutboundPinholeTimeout:ui4 "
        "A_ARG_TYPE_RemoteHost:string A_ARG_TYPE_RemotePort:ui2 A_ARG_TYPE_InternalClient:string "
        "A_ARG_TYPE_InternalPort:ui2 A_ARG_TYPE_Protocol:ui2 A_ARG_TYPE_LeaseTime:ui4 A_ARG_TYPE_UniqueID:ui2 "
        "A_ARG_TYPE_PinholePackets:ui4 A_ARG_TYPE_Boolean:boolean").split()))
    return Service("WANIPv6FirewallControl", 1, "urn:upnp-org:serviceId:WANIPv6Firewall1", "IP6FCtl",
                   actions, variables)


@dataclass
class Device:
    """One IGD root device tree, with the UUIDs fixed at start (they appear in SSDP too).

    ``prefix`` puts its URLs under a path of their own (two root devices on one server);
    ``lower``: it answers searches for lower versions of its types (UDA 1.1 §1.3.2), off
    for the IGD:2 device when an IGD:1 device beside it answers those.
    """

    uuid_root: str
    uuid_wan: str
    uuid_wcd: str
    igd_version: int = 1
    friendly_name: str = config.default("friendly-name")
    prefix: str = ""
    lower: bool = True
    presentation_url: str = ""  # the LAN page (controld/web), http://LAN:PORT/igdpcp/; set once HTTP listens
    presentation_override: str = ""  # option presentation_url: wins over the LAN page

    def __post_init__(self) -> None:
        self.wanip = replace(wanipconnection(self.igd_version), prefix=self.prefix)
        self.wancfg = replace(wancommonifc(), prefix=self.prefix)
        self.l3f = replace(layer3forwarding(), prefix=self.prefix)
        # IPv6 pinholes are an IGD:2 service (WANConnectionDevice:2)
        self.fw6 = replace(wanipv6firewallcontrol(), prefix=self.prefix) if self.igd_version >= 2 else None
        wcd = (self.wanip,) if self.fw6 is None else (self.wanip, self.fw6)
        self.wcd_services = wcd
        every = (*wcd, self.wancfg, self.l3f)
        self.services = {s.control_url: s for s in every}
        self.events = {s.event_url: s for s in every}
        self._v1: Device | None = None
        if self.igd_version >= 2:
            self._v1 = Device(self.uuid_root, self.uuid_wan, self.uuid_wcd, 1, self.friendly_name, self.prefix,
                              presentation_url=self.presentation_url,
                              presentation_override=self.presentation_override)

    @property
    def root_path(self) -> str:
        return self.prefix + ROOT_PATH

    @property
    def devices(self) -> tuple[Device, ...]:
        return (self,)

    def present_at(self, url: str) -> None:
        """The presentationURL (UDA 1.1 §2.3) from now on, in every view."""
        self.presentation_url = url
        if self._v1 is not None:
            self._v1.presentation_url = url

    def view(self, user_agent: str) -> Device:
        """The description a control point gets: IGD:1 for agents that break on IGD:2."""
        return self._v1 if self._v1 is not None and wants_igd1(user_agent) else self

    def description(self, path: str, user_agent: str) -> bytes | None:
        """The root or service description at ``path`` as ``user_agent`` gets it; None if none."""
        view = self.view(user_agent)
        return view.root_xml() if path == self.root_path else view.scpd_by_path(path)

    def device_of(self, service: Service) -> Device:
        """The root device serving ``service``."""
        return self

    @property
    def config_id(self) -> int:
        """CONFIGID.UPNP.ORG: changes whenever the descriptions change (UDA 1.1 §1.2; miniupnpd's is fixed)."""
        blob = self.root_xml() + b"".join(scpd_xml(s) for s in self.services.values())
        return zlib.crc32(blob) & 0xFFFFFF  # UDA 1.1: 0..16777215

    def device_types(self) -> list[tuple[str, str]]:
        """(uuid, device type) for every device, root first."""
        v = self.igd_version
        return [(self.uuid_root, f"urn:schemas-upnp-org:device:InternetGatewayDevice:{v}"),
                (self.uuid_wan, f"urn:schemas-upnp-org:device:WANDevice:{v}"),
                (self.uuid_wcd, f"urn:schemas-upnp-org:device:WANConnectionDevice:{v}")]

    def root_xml(self) -> bytes:
        def svc(s: Service) -> str:
            return (f"<service><serviceType>{s.type}</serviceType><serviceId>{s.service_id}</serviceId>"
                    f"<SCPDURL>{s.scpd_url}</SCPDURL><controlURL>{s.control_url}</controlURL>"
                    f"<eventSubURL>{s.event_url}</eventSubURL></service>")

        def dev(uuid: str, dtype: str, name: str, services: str, children: str, page: str = "") -> str:
            return (f"<device><deviceType>{dtype}</deviceType><friendlyName>{escape(name)}</friendlyName>"
                    "<manufacturer>igdpcp</manufacturer><manufacturerURL>https://example.invalid/igdpcp</manufacturerURL>"
                    "<modelDescription>UPnP IGD with PCP interworking (RFC 6970)</modelDescription>"
                    "<modelName>igdpcp</modelName><modelNumber>1</modelNumber>"
                    f"<UDN>uuid:{uuid}</UDN><serviceList>{services}</serviceList>"
                    f"{f'<deviceList>{children}</deviceList>' if children else ''}"
                    f"{f'<presentationURL>{escape(page)}</presentationURL>' if page else ''}</device>")

        (ur, tr), (uw, tw), (uc, tc) = self.device_types()
        wcd = dev(uc, tc, "WANConnectionDevice", "".join(svc(s) for s in self.wcd_services), "")
        wan = dev(uw, tw, "WANDevice", svc(self.wancfg), wcd)
        root = dev(ur, tr, self.friendly_name, svc(self.l3f), wan, self.presentation_override or self.presentation_url)
        return ('<?xml version="1.0"?>\r\n<root xmlns="urn:schemas-upnp-org:device-1-0">'
                "<specVersion><major>1</major><minor>1</minor></specVersion>"
                f"{root}</root>\r\n").encode()

    def scpd_by_path(self, path: str) -> bytes | None:
        for s in self.services.values():
            if s.scpd_url == path:
                return scpd_xml(s)
        return None


def scpd_xml(s: Service) -> bytes:
    """The service description: every action and state variable served."""
    acts = "".join(
        f"<action><name>{n}</name>"
        + ("<argumentList>" + "".join(
            f"<argument><name>{a.name}</name><direction>{a.direction}</direction>"
            f"<relatedStateVariable>{a.variable}</relatedStateVariable></argument>" for a in args)
           + "</argumentList>" if args else "")
        + "</action>" for n, args in s.actions.items())
    vs = "".join(
        f'<stateVariable sendEvents="{"yes" if v.evented else "no"}"><name>{v.name}</name>'
        f"<dataType>{v.type}</dataType>"
        + ("<allowedValueList>" + "".join(f"<allowedValue>{x}</allowedValue>" for x in v.allowed)
           + "</allowedValueList>" if v.allowed else "")
        + "</stateVariable>" for v in s.variables)
    return ('<?xml version="1.0"?>\r\n<scpd xmlns="urn:schemas-upnp-org:service-1-0">'
            "<specVersion><major>1</major><minor>0</minor></specVersion>"
            f"<actionList>{acts}</actionList><serviceStateTable>{vs}</serviceStateTable></scpd>\r\n").encode()


class Gateway:
    """The root devices served over one mapping table (UDA 1.1 §1: a host may have several).

    ``--igd-version both`` (the default) serves an IGD:1 root device at the plain paths and an
    IGD:2 one under :data:`IGD2_PREFIX`, so IGD:1-only and IGD:2-only control points both find
    a gateway of the version they search for (docs/upnp.md "Both IGD versions by default").
    """

    def __init__(self, devices: tuple[Device, ...]) -> None:
        self.devices = devices
        self.services = {k: v for d in devices for k, v in d.services.items()}
        self.events = {k: v for d in devices for k, v in d.events.items()}
        self._owner = {s.control_url: d for d in devices for s in d.services.values()}

    def description(self, path: str, user_agent: str) -> bytes | None:
        """The root or service description at ``path``; None if no device has it."""
        return next((x for d in self.devices if (x := d.description(path, user_agent)) is not None), None)

    def device_of(self, service: Service) -> Device:
        """The root device serving ``service``."""
        return self._owner.get(service.control_url, self.devices[0])

    def present_at(self, url: str) -> None:
        """The presentationURL (the LAN page) of every root device from now on."""
        for d in self.devices:
            d.present_at(url)

    def override_presentation(self, url: str) -> None:
        """``option presentation_url``: wins over the LAN page in every view ('' keeps the page)."""
        for d in self.devices:
            for view in (d, d._v1):
                if view is not None:
                    view.presentation_override = url

    def view(self, user_agent: str) -> Device:
        """The first device's view (callers that predate several root devices)."""
        return self.devices[0].view(user_agent)


def gateway(igd_version: str, uuid: Callable[[str], str], friendly_name: str = "igdpcp router") -> Gateway:
    """The root devices for ``--igd-version`` (both, 1 or 2); ``uuid(key)`` gives a stable UUID per key."""
    if igd_version not in IGD_VERSIONS:
        raise ValueError(f"igd version {igd_version!r} is not one of {', '.join(IGD_VERSIONS)}")
    v1 = Device(uuid("uuid_root"), uuid("uuid_wan"), uuid("uuid_wcd"), 1, friendly_name)
    if igd_version == "1":
        return Gateway((v1,))
    if igd_version == "2":
        return Gateway((Device(v1.uuid_root, v1.uuid_wan, v1.uuid_wcd, 2, friendly_name),))
    # Its own UUIDs: one UDN, one description (UDA 1.1 §2); lower-version searches go to v1.
    v2 = Device(uuid("uuid_root2"), uuid("uuid_wan2"), uuid("uuid_wcd2"), 2, friendly_name,
                IGD2_PREFIX, lower=False)
    return Gateway((v1, v2))
