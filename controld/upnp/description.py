"""IGD device and service descriptions (UPnP Device Architecture 1.1, IGD:1 and IGD:2).

The service list and each service's actions and state variables are data below;
the XML is generated from them, so the SCPD always declares exactly what is served.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from controld.upnp.xmltext import escape

# Control and event URLs, one per service (served by controld.upnp.http).
ROOT_PATH = "/rootDesc.xml"

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

    @property
    def type(self) -> str:
        return f"urn:schemas-upnp-org:service:{self.name}:{self.version}"

    @property
    def scpd_url(self) -> str:
        return f"/{self.short}.xml"

    @property
    def control_url(self) -> str:
        return f"/ctl/{self.short}"

    @property
    def event_url(self) -> str:
        return f"/evt/{self.short}"


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


@dataclass
class Device:
    """The IGD tree, with the UUIDs fixed at start (they appear in SSDP too)."""

    uuid_root: str
    uuid_wan: str
    uuid_wcd: str
    igd_version: int = 1
    friendly_name: str = "igdpcp router"

    def __post_init__(self) -> None:
        self.wanip = wanipconnection(self.igd_version)
        self.wancfg = wancommonifc()
        self.l3f = layer3forwarding()
        self.services = {s.control_url: s for s in (self.wanip, self.wancfg, self.l3f)}
        self.events = {s.event_url: s for s in (self.wanip, self.wancfg, self.l3f)}
        self._v1: Device | None = None
        if self.igd_version >= 2:
            self._v1 = Device(self.uuid_root, self.uuid_wan, self.uuid_wcd, 1, self.friendly_name)

    def view(self, user_agent: str) -> Device:
        """The description a control point gets: IGD:1 for agents that break on IGD:2."""
        return self._v1 if self._v1 is not None and wants_igd1(user_agent) else self

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

        def dev(uuid: str, dtype: str, name: str, services: str, children: str) -> str:
            return (f"<device><deviceType>{dtype}</deviceType><friendlyName>{escape(name)}</friendlyName>"
                    "<manufacturer>igdpcp</manufacturer><manufacturerURL>https://example.invalid/igdpcp</manufacturerURL>"
                    "<modelDescription>UPnP IGD with PCP interworking (RFC 6970)</modelDescription>"
                    "<modelName>igdpcp</modelName><modelNumber>1</modelNumber>"
                    f"<UDN>uuid:{uuid}</UDN><serviceList>{services}</serviceList>"
                    f"{f'<deviceList>{children}</deviceList>' if children else ''}</device>")

        (ur, tr), (uw, tw), (uc, tc) = self.device_types()
        wcd = dev(uc, tc, "WANConnectionDevice", svc(self.wanip), "")
        wan = dev(uw, tw, "WANDevice", svc(self.wancfg), wcd)
        root = dev(ur, tr, self.friendly_name, svc(self.l3f), wan)
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
