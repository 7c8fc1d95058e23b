"""GetSpecificPortMappingEntry and ownership: the caller's own entry is answered from the table;
another control point's entry is refused with 606 under IGD:2 access control and shown under
IGD:1, and never probed upstream (RFC 6970 §5.7, docs/requirements.md IWF-56, IWF-60 and its notes)."""

from __future__ import annotations

import pytest

from tests.bed import testbed as tb
from tests.bed.fixtures import soap_call
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
KEY = {"NewRemoteHost": "", "NewExternalPort": "9000", "NewProtocol": "TCP"}


def test_get_specific_respects_ownership_per_igd_version(make_stack) -> None:
    st: Stack = make_stack(controld_args=["--igd-version", "2"])
    status, body = soap_call(st, "AddPortMapping", {
        **KEY, "NewInternalPort": "9000", "NewInternalClient": tb.LAN_HOST_IP, "NewEnabled": "1",
        "NewPortMappingDescription": "owner", "NewLeaseDuration": "3600"}, service=WANIP2)
    assert status == 200, body
    rules_before = st.bed.nat2_dnat_rules()

    status, body = soap_call(st, "GetSpecificPortMappingEntry", KEY, service=WANIP2)
    assert status == 200 and b"<NewInternalClient>192.168.1.2</NewInternalClient>" in body

    # 192.168.1.3 (the ctl namespace, on the LAN bridge) is another control point.
    status, body = soap_call(st, "GetSpecificPortMappingEntry", KEY, service=WANIP2, ns="ctl")
    assert status == 500 and b"<errorCode>606</errorCode>" in body, body
    status, body = soap_call(st, "GetSpecificPortMappingEntry", KEY, service=WANIP1, ns="ctl")
    assert status == 200 and b"<NewPortMappingDescription>owner</NewPortMappingDescription>" in body
    assert st.bed.nat2_dnat_rules() == rules_before  # answered locally: no probe reached NAT2
