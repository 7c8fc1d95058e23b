"""``igdpcp import-upnpd``: real-shaped /etc/config/upnpd files (tests/data/upnpd-*.conf:
miniupnpd's stock file, a luci-app-upnp-edited one, a CGNAT ext_ip one) into the shipped
/etc/config/igdpcp, read back by both daemons' own parsers and controld's rule engine."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from shared.cli import run
from shared.config import parse_args_with_config, parse_uci
from tests.bed.ipk import load_builder

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def target(tmp_path: Path) -> Path:
    conf = tmp_path / "igdpcp"
    conf.write_bytes(load_builder()._template("files/igdpcp.config", "0-test", "openwrt"))
    return conf


def _import(src: str, conf: Path, *extra: str) -> int:
    return run(["import-upnpd", "--from", str(DATA / src), "--to", str(conf), *extra])


def _daemons(conf: Path) -> tuple[Any, Any, dict[str, str]]:
    from controld.main import build_parser as controld_parser
    from natd.main import build_parser as natd_parser

    natd = parse_args_with_config(natd_parser(), ["--config", str(conf), "--wan-if", "w", "--lan-if", "l"], "natd")
    ctl = parse_args_with_config(controld_parser(), ["--config", str(conf), "--lan-if", "l"], "controld")
    service = next(s for s in parse_uci(conf.read_text()) if s.type == "service")
    return natd, ctl, service.options


def test_luci_edited_config_carries_over(target: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from controld.core.policy import Permissions

    assert _import("upnpd-luci-custom.conf", target) == 0
    natd, ctl, service = _daemons(target)
    assert (service["enabled"], service["wan_network"], service["lan_network"]) == ("1", "wan", "lan")
    assert (natd.stun_server, natd.stun_port) == ("stun.l.google.com", 19302)
    assert (ctl.secure_mode, ctl.notify_interval, ctl.uuid, ctl.http_port, ctl.igd_version) == \
        (False, 900, "e9d1bc39-6a5e-4c73-a2a4-6e1b3a9f1c20", 5000, 2)
    assert ctl.presentation_url == "http://192.168.7.1/cgi-bin/luci/admin/services/upnp"
    assert ctl.permission[:2] == ["allow 3074 192.168.7.20 3074", "allow 27015-27030 192.168.7.0/24 27015-27030"]
    perms = Permissions.parse(ctl.permission)
    assert perms.allowed(3074, "192.168.7.20", 3074) and perms.allowed(27020, "192.168.7.9", 27020)
    assert not perms.allowed(80, "192.168.7.20", 80)
    err = capsys.readouterr().err
    assert "not carried over: enable_natpmp '0'" in err and "perm_rule: 4 sections" in err
    assert "#option stun_interval '300'" in target.read_text()  # the rest of the file is untouched


def test_stock_config_keeps_igdpcp_disabled_and_the_same_acl(target: Path) -> None:
    before = _daemons(target)[1].permission
    assert _import("upnpd-stock.conf", target) == 0
    natd, ctl, service = _daemons(target)
    assert service["enabled"] == "0" and "wan_network" not in service  # upnpd looks the WAN up too
    assert ctl.permission == before and ctl.igd_version == 1 and ctl.http_port == 5000
    assert natd.stun_server is None


def test_cgnat_ext_ip_config(target: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _import("upnpd-cgnat-extip.conf", target) == 0
    natd, ctl, service = _daemons(target)
    assert ctl.external_ip == "203.0.113.45" and service["wan_network"] == "wwan" and natd.stun_server is None
    assert ctl.permission == ["deny 0-1023 0.0.0.0/0 0-65535", "allow 1024-65535 192.168.1.0/255.255.255.0 1024-65535"]
    err = capsys.readouterr().err
    assert "internal_iface guest" in err and "stun_host (use_stun is off)" in err


def test_dry_run_prints_and_changes_nothing(target: Path) -> None:
    before, out = target.read_text(), io.StringIO()
    assert run(["import-upnpd", "--from", str(DATA / "upnpd-luci-custom.conf"), "--to", str(target), "--dry-run"],
               out) == 0
    assert target.read_text() == before and "option stun_server 'stun.l.google.com'" in out.getvalue()


@pytest.mark.parametrize("bad, why", [
    ("config upnpd 'config'\n\toption uuid 'not-a-uuid'\n", "not a UUID"),
    ("config upnpd 'config'\n\toption ext_ip 'example.com'\n", "not an IPv4 address"),
    ("config upnpd 'config'\nconfig perm_rule\n\toption action 'maybe'\n", "allow or deny"),
    ("config perm_rule\n\toption action 'allow'\n", "not a miniupnpd configuration"),
])
def test_bad_input_is_one_line_and_writes_nothing(target: Path, tmp_path: Path, bad: str, why: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "upnpd"
    src.write_text(bad)
    before = target.read_text()
    assert run(["import-upnpd", "--from", str(src), "--to", str(target)]) == 1
    err = capsys.readouterr().err
    assert why in err and len(err.splitlines()) == 1 and target.read_text() == before
