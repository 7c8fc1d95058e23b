"""PCP MAP in IPv6 firewall mode (RFC 6887 §11.3, docs/pinholes.md): decisions, no I/O.

A MAP whose internal address is IPv6 (not IPv4-mapped) asks for a pinhole in the router's
IPv6 firewall, not a NAT mapping: nothing is translated, so the answer's external address
and port are the internal ones. :func:`pinhole_ask` turns the event into the arguments of
the pinhole core (``Pinholes.lan_map`` in controld/core/pinhole.py) or refuses it;
:func:`granted` and :func:`pinhole_refusal` turn the core's answer into the outcome that
``pcp.respond`` encodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from controld.core.pinhole import MAX_LEASE, PinholeErrorKind
from controld.pcpserver.events import DeleteWanted, Done, Granted, MapWanted, Outcome, Refused, remote_filter
from shared.pcp import Result

K = PinholeErrorKind
NO_NONCE = b"\x00" * 12  # a zero nonce is a legal value (RFC 6887 §11.1)

# The pinhole core's neutral error kinds as PCP results (docs/pinholes.md, the PCP column).
PINHOLE_RESULTS: dict[PinholeErrorKind, Result] = {
    K.FIREWALL_DISABLED: Result.NOT_AUTHORIZED,  # no IPv6 firewall under natd's control
    K.NOT_ALLOWED: Result.NOT_AUTHORIZED,  # inbound pinholes switched off by the admin
    K.NOT_AUTHORIZED: Result.NOT_AUTHORIZED,  # not a LAN address, a privileged port, the rules, another owner
    K.NO_SUCH_ENTRY: Result.NOT_AUTHORIZED,  # a delete of a missing pinhole is SUCCESS instead (§15.1)
    K.QUOTA: Result.NO_RESOURCES,
    K.PROTOCOL: Result.UNSUPP_PROTOCOL,  # only TCP and UDP: natd matches on th dport (§11.3)
    K.PROTOCOL_WILDCARD: Result.UNSUPP_PROTOCOL,
    K.PORT_WILDCARD: Result.UNSUPP_PROTOCOL,
    K.CLIENT_WILDCARD: Result.MALFORMED_REQUEST,
    K.INVALID: Result.MALFORMED_REQUEST,  # a bad remote host, or a field natd's schema refuses
    K.NO_TRAFFIC: Result.NO_RESOURCES,  # CheckPinholeWorking only; never from a MAP
    K.UNAVAILABLE: Result.NO_RESOURCES,  # natd away or nft failed: a short error, the client retries
}


@dataclass(frozen=True)
class PinholeAsk:
    """What ``Pinholes.lan_map`` is asked: the pinhole's owner, its PCP nonce and its fields."""

    owner: str  # the request's source, or the host a manager's THIRD_PARTY names (§13.1)
    nonce: bytes
    int_client: str
    int_port: int
    protocol: int
    remote_host: str  # "" for any remote host
    lease: int


def owner(event: MapWanted | DeleteWanted) -> str:
    """Whose pinhole it is: the source's, or the named host's for a manager's THIRD_PARTY
    (docs/lan-pcp.md, Ownership), so secure mode and quotas see that host."""
    return str(event.internal_ip) if event.third_party else str(event.requester.address)


def nonce(event: MapWanted | DeleteWanted) -> bytes:
    """The mapping nonce the pinhole is kept under (RFC 6887 §11.3)."""
    return event.requester.nonce or NO_NONCE


def as_suggested(event: MapWanted) -> bool:
    """Can the suggestion be met? The external address and port are the internal ones, so only
    no suggestion or exactly those can (RFC 6887 §11.3; the family asked must be IPv6)."""
    return (event.family == 6 and event.suggested_port in (0, event.internal_port)
            and event.suggested_ip in (None, event.internal_ip))


def pinhole_ask(event: MapWanted, max_lifetime: int) -> PinholeAsk | Refused:
    """A MAP with an IPv6 internal address as the pinhole core's request, or its refusal.

    FILTER: one peer of prefix length 128 and no remote port becomes the remote host; anything
    else is EXCESSIVE_REMOTE_PEERS (never widened: the answer would echo FILTER as applied).
    PREFER_FAILURE with a suggestion other than the internal address and port is
    CANNOT_PROVIDE_EXTERNAL (§13.2); without it a suggestion is ignored (§11.3).
    The lease is the requested lifetime clamped to ``max_lifetime`` and 86400 s.
    """
    remote = remote_filter(event.filters, 6)
    if remote is None:
        return Refused(Result.EXCESSIVE_REMOTE_PEERS)
    if event.prefer_failure and not as_suggested(event):
        return Refused(Result.CANNOT_PROVIDE_EXTERNAL)
    lease = max(1, min(event.lifetime, max_lifetime, MAX_LEASE))
    return PinholeAsk(owner(event), nonce(event), str(event.internal_ip), event.internal_port, event.protocol,
                      remote, lease)


def granted(event: MapWanted, lease: int) -> Granted:
    """The answer to an opened or re-leased pinhole: external = internal (RFC 6887 §11.3)."""
    return Granted(event.internal_ip, event.internal_port, lease)


def pinhole_refusal(event: MapWanted | DeleteWanted, kind: PinholeErrorKind, lifetime: int | None = None) -> Outcome:
    """The outcome for a pinhole core error; ``lifetime`` is another owner's remaining lease
    for NOT_AUTHORIZED (§11.3). A delete of a missing pinhole succeeds (§15.1)."""
    if kind is K.NO_SUCH_ENTRY and isinstance(event, DeleteWanted):
        return Done()
    return Refused(PINHOLE_RESULTS[kind], lifetime)
