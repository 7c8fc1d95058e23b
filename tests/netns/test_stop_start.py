"""Stopping the service closes every port; starting it restores them from controld's table.

miniupnpd's init script empties its chains on stop; igdpcp's natd does the same on SIGTERM
(procd and systemd stop send it). The mappings live on in controld's table: natd's new boot
id makes controld re-sync, so a restart gives them back within about two seconds.
"""

from __future__ import annotations

import time

import pytest

from tests.bed import testbed as tb
from tests.bed.fixtures import soap_call
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

PAYLOAD = b"igdpcp: closed on stop, back on start"


def _add(st: Stack, ext: int, internal: int) -> int:
    status, _ = soap_call(st, "AddPortMapping", {
        "NewRemoteHost": "", "NewExternalPort": str(ext), "NewProtocol": "TCP", "NewInternalPort": str(internal),
        "NewInternalClient": tb.LAN_HOST_IP, "NewEnabled": "1", "NewPortMappingDescription": "stop-start",
        "NewLeaseDuration": "0"})
    return status


def test_natd_stop_closes_every_forward_and_start_restores_them(make_stack) -> None:
    st: Stack = make_stack()
    bed = st.bed
    assert _add(st, 8080, 8000) == 200 and _add(st, 8081, 8001) == 200
    before = st.nat1_forwards()
    assert len(before) == 2 and bed.internet_reaches(8000, 8080, PAYLOAD)

    assert st.stop("natd") == 0
    assert st.nat1_forwards() == {}  # the kernel holds none of them
    assert not bed.internet_reaches(8000, 8080, PAYLOAD, timeout=1.0)
    assert "stop: closed 2 forwards" in st.log("natd")

    st.start_natd()
    deadline = time.monotonic() + 5.0
    while st.nat1_forwards() != before and time.monotonic() < deadline:  # bounded poll
        time.sleep(0.05)
    # natd's first heartbeat (1 s) carries the new boot id and controld re-syncs at once.
    assert st.nat1_forwards() == before, st.log("controld")[-2000:]
    assert "re-syncing NAT1" in st.log("controld")
    assert bed.internet_reaches(8000, 8080, PAYLOAD) and bed.internet_reaches(8001, 8081, PAYLOAD)
