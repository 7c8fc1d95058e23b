"""Typed endpoints over the row's string columns: the family is the address's, not a guess."""

from __future__ import annotations

import ipaddress

from controld.core.lifecycle import State
from controld.core.model import Endpoint, Mapping


def _row(**kw: object) -> Mapping:
    base: dict[str, object] = dict(id=1, cp="192.168.1.2", igd=1, remote_host="", ext_port=8080, proto=6,
                                   int_client="192.168.1.2", int_port=80, description="", lease=0, lease_end=None,
                                   state=State.ACTIVE, created=0.0)
    base.update(kw)
    return Mapping(**base)  # type: ignore[arg-type]


def test_endpoints_are_typed_by_family() -> None:
    m = _row(ext_ip="198.20.0.1", remote_host="203.0.113.9")
    assert m.internal == Endpoint(ipaddress.IPv4Address("192.168.1.2"), 80) and str(m.internal) == "192.168.1.2:80"
    assert m.external == Endpoint(ipaddress.IPv4Address("198.20.0.1"), 8080)
    assert m.remote == ipaddress.IPv4Address("203.0.113.9") and m.requester == ipaddress.IPv4Address("192.168.1.2")
    v6 = _row(int_client="2001:db8::2", cp="2001:db8::2", ext_ip="2001:db8:1::1")
    assert isinstance(v6.internal.ip, ipaddress.IPv6Address) and str(v6.external) == "[2001:db8:1::1]:8080"


def test_no_grant_no_external_and_any_remote() -> None:
    m = _row()
    assert m.external is None and m.remote is None
