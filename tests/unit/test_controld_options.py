"""controld's device and address options (issue 11's defaults): the configured UUID, friendly
name, presentation URL, NOTIFY interval and external address reach what control points see."""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from controld import main as controld_main
from controld.adminapi.core_backend import CoreBackend
from controld.core.service import Iwf, IwfConfig
from controld.core.store import MappingTable
from controld.upnp import ssdp
from controld.upnp.description import Device, Gateway
from controld.upnp.igd import IgdActions
from shared import config, wire

NS = "{urn:schemas-upnp-org:device-1-0}"
U = "2fac1234-31f8-11b4-a222-08002b34c003"
WAN_IP = "100.64.0.2"  # private (shared address space): no external address of its own
LAN = "192.168.1.2"


def _args(*extra: str) -> argparse.Namespace:
    return controld_main.build_parser().parse_args(
        ["--lan-if", "br-lan", "--rpc", "ipc:///x", "--events", "ipc:///y", "--state-dir", "/tmp/x", *extra])


def _udns(gw: Gateway) -> list[str]:
    """Every root device's UDNs, the IGD:1 root's first."""
    return [e.text or "" for d in gw.devices for e in ET.fromstring(d.root_xml()).iter(f"{NS}UDN")]


def test_configured_uuid_fixes_every_udn_and_usn(tmp_path: Path) -> None:
    a = MappingTable(str(tmp_path / "a"))
    b = MappingTable(str(tmp_path / "b"))  # another state dir: what a reboot leaves (RAM)
    try:
        d1, d2 = controld_main._device(_args("--uuid", U), a), controld_main._device(_args("--uuid", U), b)
        assert _udns(d1) == _udns(d2) and _udns(d1)[0] == f"uuid:{U}" and len(set(_udns(d1))) == 3 * len(d1.devices)
        assert [t.usn for t in ssdp.search_targets(d1)] == [t.usn for t in ssdp.search_targets(d2)]
        assert all(uuid.UUID(x.removeprefix("uuid:")) for x in _udns(d1))
        # the embedded devices' UDNs are uuid5 of the root, as routers in use already announce them
        assert f"uuid:{uuid.uuid5(uuid.UUID(U), 'WANConnectionDevice')}" in _udns(d1)
        # another UUID: other embedded devices too
        other = controld_main._device(_args("--uuid", str(uuid.uuid4())), a)
        assert not set(_udns(other)) & set(_udns(d1))
        # none configured: kept in the table as before (same table, same UUIDs; another table, others)
        t1, t2 = controld_main._device(_args(), a), controld_main._device(_args(), a)
        assert _udns(t1) == _udns(t2) and U not in _udns(t1)[0]
        assert _udns(controld_main._device(_args(), b)) != _udns(t1)
    finally:
        a.close()
        b.close()


def test_friendly_name_and_presentation_url_reach_the_description(tmp_path: Path) -> None:
    t = MappingTable(str(tmp_path))
    try:
        dev = controld_main._device(_args("--friendly-name", "Den <router>", "--presentation-url",
                                          "http://192.168.1.1/cgi-bin/luci?a=1&b=2", "--igd-version", "2"), t)
        dev.present_at("http://192.168.1.1:5000/igdpcp/")  # the LAN page: the configured URL wins
        for view in (dev.devices[0], dev.view("Microsoft-Windows/10.0 UPnP/1.0")):  # the IGD:1 view too
            root = ET.fromstring(view.root_xml()).find(f"{NS}device")
            assert root is not None
            assert root.findtext(f"{NS}friendlyName") == "Den <router>"
            assert root.findtext(f"{NS}presentationURL") == "http://192.168.1.1/cgi-bin/luci?a=1&b=2"
        default = controld_main._device(_args(), t)
        default.present_at("http://192.168.1.1:5000/igdpcp/")
        plain = ET.fromstring(default.devices[0].root_xml()).find(f"{NS}device")
        assert plain is not None and plain.findtext(f"{NS}friendlyName") == config.default("friendly-name")
        assert plain.findtext(f"{NS}presentationURL") == "http://192.168.1.1:5000/igdpcp/"  # no option: the page
        assert Device("r", "w", "c").friendly_name == config.default("friendly-name")  # one default
    finally:
        t.close()


class _Sent:
    def __init__(self) -> None:
        self.datagrams: list[bytes] = []

    def sendto(self, data: bytes, addr: object) -> None:
        self.datagrams.append(data)


class _Stop(Exception):
    pass


def test_notify_interval_sets_the_period_and_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    srv = ssdp.SsdpServer(Device("r", "w", "c"), "192.168.1.1", "http://192.168.1.1:5000/rootDesc.xml",
                          lambda: ["192.168.1.0/24"], notify_interval=60)
    sent = _Sent()
    srv.transport = sent  # type: ignore[assignment]
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)
        if len(waits) == 2:
            raise _Stop

    monkeypatch.setattr(ssdp.asyncio, "sleep", sleep)
    with pytest.raises(_Stop):
        srv.run_notify().send(None)  # drives the loop body without an event loop: sleep is ours
    assert 60 * 0.9 - 0.25 <= waits[1] <= 60 - 0.25
    assert sent.datagrams and all(b"CACHE-CONTROL: max-age=180\r\n" in d for d in sent.datagrams)
    srv._pending = 1
    srv._answer(srv.targets[:1], ("192.168.1.9", 1900))
    assert b"CACHE-CONTROL: max-age=180\r\n" in sent.datagrams[-1]
    # the default: max-age three times the option's default
    assert ssdp.MAX_AGE == 3 * config.default("notify-interval") == ssdp.SsdpServer(
        Device("r", "w", "c"), "x", "y", list).max_age


class _Link:
    """natd as far as a nat1-only start needs it."""

    async def call(self, msg: wire.Message, timeout: float = 5.0) -> wire.Message:
        if isinstance(msg, wire.Hello):
            return wire.HelloReply("boot", WAN_IP, "100.64.0.1", ["192.168.1.1"], ["192.168.1.0/24"])
        if isinstance(msg, wire.Sync):
            return wire.SyncReply(len(msg.bindings), 0)
        return wire.Ok()


def test_external_address_precedence_without_pcp(tmp_path: Path) -> None:
    """nat1-only: external_ip > STUN (from the current WAN address; an error clears it) > a public WAN
    address; GetExternalIPAddress and the GENA ExternalIPAddress value follow, and each change events."""
    async def body() -> None:
        table = MappingTable(str(tmp_path))
        iwf = Iwf(IwfConfig(mode="nat1-only", service_wait=0.0, epoch_poll=0.0), table, _Link(),  # type: ignore[arg-type]
                  rng=random.Random(1))
        actions = IgdActions(iwf, Device("r", "w", "c"))
        rounds: list[int] = []
        table.subscribe(lambda _ev: rounds.append(1))
        await iwf.start()

        async def seen() -> tuple[str, str]:
            out = await actions.get_external_ip_address(None, LAN)  # type: ignore[arg-type]
            evented = actions.evented(Device("r", "w", "c").wanip, LAN)
            return str(out["NewExternalIPAddress"]), evented["ExternalIPAddress"]

        try:
            assert await seen() == ("", "")  # private WAN address, nothing else known
            await iwf.on_natd_event(wire.StunResult("198.51.100.1", WAN_IP, "198.20.0.1", 40000, 3478))
            assert await seen() == ("198.20.0.1", "198.20.0.1") and len(rounds) == 1
            assert (await CoreBackend(iwf).status()).ext_ip == "198.20.0.1"  # igdpcp status
            await iwf.on_natd_event(wire.StunResult("198.51.100.1", WAN_IP, "198.20.0.1", 40000, 3478))
            assert len(rounds) == 1  # natd's repeats change nothing
            await iwf.on_natd_event(wire.StunResult("198.51.100.1", "100.64.0.9", "198.20.0.7"))
            assert (await seen())[0] == "198.20.0.1"  # from another WAN address: not ours
            iwf.set_config(IwfConfig(mode="nat1-only", external_ip="203.0.113.5"))  # SIGHUP
            assert await seen() == ("203.0.113.5", "203.0.113.5") and len(rounds) == 2
            iwf.set_config(IwfConfig(mode="nat1-only"))
            assert (await seen())[0] == "198.20.0.1" and len(rounds) == 3
            await iwf.on_natd_event(wire.StunResult("198.51.100.1", WAN_IP, None, error="no answer after 7 tries"))
            assert await seen() == ("", "") and len(rounds) == 4
            iwf.wan_ip = "198.20.0.77"  # a public WAN address is its own external address
            assert (await seen())[0] == "198.20.0.77"
        finally:
            await iwf.stop()
            table.close()

    asyncio.run(asyncio.wait_for(body(), 20))


def test_external_ip_option_reaches_the_core() -> None:
    args = _args("--external-ip", "203.0.113.5")
    assert controld_main._iwf_config(args).external_ip == "203.0.113.5"
    assert controld_main._iwf_config(_args()).external_ip is None
    assert "external_ip" not in config.restart_only("controld")  # SIGHUP applies it
