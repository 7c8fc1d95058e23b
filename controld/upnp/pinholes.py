"""WANIPv6FirewallControl:1 (UPnP IGD:2) actions over the pinhole core (controld/core/pinhole.py).

Arguments are parsed and bounded here (402 Invalid Args when missing or malformed); what a
pinhole may be, who owns it and how long it lives are the core's; its neutral errors become
the service's codes (606, 701-709) in :func:`controld.upnp.errors.pinhole_error`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from controld.core.pinhole import PinholeError, Pinholes, outbound_timeout
from controld.upnp.errors import UPnPError, pinhole_error
from controld.upnp.parse import ascii_uint
from controld.upnp.soap import SoapAction

Out = dict[str, str | int]


def _arg(a: SoapAction, name: str) -> str:
    if name not in a.args:
        raise UPnPError(402, f"missing argument {name}")
    return a.args[name]


def _uint(a: SoapAction, name: str, hi: int) -> int:
    raw = _arg(a, name).strip()
    value = ascii_uint(raw)
    if value is None or value > hi:
        raise UPnPError(402, f"{name} must be an integer in 0..{hi}, got {raw[:20]!r}")
    return value


def _remote(a: SoapAction) -> str:
    # upnpc writes the wildcard as the word "empty", async-upnp-client as "::" (docs/upnp.md "Tolerances")
    raw = _arg(a, "RemoteHost").strip()
    return "" if raw.lower() in ("", "*", "empty", "::") else raw


def _client(a: SoapAction) -> str:
    raw = _arg(a, "InternalClient").strip()
    return "" if raw.lower() == "empty" else raw


class PinholeActions:
    """The service's handlers, by action name, as :class:`controld.upnp.igd.IgdActions` dispatches them."""

    def __init__(self, pinholes: Pinholes) -> None:
        self.pinholes = pinholes
        self.handlers: dict[str, Callable[[SoapAction, str], Awaitable[Out]]] = {
            "GetFirewallStatus": self.get_firewall_status,
            "GetOutboundPinholeTimeout": self.get_outbound_pinhole_timeout,
            "AddPinhole": self.add_pinhole,
            "UpdatePinhole": self.update_pinhole,
            "DeletePinhole": self.delete_pinhole,
            "GetPinholePackets": self.get_pinhole_packets,
            "CheckPinholeWorking": self.check_pinhole_working,
        }

    def evented(self) -> dict[str, str]:
        """FirewallEnabled and InboundPinholeAllowed, as GENA sends them."""
        return {"FirewallEnabled": "1" if self.pinholes.firewall_enabled() else "0",
                "InboundPinholeAllowed": "1" if self.pinholes.inbound_allowed() else "0"}

    async def get_firewall_status(self, a: SoapAction, cp: str) -> Out:
        await self.pinholes.refresh()
        return {"FirewallEnabled": int(self.pinholes.firewall_enabled()),
                "InboundPinholeAllowed": int(self.pinholes.inbound_allowed())}

    async def get_outbound_pinhole_timeout(self, a: SoapAction, cp: str) -> Out:
        _remote(a), _uint(a, "RemotePort", 65535), _client(a), _uint(a, "InternalPort", 65535)
        proto = _uint(a, "Protocol", 65535)
        if not self.pinholes.firewall_enabled():
            raise UPnPError(702, "no IPv6 firewall under igdpcp's control")
        try:
            # the wildcard protocol: the shorter of the two, so the answer is safe for either
            value = min(outbound_timeout(6), outbound_timeout(17)) if proto == 65535 else outbound_timeout(proto)
        except PinholeError as exc:
            raise pinhole_error(exc) from None
        return {"OutboundPinholeTimeout": value}

    async def add_pinhole(self, a: SoapAction, cp: str) -> Out:
        args = (_client(a), _uint(a, "InternalPort", 65535), _uint(a, "Protocol", 65535), _remote(a),
                _uint(a, "RemotePort", 65535), _uint(a, "LeaseTime", 2**32 - 1))
        try:
            p = await self.pinholes.add(cp, *args)
        except PinholeError as exc:
            raise pinhole_error(exc) from None
        return {"UniqueID": p.uid}

    async def update_pinhole(self, a: SoapAction, cp: str) -> Out:
        uid, lease = _uint(a, "UniqueID", 65535), _uint(a, "NewLeaseTime", 2**32 - 1)
        try:
            await self.pinholes.update(cp, uid, lease)
        except PinholeError as exc:
            raise pinhole_error(exc) from None
        return {}

    async def delete_pinhole(self, a: SoapAction, cp: str) -> Out:
        try:
            await self.pinholes.delete(cp, _uint(a, "UniqueID", 65535))
        except PinholeError as exc:
            raise pinhole_error(exc) from None
        return {}

    async def get_pinhole_packets(self, a: SoapAction, cp: str) -> Out:
        try:
            n = await self.pinholes.packets(cp, _uint(a, "UniqueID", 65535))
        except PinholeError as exc:
            raise pinhole_error(exc) from None
        return {"PinholePackets": n % 2**32}

    async def check_pinhole_working(self, a: SoapAction, cp: str) -> Out:
        try:
            await self.pinholes.working(cp, _uint(a, "UniqueID", 65535))
        except PinholeError as exc:
            raise pinhole_error(exc) from None
        return {"IsWorking": 1}
