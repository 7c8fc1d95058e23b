"""controld/pcpserver/events.py: the core's neutral error kinds as PCP (and so NAT-PMP) results."""

from __future__ import annotations

import ipaddress

import pytest

from controld.pcpserver import pcp
from controld.pcpserver.events import (
    DeleteWanted,
    Done,
    MapWanted,
    PeerWanted,
    Refused,
    Requester,
    refusal,
)
from shared.pcp import Filter, Result
from tests.bed import pcp_client as c

SRC = ipaddress.IPv4Address("192.168.1.10")
WHO = Requester("pcp", SRC, 1, b"n" * 12)
MAP = MapWanted(WHO, SRC, 6, 80, 60, 80)
STRICT = MapWanted(WHO, SRC, 6, 80, 60, 80, prefer_failure=True)
FILTERED = MapWanted(WHO, SRC, 6, 80, 60, 80, filters=(Filter(128, 0, SRC),))
PEER = PeerWanted(WHO, SRC, 17, 5000, 60, ipaddress.IPv4Address("198.51.100.9"), 6000)
DELETE = DeleteWanted(WHO, SRC, 6, 80)


@pytest.mark.parametrize(("kind", "event", "result"), [
    ("not-authorized", MAP, Result.NOT_AUTHORIZED),
    ("denied", MAP, Result.NOT_AUTHORIZED),
    ("quota", MAP, Result.USER_EX_QUOTA),
    ("unavailable", MAP, Result.NETWORK_FAILURE),
    ("invalid", MAP, Result.MALFORMED_REQUEST),
    ("unsupported", MAP, Result.UNSUPP_PROTOCOL),
    ("conflict", STRICT, Result.CANNOT_PROVIDE_EXTERNAL),
    ("conflict", PEER, Result.CANNOT_PROVIDE_EXTERNAL),
    ("conflict", MAP, Result.NO_RESOURCES),  # RFC 6887 §7.4: CANNOT_PROVIDE_EXTERNAL "MUST only" ...
    ("not-found", MAP, Result.NOT_AUTHORIZED),
    ("something-new", MAP, Result.NO_RESOURCES),
])
def test_kind_to_result_rfc6887_7_4(kind: str, event: MapWanted, result: Result) -> None:
    assert refusal(event, kind) == Refused(result)


def test_delete_of_missing_mapping_succeeds_rfc6887_15_1() -> None:
    assert refusal(DELETE, "not-found") == Done()


@pytest.mark.parametrize(("upstream", "event", "result"), [
    (Result.USER_EX_QUOTA, MAP, Result.USER_EX_QUOTA),
    (Result.NO_RESOURCES, MAP, Result.NO_RESOURCES),
    (Result.CANNOT_PROVIDE_EXTERNAL, STRICT, Result.CANNOT_PROVIDE_EXTERNAL),
    (Result.CANNOT_PROVIDE_EXTERNAL, MAP, Result.NO_RESOURCES),
    (Result.EXCESSIVE_REMOTE_PEERS, FILTERED, Result.EXCESSIVE_REMOTE_PEERS),
    (Result.EXCESSIVE_REMOTE_PEERS, MAP, Result.NO_RESOURCES),
    (Result.MALFORMED_REQUEST, MAP, Result.NETWORK_FAILURE),  # about our request to NAT2, not the client's
    (Result.ADDRESS_MISMATCH, MAP, Result.NETWORK_FAILURE),
    (None, MAP, Result.NETWORK_FAILURE),
])
def test_upstream_results_passed_on_as_a_proxy_does_rfc7648(upstream: int | None, event: MapWanted,
                                                             result: Result) -> None:
    assert refusal(event, "upstream", upstream) == Refused(result)


def test_refusal_lifetime_reaches_the_answer() -> None:
    data = c.map_request(str(SRC), b"n" * 12, 6, 80, 60, 80)
    event = pcp.handle_datagram(data, SRC, 1, 5)
    assert isinstance(event, MapWanted)
    answer = c.parse_pcp(pcp.respond(event, refusal(event, "not-authorized", lifetime=99), 5))
    assert (answer.result, answer.lifetime) == (Result.NOT_AUTHORIZED, 99)
