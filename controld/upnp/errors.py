"""UPnP error codes: the PCP result table (RFC 6970 §4.3) and the core's neutral kinds, as data.

The core (controld/core/) answers with :class:`~controld.core.model.CoreError` (a kind,
plus the PCP result where there is one); :func:`upnp_error` is the one place that turns
it into the code a control point sees, per action and IGD version, as miniupnpd's
upnpsoap.c maps upnpredirect's neutral return values.
"""

from __future__ import annotations

from controld.core.model import CoreError, ErrorKind
from controld.core.pinhole import PinholeError, PinholeErrorKind
from shared.pcp import Result

# UPnP error code -> description (WANIPConnection service templates).
UPNP_ERRORS: dict[int, str] = {
    401: "Invalid Action",
    402: "Invalid Args",
    501: "Action Failed",
    606: "Action not authorized",
    # WANIPv6FirewallControl:1
    701: "PinholeSpaceExhausted",
    702: "FirewallDisabled",
    703: "InboundPinholeNotAllowed",
    704: "NoSuchEntry",
    705: "ProtocolNotSupported",
    706: "InternalPortWildcardingNotAllowed",
    707: "ProtocolWildcardingNotAllowed",
    708: "WildCardNotPermittedInSrcIP",
    709: "NoPacketSent",
    713: "SpecifiedArrayIndexInvalid",
    714: "NoSuchEntryInArray",
    715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort",
    718: "ConflictInMappingEntry",
    724: "SamePortValuesRequired",
    725: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard",
    727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms",
    730: "PortMappingNotFound",
    732: "WildCardNotPermittedInIntPort",
    733: "InconsistentParameters",
}


class UPnPError(Exception):
    """An action's failure, answered as a SOAP fault with this UPnPError code."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(f"{code} {UPNP_ERRORS.get(code, 'Error')}" + (f": {detail}" if detail else ""))
        self.code = code
        self.description = UPNP_ERRORS.get(code, "Error")
        self.detail = detail


# PCP result -> (error under IGD:1, error under IGD:2). RFC 6970 §4.3.
# CANNOT_PROVIDE_EXTERNAL depends on the action; see _CANNOT_PROVIDE below.
PCP_TO_UPNP: dict[int, tuple[int, int]] = {
    Result.UNSUPP_VERSION: (501, 501),
    Result.NOT_AUTHORIZED: (718, 606),
    Result.MALFORMED_REQUEST: (501, 501),
    Result.UNSUPP_OPCODE: (501, 501),
    Result.UNSUPP_OPTION: (501, 501),
    Result.MALFORMED_OPTION: (501, 501),
    Result.NETWORK_FAILURE: (501, 501),
    Result.NO_RESOURCES: (501, 728),
    Result.UNSUPP_PROTOCOL: (501, 501),
    Result.USER_EX_QUOTA: (501, 728),
    Result.ADDRESS_MISMATCH: (501, 501),
    Result.EXCESSIVE_REMOTE_PEERS: (501, 501),
}

# CANNOT_PROVIDE_EXTERNAL: 718 for AddPortMapping (§5.6.2); 714 for the
# GetSpecificPortMappingEntry probe (§5.7).
_CANNOT_PROVIDE: dict[str, int] = {"GetSpecificPortMappingEntry": 714}


def upnp_error_for_pcp(result: int, igd_version: int, action: str) -> UPnPError:
    """The UPnP error a control point gets for a PCP error ``result`` (never for SUCCESS)."""
    if result == Result.CANNOT_PROVIDE_EXTERNAL:
        return UPnPError(_CANNOT_PROVIDE.get(action, 718), "PCP CANNOT_PROVIDE_EXTERNAL")
    codes = PCP_TO_UPNP.get(result)
    if codes is None:  # later result codes (RFC 7652, RFC 7843) and unknown ones -> 501
        return UPnPError(501, f"PCP result {result}")
    name = Result(result).name
    return UPnPError(codes[1] if igd_version >= 2 else codes[0], f"PCP {name}")


# Neutral kind -> (error under IGD:1, error under IGD:2), the same for every action ...
KIND_TO_UPNP: dict[ErrorKind, tuple[int, int]] = {
    ErrorKind.NOT_AUTHORIZED: (606, 606),  # secure mode (docs/requirements.md IWF-88)
    ErrorKind.DENIED: (718, 606),  # permission rules: 718 under IGD:1, as miniupnpd answers
    ErrorKind.CONFLICT: (718, 718),
    ErrorKind.QUOTA: (728, 728),
    ErrorKind.UNAVAILABLE: (501, 501),  # upstream silent (IWF-13)
    ErrorKind.UPSTREAM: (501, 501),  # an unusable answer; a PCP result goes through PCP_TO_UPNP
    ErrorKind.NOT_FOUND: (714, 714),
    ErrorKind.INVALID: (402, 402),
    ErrorKind.UNSUPPORTED: (402, 402),
}
# ... except where an action names its own code.
ACTION_KIND_TO_UPNP: dict[tuple[str, ErrorKind], tuple[int, int]] = {
    ("DeletePortMapping", ErrorKind.NOT_AUTHORIZED): (714, 606),  # another CP's mapping
    ("DeletePortMappingRange", ErrorKind.NOT_FOUND): (730, 730),
    ("DeletePortMappingRange", ErrorKind.INVALID): (733, 733),
    ("GetListOfPortMappings", ErrorKind.NOT_FOUND): (730, 730),
    ("GetGenericPortMappingEntry", ErrorKind.NOT_FOUND): (713, 713),
}


def upnp_error(exc: CoreError, igd_version: int, action: str) -> UPnPError:
    """The UPnP error a control point gets for the core's ``exc`` during ``action``."""
    if exc.kind == ErrorKind.UPSTREAM and exc.pcp_result is not None:
        return upnp_error_for_pcp(exc.pcp_result, igd_version, action)
    codes = ACTION_KIND_TO_UPNP.get((action, exc.kind)) or KIND_TO_UPNP[exc.kind]
    return UPnPError(codes[1] if igd_version >= 2 else codes[0], exc.detail)


# The pinhole core's kinds -> WANIPv6FirewallControl:1 codes.
PINHOLE_TO_UPNP: dict[PinholeErrorKind, int] = {
    PinholeErrorKind.FIREWALL_DISABLED: 702,
    PinholeErrorKind.NOT_ALLOWED: 703,
    PinholeErrorKind.NOT_AUTHORIZED: 606,
    PinholeErrorKind.NO_SUCH_ENTRY: 704,
    PinholeErrorKind.QUOTA: 701,
    PinholeErrorKind.PROTOCOL: 705,
    PinholeErrorKind.PROTOCOL_WILDCARD: 707,
    PinholeErrorKind.PORT_WILDCARD: 706,
    PinholeErrorKind.CLIENT_WILDCARD: 708,
    PinholeErrorKind.INVALID: 402,
    PinholeErrorKind.NO_TRAFFIC: 709,
    PinholeErrorKind.UNAVAILABLE: 501,
}


def pinhole_error(exc: PinholeError) -> UPnPError:
    """The WANIPv6FirewallControl:1 error a control point gets for the pinhole core's ``exc``."""
    return UPnPError(PINHOLE_TO_UPNP[exc.kind], exc.detail)
