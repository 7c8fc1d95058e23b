"""LAN-side NAT-PMP server logic (RFC 6886): requests to wanted events, outcomes to answers.

NAT-PMP shares the PCP server port; ``pcp.handle_datagram`` dispatches version-0 datagrams
here. Errors from the core are PCP result codes (``events.Refused``); :data:`RESULTS` says
which NAT-PMP code each becomes.
"""

from __future__ import annotations

import ipaddress

from controld.pcpserver.events import (
    Address,
    AddressWanted,
    DeleteWanted,
    Done,
    Drop,
    Granted,
    Handled,
    MapWanted,
    Outcome,
    Refused,
    Reply,
    Requester,
    Wanted,
)
from shared import natpmp as codec
from shared.const import PCP_MAX_PACKET
from shared.pcp import IPAddress
from shared.pcp import Result as PcpResult

VERSION = codec.VERSION
NO_ADDRESS = ipaddress.IPv4Address(0)

# PCP result (the core's vocabulary) -> NAT-PMP result (RFC 6886 §3.5); unlisted: "Refused".
RESULTS: dict[int, codec.Result] = {
    PcpResult.SUCCESS: codec.Result.SUCCESS,
    PcpResult.NETWORK_FAILURE: codec.Result.NETWORK_FAILURE,
    PcpResult.NO_RESOURCES: codec.Result.NO_RESOURCES,
    PcpResult.USER_EX_QUOTA: codec.Result.NO_RESOURCES,
    PcpResult.EXCESSIVE_REMOTE_PEERS: codec.Result.NO_RESOURCES,
    PcpResult.UNSUPP_OPCODE: codec.Result.UNSUPP_OPCODE,
    PcpResult.UNSUPP_VERSION: codec.Result.UNSUPP_VERSION,
}


def result_for(pcp_result: int) -> codec.Result:
    """The NAT-PMP result code for a PCP one (RFC 6886 §3.5 has six codes; 2 is the catch-all)."""
    return RESULTS.get(pcp_result, codec.Result.NOT_AUTHORIZED)


def unsupported_version(epoch: int) -> bytes:
    """NAT-PMP's own 'Unsupported Version' answer (RFC 6886 §3.5, erratum 3618)."""
    return codec.unsupported_version(epoch)


def handle_datagram(data: bytes, source: IPAddress, source_port: int, epoch: int) -> Handled:
    """Check one version-0 datagram (RFC 6886 §3.5). Never raises on any input."""
    try:
        req = codec.decode_request(data)
    except codec.NatPmpDecodeError as exc:
        if exc.fault is codec.Fault.VERSION:
            return Reply(codec.unsupported_version(epoch), str(exc))
        if exc.fault is codec.Fault.OPCODE:
            return Reply(codec.unsupported_opcode(data, PCP_MAX_PACKET), f"NAT-PMP {exc} (RFC 6886 §3.5)")
        return Drop(f"NAT-PMP {exc.fault.value}: {exc}")
    if source.version != 4:
        return Drop("NAT-PMP over IPv6 (RFC 6886 is IPv4 only)")
    who = Requester("natpmp", source, source_port)
    if isinstance(req, codec.PublicAddressRequest):
        return AddressWanted(who)
    if req.lifetime == 0:  # §3.4: suggested port ignored; internal port 0 = all of this protocol
        return DeleteWanted(who, source, req.protocol, req.internal_port)
    if req.internal_port == 0:
        answer = codec.MapResponse(req.protocol, codec.Result.NOT_AUTHORIZED, epoch, 0, 0, 0)
        return Reply(codec.encode_response(answer), "NAT-PMP map of internal port 0 with a lifetime")
    return MapWanted(who, source, req.protocol, req.internal_port, req.lifetime, req.suggested_external_port)


def respond(event: Wanted, outcome: Outcome, epoch: int) -> bytes:
    """The NAT-PMP answer to a wanted event (RFC 6886 §3.2, §3.3, §3.4, §3.5)."""
    if isinstance(event, AddressWanted):
        if isinstance(outcome, Address):
            return codec.encode_response(codec.PublicAddressResponse(codec.Result.SUCCESS, epoch, outcome.external_ip))
        result = result_for(outcome.result) if isinstance(outcome, Refused) else codec.Result.NETWORK_FAILURE
        return codec.encode_response(codec.PublicAddressResponse(result, epoch, NO_ADDRESS))
    if not isinstance(event, MapWanted | DeleteWanted):
        raise ValueError(f"NAT-PMP has no answer for {type(event).__name__}")
    if isinstance(outcome, Refused):
        answer = codec.MapResponse(event.protocol, result_for(outcome.result), epoch, event.internal_port, 0, 0)
    elif isinstance(event, DeleteWanted) and isinstance(outcome, Done):
        answer = codec.MapResponse(event.protocol, codec.Result.SUCCESS, epoch, event.internal_port, 0, 0)
    elif isinstance(event, MapWanted) and isinstance(outcome, Granted):
        if outcome.external_ip.version != 4:
            raise ValueError("NAT-PMP grants only IPv4 external addresses")
        answer = codec.MapResponse(event.protocol, codec.Result.SUCCESS, epoch, event.internal_port,
                                   outcome.external_port, min(outcome.lifetime, codec.MAX_UINT32))
    else:
        raise ValueError(f"{type(outcome).__name__} does not answer {type(event).__name__}")
    return codec.encode_response(answer)
