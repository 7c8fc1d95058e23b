"""WANIPConnection (IGD:1 and IGD:2), WANCommonInterfaceConfig and Layer3Forwarding actions.

Arguments are checked here (a missing or malformed one is 402 Invalid Args), and so
are UPnP's own quirks (PortMappingEnabled, the IGD:2 lease cap, wildcard ports). Policy
(permission rules, quotas, secure mode, manage rights) and what an action means for the
mapping table and upstream are the core's business (controld/core/, RFC 6970 §4, §5);
the core's neutral errors become UPnP codes in :mod:`controld.upnp.errors`.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

from controld.core.events import ChangeEvent
from controld.core.model import CoreError, CreateRequest, Mapping, upnp
from controld.core.pinhole import NoFirewall, Pinholes
from controld.core.service import Iwf
from controld.upnp.description import Device, Gateway, Service
from controld.upnp.errors import UPnPError, upnp_error
from controld.upnp.parse import ascii_uint
from controld.upnp.pinholes import PinholeActions
from controld.upnp.soap import Cdata, SoapAction
from controld.upnp.xmltext import escape
from shared.const import IGD2_MAX_LEASE, PROTO_NAMES, PROTO_NUMBERS

log = logging.getLogger("controld.upnp.igd")

Out = dict[str, str | int]
UI4 = 2**32
LIST_DEFAULT_MAX = 1000  # GetListOfPortMappings with NewNumberOfPorts=0 (as miniupnpd does)
# Served but not in the SCPD: vendor actions real control points call (miniupnpc's
# UPNP_GetPortMappingNumberOfEntries); strict clients never see them declared.
UNDECLARED = {"WANIPConnection": frozenset({"GetPortMappingNumberOfEntries"})}


def _arg(a: SoapAction, name: str) -> str:
    if name in a.args:
        return a.args[name]
    if name in LENIENT_DEFAULTS:
        return LENIENT_DEFAULTS[name]
    raise UPnPError(402, f"missing argument {name}")


def _uint(a: SoapAction, name: str, hi: int, lo: int = 0) -> int:
    raw = _arg(a, name)
    value = ascii_uint(raw)
    if value is None or not lo <= value <= hi:
        raise UPnPError(402, f"{name} must be an integer in {lo}..{hi}, got {raw[:20]!r}")
    return value


def _proto(a: SoapAction) -> int:
    raw = _arg(a, "NewProtocol").upper()
    if raw not in PROTO_NUMBERS:
        raise UPnPError(402, "NewProtocol must be TCP or UDP")
    return PROTO_NUMBERS[raw]


def _bool(a: SoapAction, name: str) -> bool:
    raw = _arg(a, name).lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise UPnPError(402, f"{name} must be a boolean")
    return raw in ("1", "true", "yes")


# Arguments some control points leave out, and the value miniupnpd assumes for them
# (as miniupnpd does); every other in-argument stays required (402 when missing).
LENIENT_DEFAULTS = {"NewRemoteHost": "", "NewEnabled": "1", "NewLeaseDuration": "0",
                    "NewPortMappingDescription": ""}


def _remote_host(a: SoapAction) -> str:
    """Only a wildcard RemoteHost: PCP FILTER cannot key a mapping on it (docs/requirements.md §18 item 12)."""
    raw = _arg(a, "NewRemoteHost").strip()
    if raw not in ("", "*", "0.0.0.0"):  # 0.0.0.0: how some control points write the wildcard
        raise UPnPError(726, "only a wildcard RemoteHost is supported")
    return ""


def _internal_client(a: SoapAction, cp: str) -> str:
    """NewInternalClient as an IPv4 literal; empty means the caller, as miniupnpd does (no DNS, ever)."""
    raw = _arg(a, "NewInternalClient").strip()
    if raw == "":
        return cp
    try:
        return str(ipaddress.IPv4Address(raw))
    except ValueError:
        raise UPnPError(402, "NewInternalClient must be an IPv4 address") from None


def _int_port(a: SoapAction) -> int:
    port = _uint(a, "NewInternalPort", 65535)
    if port == 0:
        # IGD:2 names the wildcard internal port (732); IGD:1 has no code for it
        raise UPnPError(732 if a.version >= 2 else 402, "InternalPort 0 (wildcard) is not allowed")
    return port


def _entry(iwf: Iwf, m: Mapping, with_key: bool) -> Out:
    out: Out = {}
    if with_key:
        out.update(NewRemoteHost=m.remote_host, NewExternalPort=m.ext_port, NewProtocol=m.proto_name)
    out.update(NewInternalPort=m.int_port, NewInternalClient=m.int_client, NewEnabled=1,
               NewPortMappingDescription=m.description, NewLeaseDuration=iwf.lease_remaining(m))
    return out


def port_listing(entries: list[tuple[Mapping, int]]) -> str:
    """The IGD:2 PortListing document (WANIPConnection:2 XSD) for GetListOfPortMappings.

    Sent inside CDATA (:class:`controld.upnp.soap.Cdata`) as miniupnpd does, because miniupnpc
    does not decode entities; values are XML-escaped too, unlike miniupnpd's (as miniupnpd does).
    """
    rows = "".join(
        "<p:PortMappingEntry>"
        f"<p:NewRemoteHost>{escape(m.remote_host)}</p:NewRemoteHost>"
        f"<p:NewExternalPort>{m.ext_port}</p:NewExternalPort><p:NewProtocol>{m.proto_name}</p:NewProtocol>"
        f"<p:NewInternalPort>{m.int_port}</p:NewInternalPort>"
        f"<p:NewInternalClient>{escape(m.int_client)}</p:NewInternalClient><p:NewEnabled>1</p:NewEnabled>"
        f"<p:NewDescription>{escape(m.description)}</p:NewDescription><p:NewLeaseTime>{lease}</p:NewLeaseTime>"
        "</p:PortMappingEntry>" for m, lease in entries)
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            '<p:PortMappingList xmlns:p="urn:schemas-upnp-org:gw:WANIPConnection" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="urn:schemas-upnp-org:gw:WANIPConnection '
            'http://www.upnp.org/schemas/gw/WANIPConnection-v2.xsd">' + rows + "</p:PortMappingList>")


# --- the UPnP actions over the neutral core: UPnP quirks in, neutral errors out as codes -----

async def add_port_mapping(core: Iwf, cp: str, igd: int, remote_host: str, ext_port: int, proto: int,
                           int_port: int, int_client: str, enabled: bool, description: str,
                           lease: int) -> Mapping:
    """AddPortMapping (RFC 6970 §5.6.2): exactly ``ext_port``; raises UPnPError."""
    if not enabled:
        # docs/requirements.md IWF-16: PCP cannot disable a mapping; our choice of code is 402.
        raise UPnPError(402, "PortMappingEnabled must be 1: PCP cannot disable a mapping")
    if ext_port == 0:
        # IWF-49: PREFER_FAILURE cannot carry port 0; our choice is 716.
        raise UPnPError(716, "use AddAnyPortMapping for a wildcard external port")
    if igd >= 2 and (lease == 0 or lease > IGD2_MAX_LEASE):
        lease = IGD2_MAX_LEASE  # RFC 6970 §4.1 (IWF-71)
    req = CreateRequest(proto, ext_port, int_client, int_port, lease, description, True, remote_host)
    try:
        return await core.create(upnp(cp, igd), req)
    except CoreError as exc:
        raise upnp_error(exc, igd, "AddPortMapping") from None


async def add_any_port_mapping(core: Iwf, cp: str, igd: int, remote_host: str, ext_port: int, proto: int,
                               int_port: int, int_client: str, enabled: bool, description: str,
                               lease: int) -> Mapping:
    """AddAnyPortMapping (RFC 6970 §5.6.1): ``ext_port`` is a suggestion; raises UPnPError."""
    if not enabled:
        raise UPnPError(402, "PortMappingEnabled must be 1: PCP cannot disable a mapping")
    if lease == 0 or lease > IGD2_MAX_LEASE:
        lease = IGD2_MAX_LEASE  # an IGD:2 action: RFC 6970 §4.1 (IWF-71)
    req = CreateRequest(proto, ext_port, int_client, int_port, lease, description, False, remote_host)
    try:
        return await core.create(upnp(cp, igd), req)
    except CoreError as exc:
        raise upnp_error(exc, igd, "AddAnyPortMapping") from None


async def delete_port_mapping(core: Iwf, cp: str, igd: int, remote_host: str, ext_port: int, proto: int) -> None:
    """DeletePortMapping (RFC 6970 §5.8); raises UPnPError."""
    try:
        await core.delete(upnp(cp, igd), proto, ext_port)
    except CoreError as exc:
        raise upnp_error(exc, igd, "DeletePortMapping") from None


async def delete_port_mapping_range(core: Iwf, cp: str, igd: int, start: int, end: int, proto: int,
                                    manage: bool) -> int:
    """DeletePortMappingRange (RFC 6970 §5.8): the number removed; raises UPnPError."""
    try:
        return await core.delete_range(upnp(cp, igd), proto, start, end, manage)
    except CoreError as exc:
        raise upnp_error(exc, igd, "DeletePortMappingRange") from None


async def get_specific(core: Iwf, cp: str, remote_host: str, ext_port: int, proto: int, igd: int = 1) -> Mapping:
    """GetSpecificPortMappingEntry (RFC 6970 §5.7): under IGD:2 another CP's entry is 606."""
    try:
        return await core.find(upnp(cp, igd), proto, ext_port, owner_only=igd >= 2)
    except CoreError as exc:
        raise upnp_error(exc, igd, "GetSpecificPortMappingEntry") from None


def get_generic(core: Iwf, index: int) -> Mapping:
    """GetGenericPortMappingEntry: answered locally (IWF-55); 713 past the end."""
    try:
        return core.at_index(index)
    except CoreError as exc:
        raise upnp_error(exc, 1, "GetGenericPortMappingEntry") from None


class IgdActions:
    """Dispatch of SOAP actions to handlers, per service; owner of SystemUpdateID."""

    def __init__(self, iwf: Iwf, device: Device | Gateway, pinholes: Pinholes | None = None) -> None:
        self.iwf = iwf
        self.device = device
        self.pinholes = PinholeActions(pinholes or Pinholes(NoFirewall()))
        self.started = time.monotonic()
        self.system_update_id = 1  # IGD:2: bumped on every mapping change (miniupnpd keeps it at 1)
        self.handlers: dict[str, Callable[[SoapAction, str], Awaitable[Out]]] = {
            "GetConnectionTypeInfo": self.get_connection_type_info,
            "SetConnectionType": self.read_only,
            "RequestConnection": self.not_authorized,
            "ForceTermination": self.not_authorized,
            "GetStatusInfo": self.get_status_info,
            "GetNATRSIPStatus": self.get_nat_rsip_status,
            "GetExternalIPAddress": self.get_external_ip_address,
            "AddPortMapping": self.add_port_mapping,
            "AddAnyPortMapping": self.add_any_port_mapping,
            "DeletePortMapping": self.delete_port_mapping,
            "DeletePortMappingRange": self.delete_port_mapping_range,
            "GetSpecificPortMappingEntry": self.get_specific_port_mapping_entry,
            "GetGenericPortMappingEntry": self.get_generic_port_mapping_entry,
            "GetListOfPortMappings": self.get_list_of_port_mappings,
            "GetPortMappingNumberOfEntries": self.get_port_mapping_number_of_entries,
            "GetCommonLinkProperties": self.get_common_link_properties,
            "GetTotalBytesSent": self.counter,
            "GetTotalBytesReceived": self.counter,
            "GetTotalPacketsSent": self.counter,
            "GetTotalPacketsReceived": self.counter,
            "SetDefaultConnectionService": self.set_default_connection_service,
            **self.pinholes.handlers,  # WANIPv6FirewallControl:1 (controld/upnp/pinholes.py)
        }

        # Answered from memory with nothing to wait for: the HTTP server runs these without a task.
        self.now_handlers: dict[str, Callable[[SoapAction, str], Out]] = {
            "GetGenericPortMappingEntry": self._generic_entry,
            "GetPortMappingNumberOfEntries": self._number_of_entries,
            "GetExternalIPAddress": self._external_ip,
        }

    def changed(self, ev: ChangeEvent | None = None) -> None:
        """Mappings or addresses changed (SystemUpdateID, IGD:2); a store event only if a CP sees it."""
        if ev is None or ev.shown:
            self.system_update_id = (self.system_update_id + 1) % UI4 or 1

    def handle_now(self, service: Service, action: SoapAction, cp: str) -> Out | None:
        """:meth:`handle` for the actions answered from memory; None: call :meth:`handle`."""
        now = self.now_handlers.get(action.name)
        if now is None or action.name not in service.actions and action.name not in UNDECLARED.get(service.name, ()):
            return None
        self.iwf.stats.request("upnp")
        try:
            return now(action, cp)
        except UPnPError as exc:
            self.iwf.stats.error("upnp", exc.code)
            raise

    async def handle(self, service: Service, action: SoapAction, cp: str) -> Out:
        """Run ``action`` invoked on ``service`` by control point ``cp``; raises UPnPError."""
        self.iwf.stats.request("upnp")  # operators' counters (docs/operating.md)
        try:
            known = action.name in service.actions or action.name in UNDECLARED.get(service.name, ())
            if known and action.name == "GetDefaultConnectionService":  # names the device it was asked on
                return {"NewDefaultConnectionService": self._default_service(service)}
            if not known or action.name not in self.handlers:
                raise UPnPError(401, f"{action.name} is not an action of {service.name}:{service.version}")
            return await self.handlers[action.name](action, cp)
        except UPnPError as exc:
            self.iwf.stats.error("upnp", exc.code)
            raise

    # --- evented state (GENA reads it here: one place for each fact) ---------------------

    def evented(self, service: Service, cp: str) -> dict[str, str]:
        """Every evented variable of ``service`` as control point ``cp`` sees it now."""
        if service.name == "WANIPConnection":
            out = {"PossibleConnectionTypes": "IP_Routed",
                   "ConnectionStatus": "Connected" if self.iwf.connected() else "Disconnected",
                   # per control point: docs/requirements.md IWF-14
                   "ExternalIPAddress": self.iwf.external_ip(cp),
                   "PortMappingNumberOfEntries": str(self.iwf.count())}
            if service.version >= 2:
                out["SystemUpdateID"] = str(self.system_update_id)
            return out
        if service.name == "WANIPv6FirewallControl":
            return self.pinholes.evented()
        if service.name == "WANCommonInterfaceConfig":
            return {"PhysicalLinkStatus": "Up" if self.iwf.link_up() else "Down"}
        return {"DefaultConnectionService": self._default_service(service)}

    # --- WANIPConnection -------------------------------------------------------------------

    async def get_connection_type_info(self, a: SoapAction, cp: str) -> Out:
        return {"NewConnectionType": "IP_Routed", "NewPossibleConnectionTypes": "IP_Routed"}

    async def read_only(self, a: SoapAction, cp: str) -> Out:
        raise UPnPError(606, "the connection type is fixed")

    async def not_authorized(self, a: SoapAction, cp: str) -> Out:
        raise UPnPError(606, "the WAN connection is not controlled over UPnP")

    async def get_status_info(self, a: SoapAction, cp: str) -> Out:
        return {"NewConnectionStatus": "Connected" if self.iwf.connected() else "Disconnected",
                "NewLastConnectionError": "ERROR_NONE",
                "NewUptime": int(time.monotonic() - self.started)}

    async def get_nat_rsip_status(self, a: SoapAction, cp: str) -> Out:
        return {"NewRSIPAvailable": 0, "NewNATEnabled": 1}

    async def get_external_ip_address(self, a: SoapAction, cp: str) -> Out:
        return self._external_ip(a, cp)

    def _external_ip(self, a: SoapAction, cp: str) -> Out:
        return {"NewExternalIPAddress": self.iwf.external_ip(cp)}

    def _mapping_args(self, a: SoapAction, cp: str) -> tuple[str, int, int, int, str, bool, str, int]:
        return (_remote_host(a), _uint(a, "NewExternalPort", 65535), _proto(a), _int_port(a),
                _internal_client(a, cp), _bool(a, "NewEnabled"), _arg(a, "NewPortMappingDescription")[:256],
                _uint(a, "NewLeaseDuration", UI4 - 1))

    async def add_port_mapping(self, a: SoapAction, cp: str) -> Out:
        remote, eport, proto, iport, client, enabled, desc, lease = self._mapping_args(a, cp)
        await add_port_mapping(self.iwf, cp, a.version, remote, eport, proto, iport, client, enabled, desc, lease)
        return {}

    async def add_any_port_mapping(self, a: SoapAction, cp: str) -> Out:
        remote, eport, proto, iport, client, enabled, desc, lease = self._mapping_args(a, cp)
        m = await add_any_port_mapping(self.iwf, cp, a.version, remote, eport, proto, iport, client,
                                       enabled, desc, lease)
        return {"NewReservedPort": m.ext_port}

    async def delete_port_mapping(self, a: SoapAction, cp: str) -> Out:
        _remote_host(a)
        port = _uint(a, "NewExternalPort", 65535)
        proto = self._caller_proto(a, cp, port) if not _arg(a, "NewProtocol").strip() else _proto(a)
        await delete_port_mapping(self.iwf, cp, a.version, "", port, proto)
        return {}

    def _caller_proto(self, a: SoapAction, cp: str, port: int) -> int:
        """An empty NewProtocol (a P2P port mapper's unmap): the protocol of the caller's one
        mapping at ``port``; 402 when it has both or neither (docs/upnp.md "Tolerances")."""
        owner = upnp(cp, a.version)
        held = [p for p in PROTO_NUMBERS.values() if self.iwf.list_range(owner, p, port, port, False)]
        if len(held) != 1:
            raise UPnPError(402, f"empty NewProtocol: {len(held)} of the caller's mappings at {port}, need exactly 1")
        log.info("DeletePortMapping by %s: empty NewProtocol taken as %s, its one mapping at %d",
                 cp, PROTO_NAMES[held[0]], port)
        return held[0]

    def _range(self, a: SoapAction) -> tuple[int, int, int]:
        start, end = _uint(a, "NewStartPort", 65535), _uint(a, "NewEndPort", 65535)
        if start > end:
            raise UPnPError(733, "NewStartPort is greater than NewEndPort")
        return start, end, _proto(a)

    async def delete_port_mapping_range(self, a: SoapAction, cp: str) -> Out:
        start, end, proto = self._range(a)
        n = await delete_port_mapping_range(self.iwf, cp, a.version, start, end, proto, _bool(a, "NewManage"))
        log.info("range delete %d-%d by %s removed %d mappings", start, end, cp, n)
        return {}

    async def get_specific_port_mapping_entry(self, a: SoapAction, cp: str) -> Out:
        _remote_host(a)
        m = await get_specific(self.iwf, cp, "", _uint(a, "NewExternalPort", 65535), _proto(a), igd=a.version)
        return _entry(self.iwf, m, with_key=False)

    async def get_generic_port_mapping_entry(self, a: SoapAction, cp: str) -> Out:
        return self._generic_entry(a, cp)

    def _generic_entry(self, a: SoapAction, cp: str) -> Out:
        # O(1) by index; an index is stable until a mapping before it goes (controld/core/store.py)
        m = get_generic(self.iwf, _uint(a, "NewPortMappingIndex", 65535))
        return _entry(self.iwf, m, with_key=True)

    async def get_port_mapping_number_of_entries(self, a: SoapAction, cp: str) -> Out:
        return self._number_of_entries(a, cp)

    def _number_of_entries(self, a: SoapAction, cp: str) -> Out:
        return {"NewPortMappingNumberOfEntries": self.iwf.count()}

    async def get_list_of_port_mappings(self, a: SoapAction, cp: str) -> Out:
        """Answered locally (RFC 6970 §5.7, docs/requirements.md IWF-55); own mappings unless managing."""
        start, end, proto = self._range(a)
        manage = _bool(a, "NewManage")
        limit = _uint(a, "NewNumberOfPorts", 65535) or LIST_DEFAULT_MAX
        # In port order before the cut, so a client paging by NewStartPort misses nothing.
        ours = self.iwf.list_range(upnp(cp, a.version), proto, start, end, manage)
        found = [(m, self.iwf.lease_remaining(m)) for m in ours[:limit]]
        if not found:
            raise UPnPError(730, f"no mapping in {start}-{end}")
        return {"NewPortListing": Cdata(port_listing(found))}

    # --- WANCommonInterfaceConfig ----------------------------------------------------------

    async def get_common_link_properties(self, a: SoapAction, cp: str) -> Out:
        return {"NewWANAccessType": "Ethernet", "NewLayer1UpstreamMaxBitRate": 0,
                "NewLayer1DownstreamMaxBitRate": 0,
                "NewPhysicalLinkStatus": "Up" if self.iwf.link_up() else "Down"}

    async def counter(self, a: SoapAction, cp: str) -> Out:
        """Real WAN counters from natd, wrapped to ui4 as the state variables are."""
        try:
            reply = await self.iwf.counters()
        except CoreError as exc:  # natd away: the action fails, the daemon does not
            raise upnp_error(exc, a.version, a.name) from None
        value = {"GetTotalBytesSent": reply.bytes_sent, "GetTotalBytesReceived": reply.bytes_received,
                 "GetTotalPacketsSent": reply.packets_sent,
                 "GetTotalPacketsReceived": reply.packets_received}[a.name]
        return {a.name.replace("Get", "New", 1): value % UI4}

    # --- Layer3Forwarding ------------------------------------------------------------------

    def _default_service(self, service: Service) -> str:
        dev = self.device.device_of(service)
        return f"uuid:{dev.uuid_wcd}:WANConnectionDevice:{dev.igd_version},urn:upnp-org:serviceId:WANIPConn1"

    async def set_default_connection_service(self, a: SoapAction, cp: str) -> Out:
        _arg(a, "NewDefaultConnectionService")
        return {}
