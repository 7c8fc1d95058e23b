"""WANIPConnection, WANCommonInterfaceConfig and Layer3Forwarding actions.

Arguments are checked here (a missing or malformed one is 402 Invalid Args); what
the action means for the mapping table and upstream is the IWF's business.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable

from controld.description import Device, Service
from controld.errors import UPnPError
from controld.iwf import Iwf
from controld.soap import SoapAction
from controld.table import Mapping

Out = dict[str, str | int]


def _arg(a: SoapAction, name: str) -> str:
    if name not in a.args:
        raise UPnPError(402, f"missing argument {name}")
    return a.args[name]


def _uint(a: SoapAction, name: str, hi: int, lo: int = 0) -> int:
    raw = _arg(a, name)
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise UPnPError(402, f"{name} must be an integer in {lo}..{hi}, got {raw[:20]!r}")
    return int(raw)


def _proto(a: SoapAction) -> int:
    raw = _arg(a, "NewProtocol").upper()
    if raw not in ("TCP", "UDP"):
        raise UPnPError(402, "NewProtocol must be TCP or UDP")
    return 6 if raw == "TCP" else 17


def _bool(a: SoapAction, name: str) -> bool:
    raw = _arg(a, name).lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise UPnPError(402, f"{name} must be a boolean")
    return raw in ("1", "true", "yes")


def _ipv4(a: SoapAction, name: str) -> str:
    raw = _arg(a, name)
    try:
        return str(ipaddress.IPv4Address(raw))
    except ValueError:
        raise UPnPError(402, f"{name} must be an IPv4 address") from None


def _entry(iwf: Iwf, m: Mapping, with_key: bool) -> Out:
    out: Out = {}
    if with_key:
        out.update(NewRemoteHost=m.remote_host, NewExternalPort=m.ext_port, NewProtocol=m.proto_name)
    out.update(NewInternalPort=m.int_port, NewInternalClient=m.int_client, NewEnabled=1,
               NewPortMappingDescription=m.description, NewLeaseDuration=iwf.lease_remaining(m))
    return out


class IgdActions:
    """Dispatch of SOAP actions to handlers, per service."""

    def __init__(self, iwf: Iwf, device: Device) -> None:
        self.iwf = iwf
        self.device = device
        self.started = time.monotonic()
        self.handlers: dict[str, Callable[[SoapAction, str], Awaitable[Out]]] = {
            "GetConnectionTypeInfo": self.get_connection_type_info,
            "SetConnectionType": self.read_only,
            "RequestConnection": self.not_authorized,
            "ForceTermination": self.not_authorized,
            "GetStatusInfo": self.get_status_info,
            "GetNATRSIPStatus": self.get_nat_rsip_status,
            "GetExternalIPAddress": self.get_external_ip_address,
            "AddPortMapping": self.add_port_mapping,
            "DeletePortMapping": self.delete_port_mapping,
            "GetSpecificPortMappingEntry": self.get_specific_port_mapping_entry,
            "GetGenericPortMappingEntry": self.get_generic_port_mapping_entry,
            "GetCommonLinkProperties": self.get_common_link_properties,
            "GetTotalBytesSent": self.zero_counter,
            "GetTotalBytesReceived": self.zero_counter,
            "GetTotalPacketsSent": self.zero_counter,
            "GetTotalPacketsReceived": self.zero_counter,
            "GetDefaultConnectionService": self.get_default_connection_service,
            "SetDefaultConnectionService": self.set_default_connection_service,
        }

    async def handle(self, service: Service, action: SoapAction, cp: str) -> Out:
        """Run ``action`` invoked on ``service`` by control point ``cp``; raises UPnPError."""
        if action.name not in service.actions or action.name not in self.handlers:
            raise UPnPError(401, f"{action.name} is not an action of {service.name}")
        return await self.handlers[action.name](action, cp)

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
        return {"NewExternalIPAddress": self.iwf.external_ip(cp)}

    async def add_port_mapping(self, a: SoapAction, cp: str) -> Out:
        remote = _arg(a, "NewRemoteHost")
        if remote not in ("", "*"):
            raise UPnPError(726, "only a wildcard RemoteHost is supported")
        await self.iwf.add_port_mapping(
            cp, a.version, "", _uint(a, "NewExternalPort", 65535), _proto(a),
            _uint(a, "NewInternalPort", 65535, 1), _ipv4(a, "NewInternalClient"), _bool(a, "NewEnabled"),
            _arg(a, "NewPortMappingDescription")[:256], _uint(a, "NewLeaseDuration", 2**32 - 1))
        return {}

    async def delete_port_mapping(self, a: SoapAction, cp: str) -> Out:
        _arg(a, "NewRemoteHost")
        await self.iwf.delete_port_mapping(cp, a.version, "", _uint(a, "NewExternalPort", 65535), _proto(a))
        return {}

    async def get_specific_port_mapping_entry(self, a: SoapAction, cp: str) -> Out:
        _arg(a, "NewRemoteHost")
        m = self.iwf.get_specific(cp, "", _uint(a, "NewExternalPort", 65535), _proto(a))
        return _entry(self.iwf, m, with_key=False)

    async def get_generic_port_mapping_entry(self, a: SoapAction, cp: str) -> Out:
        m = self.iwf.get_generic(_uint(a, "NewPortMappingIndex", 65535))
        return _entry(self.iwf, m, with_key=True)

    async def get_common_link_properties(self, a: SoapAction, cp: str) -> Out:
        return {"NewWANAccessType": "Ethernet", "NewLayer1UpstreamMaxBitRate": 0,
                "NewLayer1DownstreamMaxBitRate": 0,
                "NewPhysicalLinkStatus": "Up" if self.iwf.wan_ip else "Down"}

    async def zero_counter(self, a: SoapAction, cp: str) -> Out:
        name = a.name.replace("Get", "New", 1)
        return {name: 0}

    async def get_default_connection_service(self, a: SoapAction, cp: str) -> Out:
        return {"NewDefaultConnectionService":
                f"uuid:{self.device.uuid_wcd}:WANConnectionDevice:1,urn:upnp-org:serviceId:WANIPConn1"}

    async def set_default_connection_service(self, a: SoapAction, cp: str) -> Out:
        _arg(a, "NewDefaultConnectionService")
        return {}
