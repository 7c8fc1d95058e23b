"""async-upnp-client's pinhole calls (IgdDevice.async_*_pinhole) on the LAN host against controld + natd.

The real client (Home Assistant's UPnP library, strict SCPD parsing) finds the IGD:2 device by SSDP,
then AddPinhole for the LAN host's global address, GetPinholePackets after traffic, UpdatePinhole
and DeletePinhole (docs/pinholes.md "What the controld side sends"). What a user sees is asserted:
bytes from the Internet host reaching the LAN host, natd's set element and its kernel timeout
(lease + pinhole_grace), and bytes stopped after the delete. One bed for the module.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.bed import testbed as tb
from tests.bed.fixtures import ipv6_stack
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

PORT = 8090
GRACE = 60  # natd's --pinhole-grace, passed explicitly so the timeouts below do not hang on a default

# One JSON command per stdin line, one JSON answer per stdout line: the test checks the kernel and
# the traffic between the client's calls without paying a start-up and a discovery for each.
CLIENT = r"""
import asyncio, json, sys
from datetime import timedelta
from ipaddress import IPv6Address
from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpActionResponseError
from async_upnp_client.profiles.igd import IgdDevice
from async_upnp_client.search import async_search

IGD2 = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"

async def main():
    found = []
    async def on_search(headers):
        found.append({k.lower(): v for k, v in headers.items() if isinstance(v, str)})
    await async_search(on_search, timeout=1, search_target=IGD2, source=(sys.argv[1], 0))
    location = next(h["location"] for h in found if h.get("st") == IGD2)
    requester = AiohttpRequester()
    device = await UpnpFactory(requester, non_strict=False).async_create_device(location)
    igd = IgdDevice(device, None)
    print(json.dumps({"location": location, "device_type": device.device_type,
                      "services": sorted(s.service_type for s in device.all_services)}), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "add":
                out = await igd.async_add_pinhole(IPv6Address("::"), 0, IPv6Address(cmd["client"]), cmd["port"],
                                                  6, timedelta(seconds=cmd["lease"]))
            elif op == "update":
                out = await igd.async_update_pinhole(cmd["uid"], cmd["lease"])
            elif op == "delete":
                out = await igd.async_delete_pinhole(cmd["uid"])
            elif op == "packets":
                out = await igd.async_get_pinhole_packets(cmd["uid"])
            else:
                out = await igd.async_get_firewall_status()
                out = out._asdict() if out else None
            print(json.dumps({"ok": out}), flush=True)
        except UpnpActionResponseError as exc:
            print(json.dumps({"upnp_error": exc.error_code}), flush=True)

asyncio.run(main())
"""


class Client:
    """The async-upnp-client process on the LAN host."""

    def __init__(self, bed: tb.Testbed) -> None:
        self.proc = bed.popen("lan", [sys.executable, "-c", CLIENT, tb.LAN_HOST_IP], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.hello = self._answer(20)

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:  # bounded: never hang the suite
            raise AssertionError(f"no answer from async-upnp-client in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"async-upnp-client ended: {self.proc.stderr.read()[-3000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        """One action; {"ok": result} or {"upnp_error": code}."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._answer(15)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture(scope="module")
def client() -> Iterator[tuple[Stack, Client]]:
    """natd owning the inbound IPv6 drop, controld, and the client, once for the module.
    Default secure mode: the client calls from IPv4, natd's neighbour table ties that to its IPv6 address."""
    for st in ipv6_stack(mode="nat1-only", natd_args=["--ipv6-firewall", "own", "--pinhole-grace", str(GRACE)]):
        c = Client(st.bed)
        try:
            yield st, c
        finally:
            c.close()


def pin6(bed: tb.Testbed) -> dict[tuple, int]:
    """natd's any-remote pinhole elements and their kernel timeouts (s)."""
    res = bed.run("cpe", ["nft", "-j", "list", "set", "ip6", "igdpcp", "pin6"], check=False)
    assert res.returncode == 0, res.stderr
    out = {}
    for item in json.loads(res.stdout)["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            out[tuple(e["elem"]["val"]["concat"])] = int(e["elem"]["timeout"])
    return out


def test_async_upnp_client_pinhole_add_traffic_update_delete(client: tuple[Stack, Client]) -> None:
    st, c = client
    bed = st.bed
    assert c.hello["device_type"] == "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
    assert "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1" in c.hello["services"]
    assert c.ask("status")["ok"] == {"firewall_enabled": True, "inbound_pinhole_allowed": True}

    uid = c.ask("add", client=tb.LAN_HOST_IP6, port=PORT, lease=600)["ok"]
    assert isinstance(uid, int) and uid > 0
    key = (tb.LAN_HOST_IP6, "tcp", PORT)
    assert pin6(bed) == {key: 600 + GRACE}
    assert bed.tcp_in6(PORT)
    assert c.ask("packets", uid=uid)["ok"] > 0  # the element's counter, through the client's parser

    assert c.ask("update", uid=uid, lease=1200) == {"ok": None}
    assert pin6(bed) == {key: 1200 + GRACE}  # the same element, re-leased
    assert bed.tcp_in6(PORT)

    assert c.ask("delete", uid=uid) == {"ok": None}
    assert pin6(bed) == {}
    assert not bed.tcp_in6(PORT, timeout=1.0)
    assert c.ask("packets", uid=uid) == {"upnp_error": 704}  # NoSuchEntry: the id is gone
    assert c.ask("delete", uid=uid) == {"upnp_error": 704}
