"""UPnP errors and the PCP result -> UPnP error table (RFC 6970 §4.3, rfc6970-iwf §16).

The table is data, in one place; :func:`upnp_error_for_pcp` is the only reader.
"""

from __future__ import annotations

from shared.pcp import Result

# UPnP error code -> description (WANIPConnection service templates, rfc6970-iwf §19).
UPNP_ERRORS: dict[int, str] = {
    401: "Invalid Action",
    402: "Invalid Args",
    501: "Action Failed",
    606: "Action not authorized",
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


# PCP result -> (error under IGD:1, error under IGD:2). RFC 6970 §4.3, rfc6970-iwf §16.
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
# GetSpecificPortMappingEntry probe (§5.7; rfc6970-iwf §18 item 3).
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
