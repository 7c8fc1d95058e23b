"""What a LAN datagram asks of the mapping core, and what the core answers.

Both front ends (PCP and NAT-PMP) produce the same event types, so one core serves both;
the answer builders in ``pcp`` and ``natpmp`` turn an outcome back into bytes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from shared.pcp import Filter, IPAddress, Result

FrontEnd = Literal["pcp", "natpmp"]

LONG_ERROR = 1800  # RFC 6887 §7.4: "long" errors, 30 min RECOMMENDED
SHORT_ERROR = 30  # RFC 6887 §7.4: "short" errors, 30 s RECOMMENDED
# RFC 6887 §7.4 classes each result code; the rest are long.
SHORT_ERRORS = frozenset({Result.NETWORK_FAILURE, Result.NO_RESOURCES, Result.USER_EX_QUOTA,
                          Result.CANNOT_PROVIDE_EXTERNAL})


def error_lifetime(result: int) -> int:
    """The error lifetime RFC 6887 §7.4 recommends for a result code."""
    return SHORT_ERROR if result in SHORT_ERRORS else LONG_ERROR


@dataclass(frozen=True)
class Requester:
    """Who asked: becomes the core's Origin (front end + client + nonce).

    ``address`` and ``port`` are the datagram's source (answers and mapping updates go
    there); ``nonce`` is the PCP mapping nonce (RFC 6887 §11.1), None for NAT-PMP.
    """

    front_end: FrontEnd
    address: IPAddress
    port: int
    nonce: bytes | None = None


@dataclass(frozen=True)
class MapWanted:
    """Create or refresh an inbound mapping (PCP MAP lifetime > 0, NAT-PMP map lifetime > 0).

    ``suggested_ip`` None and ``suggested_port`` 0 mean no preference; ``family`` is the
    external address family asked for (RFC 6887 §11.1, erratum 3621).
    """

    requester: Requester
    internal_ip: IPAddress
    protocol: int
    internal_port: int
    lifetime: int
    suggested_port: int = 0
    suggested_ip: IPAddress | None = None
    family: int = 4
    prefer_failure: bool = False
    filters: tuple[Filter, ...] = ()
    description: str | None = None
    third_party: bool = False
    raw: bytes = b""


@dataclass(frozen=True)
class DeleteWanted:
    """Delete the requester's mapping (RFC 6887 §15.1, RFC 6886 §3.4).

    ``internal_port`` 0 (NAT-PMP only) means every mapping of this protocol the client owns.
    """

    requester: Requester
    internal_ip: IPAddress
    protocol: int
    internal_port: int
    family: int = 4
    third_party: bool = False
    raw: bytes = b""


@dataclass(frozen=True)
class PeerWanted:
    """Create or extend an outbound mapping toward one remote peer (RFC 6887 §12)."""

    requester: Requester
    internal_ip: IPAddress
    protocol: int
    internal_port: int
    lifetime: int
    remote_ip: IPAddress
    remote_port: int
    suggested_port: int = 0
    suggested_ip: IPAddress | None = None
    family: int = 4
    description: str | None = None
    third_party: bool = False
    raw: bytes = b""


@dataclass(frozen=True)
class AnnounceWanted:
    """A solicited PCP ANNOUNCE (RFC 6887 §14.1): answered SUCCESS, lifetime 0, our epoch."""

    requester: Requester
    raw: bytes = b""


@dataclass(frozen=True)
class AddressWanted:
    """NAT-PMP public address request (RFC 6886 §3.2): the external IPv4 address clients see."""

    requester: Requester


Wanted = MapWanted | DeleteWanted | PeerWanted | AnnounceWanted | AddressWanted


@dataclass(frozen=True)
class Reply:
    """Answer at once, no core needed: send ``payload`` back to the datagram's source."""

    payload: bytes
    reason: str = ""


@dataclass(frozen=True)
class Drop:
    """Drop silently (RFC 6887 §8.2, RFC 6886 §3.5); ``reason`` is for the log line."""

    reason: str


Handled = Wanted | Reply | Drop


@dataclass(frozen=True)
class Granted:
    """The core made or refreshed the mapping: the outermost external address and port.

    ``description`` is the stored DESCRIPTION to echo (RFC 7220 §4); None echoes the request's.
    """

    external_ip: IPAddress
    external_port: int
    lifetime: int
    description: str | None = None


@dataclass(frozen=True)
class Done:
    """A delete or an ANNOUNCE succeeded; ``lifetime`` is 0 unless a mapping must live on (§15.1)."""

    lifetime: int = 0


@dataclass(frozen=True)
class Address:
    """The external IPv4 address for a NAT-PMP public address request (RFC 6886 §3.2)."""

    external_ip: ipaddress.IPv4Address


@dataclass(frozen=True)
class Refused:
    """The core said no: a PCP result code (NAT-PMP answers are derived from it).

    ``lifetime`` None takes the RFC 6887 §7.4 class default; NOT_AUTHORIZED for a nonce
    mismatch passes the remaining lifetime of the mapping (§11.3).
    """

    result: Result
    lifetime: int | None = None


Outcome = Granted | Done | Address | Refused


# The core's neutral error kinds (docs/lan-pcp.md "Errors") and the PCP result each becomes.
KIND_RESULTS: dict[str, Result] = {
    "not-authorized": Result.NOT_AUTHORIZED,  # another client's mapping, or a nonce mismatch (§11.3)
    "denied": Result.NOT_AUTHORIZED,  # permission rules (§7.4: "forbidden by policy")
    "conflict": Result.CANNOT_PROVIDE_EXTERNAL,  # only where §7.4 allows it; see refusal()
    "quota": Result.USER_EX_QUOTA,
    "unavailable": Result.NETWORK_FAILURE,  # upstream silent or unreachable, no external address
    "upstream": Result.NETWORK_FAILURE,  # NAT2 refused without a result we may pass on
    "invalid": Result.MALFORMED_REQUEST,
    "unsupported": Result.UNSUPP_PROTOCOL,
    "not-found": Result.NOT_AUTHORIZED,  # a delete of a missing mapping is SUCCESS instead (§15.1)
}
# NAT2's results a proxy passes down (RFC 7648); the rest describe our own request to
# NAT2, not the client's, so the client sees NETWORK_FAILURE instead.
PASSED_ON = frozenset({Result.NOT_AUTHORIZED, Result.NO_RESOURCES, Result.USER_EX_QUOTA, Result.UNSUPP_PROTOCOL,
                       Result.NETWORK_FAILURE, Result.CANNOT_PROVIDE_EXTERNAL, Result.EXCESSIVE_REMOTE_PEERS})


def refusal(event: Wanted, kind: str, pcp_result: int | None = None, lifetime: int | None = None) -> Outcome:
    """The outcome for a core error (its ``kind`` value and the upstream PCP result, if any).

    Keeps the RFC 6887 §7.4 "MUST only" rules: CANNOT_PROVIDE_EXTERNAL only for a MAP with
    PREFER_FAILURE or a PEER, EXCESSIVE_REMOTE_PEERS only for a MAP with FILTER; a delete
    of a mapping that is not there succeeds (§15.1).
    """
    if kind == "not-found" and isinstance(event, DeleteWanted):
        return Done()
    result = KIND_RESULTS.get(kind, Result.NO_RESOURCES)
    if kind == "upstream" and pcp_result in PASSED_ON:
        result = Result(pcp_result)
    strict = isinstance(event, PeerWanted) or (isinstance(event, MapWanted) and event.prefer_failure)
    if result == Result.CANNOT_PROVIDE_EXTERNAL and not strict:
        result = Result.NO_RESOURCES
    if result == Result.EXCESSIVE_REMOTE_PEERS and not (isinstance(event, MapWanted) and event.filters):
        result = Result.NO_RESOURCES
    return Refused(result, lifetime)


def remote_filter(filters: tuple[Filter, ...], version: int) -> str | None:
    """FILTER options as one remote host of IP ``version`` (the mapping's internal family): ""
    for none or prefix 0 (clears), None when they cannot be installed exactly, which is
    EXCESSIVE_REMOTE_PEERS (RFC 6887 §13.3: every server takes one full-length peer; a remote
    port or a shorter prefix is refused, never widened, since the answer echoes FILTER as applied)."""
    if not filters:
        return ""
    if len(filters) != 1:
        return None
    f = filters[0]
    if f.prefix_len == 0:
        return ""
    if f.peer_port != 0 or f.peer_ip.version != version or f.prefix_len != 128:
        return None  # the codec gives an IPv4-mapped peer as IPv4 (RFC 6887 §5)
    return str(f.peer_ip)
