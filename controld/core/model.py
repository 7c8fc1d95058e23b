"""The core's vocabulary: who asked (Origin), what was asked (CreateRequest), what is held
(Mapping) and what went wrong (CoreError). No front end's codes or names appear here.

A front end (UPnP today; PCP, NAT-PMP and the operator API next) turns its own request
into these types, calls :mod:`controld.core.service`, and maps a :class:`CoreError`'s
kind (and PCP result) back to its own error codes (docs/core.md).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

from controld.core.lifecycle import State
from shared.const import PROTO_NAMES

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Endpoint:
    """An address of either family and a port: one side of a mapping, typed."""

    ip: Address
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


class FrontEnd(str, Enum):
    """The protocol a request came in by."""

    UPNP = "upnp"
    PCP = "pcp"
    NATPMP = "natpmp"
    OPERATOR = "operator"  # the admin socket (CLI, rpcd/LuCI) and the page's admin
    WEB = "web"  # a LAN host on the page, for itself


@dataclass(frozen=True)
class Origin:
    """Who asks: the front end, the client's address, its protocol version, its own id.

    ``version`` is the front end's protocol version (IGD 1 or 2 for UPnP); ``client_id``
    is the client's own nonce or id where its protocol has one (PCP's mapping nonce).
    """

    front_end: FrontEnd
    client: str
    version: int = 1
    client_id: bytes | None = None


def upnp(client: str, version: int = 1) -> Origin:
    """An Origin for a UPnP control point at ``client`` speaking IGD ``version``."""
    return Origin(FrontEnd.UPNP, client, version)


@dataclass(frozen=True)
class CreateRequest:
    """A neutral mapping request.

    ``exact``: the external port must be ``ext_port`` (else CONFLICT); otherwise
    ``ext_port`` is only a suggestion (0: any). ``lease`` 0 means infinite.
    ``remote_host`` "" is the wildcard (one remote host otherwise: a PCP FILTER).
    """

    proto: int
    ext_port: int
    int_client: str
    int_port: int
    lease: int
    description: str = ""
    exact: bool = True
    remote_host: str = ""


class ErrorKind(str, Enum):
    """Why the core refused; each front end maps these to its own codes."""

    NOT_AUTHORIZED = "not-authorized"  # the caller may not act for that host / on that mapping
    DENIED = "denied"  # the permission rules refuse the mapping
    CONFLICT = "conflict"  # the port is someone else's (here, in NAT1 or upstream)
    QUOTA = "quota"  # per-host or total limit, or no ports left
    UNAVAILABLE = "unavailable"  # upstream silent or unreachable, or superseded
    UPSTREAM = "upstream"  # the PCP server refused: see pcp_result (None: answer unusable)
    NOT_FOUND = "not-found"  # no such mapping (or index)
    INVALID = "invalid"  # a malformed or inconsistent request
    UNSUPPORTED = "unsupported"  # something PCP cannot express


class CoreError(Exception):
    """A neutral failure: its ``kind``, the PCP result when the server gave one, and why."""

    def __init__(self, kind: ErrorKind, detail: str = "", pcp_result: int | None = None) -> None:
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)
        self.kind = kind
        self.pcp_result = pcp_result
        self.detail = detail


class NotOwner(CoreError):
    """NOT_AUTHORIZED for a mapping someone else holds; ``lifetime`` is what it has left
    (a PCP nonce mismatch answers with it, RFC 6887 §11.3)."""

    def __init__(self, detail: str, lifetime: int) -> None:
        super().__init__(ErrorKind.NOT_AUTHORIZED, detail)
        self.lifetime = lifetime


@dataclass(frozen=True)
class LanGrant:
    """What a LAN PCP or NAT-PMP client is told: the outermost address and port, the lifetime."""

    mapping: Mapping
    ext_ip: str
    ext_port: int
    lifetime: int


@dataclass(frozen=True, slots=True)  # slots: ~half the memory per row with 10k of them
class Mapping:
    """One port mapping, with both of its bindings (docs/requirements.md IWF-32).

    ``cp`` and ``igd`` are the requester and its protocol version (the Origin stored in
    the row's columns). Rows are immutable: a change is a new row made by
    :meth:`controld.core.store.MappingTable.apply`, the one writer.
    """

    id: int
    cp: str  # requester (source address) that owns it
    igd: int  # the requester's protocol version (IGD 1 or 2 for UPnP)
    remote_host: str
    ext_port: int  # the external port the client sees (NAT2's in cascaded mode)
    proto: int
    int_client: str
    int_port: int
    description: str
    lease: int  # requested lease in seconds; 0 = infinite
    lease_end: float | None  # wall-clock end of the lease; None = infinite
    state: State
    created: float  # wall-clock second it was made (one float object per second: 10k rows on a router)
    nat1_port: int | None = None  # NAT1 WAN port (cascaded, nat1-only)
    nonce: bytes | None = None
    pcp_server: str | None = None
    ext_ip: str | None = None  # external address the client was given
    pcp_lifetime: int | None = None
    pcp_expiry: float | None = None  # wall clock
    prefer_failure: bool = False
    mode: str = "cascaded"
    origin: str = FrontEnd.UPNP.value  # the front end that made it (FrontEnd value), shown by `igdpcp list`

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES.get(self.proto, str(self.proto))

    # Typed views of the string columns (the columns stay: front ends and the table use them).

    @property
    def internal(self) -> Endpoint:
        """The LAN side: internal client and port."""
        return Endpoint(ipaddress.ip_address(self.int_client), self.int_port)

    @property
    def external(self) -> Endpoint | None:
        """The outermost side the client was given (NAT2's in cascaded mode); None before a grant."""
        return None if self.ext_ip is None else Endpoint(ipaddress.ip_address(self.ext_ip), self.ext_port)

    @property
    def remote(self) -> Address | None:
        """The one remote host allowed in (a PCP FILTER), None for any."""
        return ipaddress.ip_address(self.remote_host) if self.remote_host else None

    @property
    def requester(self) -> Address:
        """The address of the client that asked for the mapping (its owner)."""
        return ipaddress.ip_address(self.cp)

    def describe(self) -> str:
        """Short text naming the mapping, for log lines."""
        return (f"mapping {self.id} {self.proto_name} ext {self.ext_ip or '?'}:{self.ext_port}"
                f" -> {self.int_client}:{self.int_port} (nat1 {self.nat1_port}, cp {self.cp}, origin {self.origin})")
