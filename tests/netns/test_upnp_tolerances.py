"""Tolerances where a control point's intent is unambiguous (docs/upnp.md "Tolerances"), end to
end: DeletePortMapping with an empty NewProtocol, as a P2P port mapper sends on unmap."""

from __future__ import annotations

import pytest

from tests.bed.fixtures import soap_call
from tests.bed.stack import Stack
from tests.bed.upnp import add, error_code

pytestmark = pytest.mark.netns


def _delete(st: Stack, port: int, proto: str) -> tuple[int, bytes]:
    return soap_call(st, "DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": str(port),
                                               "NewProtocol": proto})


def test_delete_with_empty_protocol_removes_the_one_mapping_at_that_port(make_stack) -> None:
    st: Stack = make_stack()
    assert add(st, 8700, 8000, "UDP")[0] == 200
    assert ("udp", 8700) in st.nat1_forwards()
    status, body = _delete(st, 8700, "")
    assert status == 200, body
    assert ("udp", 8700) not in st.nat1_forwards()
    assert error_code(_delete(st, 8700, "")[1]) == 402  # nothing left there: no guess

    # both protocols mapped at one port: ambiguous, nothing removed
    assert add(st, 8701, 8000, "TCP")[0] == 200 and add(st, 8701, 8000, "UDP")[0] == 200
    status, body = _delete(st, 8701, "")
    assert status == 500 and error_code(body) == 402
    assert {("tcp", 8701), ("udp", 8701)} <= set(st.nat1_forwards())
    assert st.bed.internet_reaches(8000, 8701, b"still mapped")
