"""Tests for shared.config: the UCI parser and argparse integration."""
from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

import pytest

from shared.config import ConfigError, Section, load_uci, parse_args_with_config, parse_uci

IGDPCP = """\
# igdpcp configuration
config natd 'natd'
\toption wan_if 'wan'
\toption lan_if "br-lan"
\toption rpc 'ipc:///var/run/igdpcp/rpc.sock'
\tlist lan_subnet '192.168.1.0/24'
\tlist lan_subnet 10.0.0.0/8

config controld 'controld'
\toption lan_if 'br-lan'
\toption mode 'auto'
\toption state_dir '/var/lib/igdpcp'
\toption secure_mode '1'
\tlist permission 'allow 1024-65535 192.168.1.0/24 1024-65535'
\tlist permission 'deny 0-65535 0.0.0.0/0 0-65535'
"""

# Shapes taken from OpenWrt's stock /etc/config/upnpd and /etc/config/firewall.
UPNPD = """\
config upnpd config
\toption enabled\t\t0
\toption enable_natpmp\t1
\t#by default, looked up dynamically from ubus
\t#option external_iface\twan
\toption internal_iface\tlan
\toption port\t\t5000

config perm_rule
\toption action\t\tallow
\toption ext_ports\t1024-65535
\toption int_addr\t\t0.0.0.0/0\t# Does not override secure_mode
\toption int_ports\t1024-65535
\toption comment\t\t"Allow high ports"

config perm_rule
\toption action\t\tdeny
\toption ext_ports\t0-65535
\toption comment\t\t"Default deny"
"""

FIREWALL = """\
package firewall

config defaults
\toption syn_flood\t1
\toption input\t\tREJECT

config zone
\toption name\t\tlan
\tlist   network\t\t'lan'

config zone
  option name   wan
  list network  'wan'
  list network  'wan6'
  option masq   1

config rule 'allow_dhcp'
\toption name\t\tAllow-DHCP-Renew
\toption target\t\tACCEPT

config wifi-device 'radio0'
\toption type 'mac80211'
"""


# ---------------------------------------------------------------- parse_uci

def test_igdpcp_file() -> None:
    natd, controld = parse_uci(IGDPCP, "igdpcp")
    assert natd == Section("natd", "natd",
                           {"wan_if": "wan", "lan_if": "br-lan",
                            "rpc": "ipc:///var/run/igdpcp/rpc.sock"},
                           {"lan_subnet": ["192.168.1.0/24", "10.0.0.0/8"]}, 2)
    assert controld.type == "controld" and controld.name == "controld" and controld.line == 9
    assert controld.options["secure_mode"] == "1"
    assert controld.lists["permission"] == ["allow 1024-65535 192.168.1.0/24 1024-65535",
                                            "deny 0-65535 0.0.0.0/0 0-65535"]
    assert natd.lines["lan_subnet"] == [6, 7]
    assert controld.lines["mode"] == [11]


def test_upnpd_shape_anonymous_sections_and_trailing_comments() -> None:
    cfg, allow, deny = parse_uci(UPNPD)
    assert (cfg.type, cfg.name) == ("upnpd", "config")
    assert cfg.options == {"enabled": "0", "enable_natpmp": "1",
                           "internal_iface": "lan", "port": "5000"}
    assert (allow.type, allow.name, deny.type, deny.name) == ("perm_rule", None, "perm_rule", None)
    assert allow.options["int_addr"] == "0.0.0.0/0"
    assert allow.options["comment"] == "Allow high ports"
    assert deny.options == {"action": "deny", "ext_ports": "0-65535", "comment": "Default deny"}


def test_firewall_shape_package_line_spaces_and_dashed_type() -> None:
    sections = parse_uci(FIREWALL)
    assert [(s.type, s.name) for s in sections] == [
        ("defaults", None), ("zone", None), ("zone", None),
        ("rule", "allow_dhcp"), ("wifi-device", "radio0")]
    assert sections[1].lists == {"network": ["lan"]}
    assert sections[2].lists == {"network": ["wan", "wan6"]}
    assert sections[2].options == {"name": "wan", "masq": "1"}


def test_quoting_like_uci() -> None:
    text = r"""config t
	option a 'it'\''s'
	option b "say \"hi\" \\ \$x"
	option c pre'fix "mid" 'suf
	option d ''
	option e "# not a comment"
	option f bare#comment
	option g 'x' # comment
	option h "two
lines"
	option i back\ slash
"""
    (s,) = parse_uci(text)
    assert s.options == {"a": "it's", "b": 'say "hi" \\ $x', "c": 'prefix "mid" suf',
                         "d": "", "e": "# not a comment", "f": "bare", "g": "x",
                         "h": "two\nlines", "i": "back slash"}
    assert s.lines["h"] == [9] and s.lines["i"] == [11]


def test_line_continuation_semicolons_and_short_keywords() -> None:
    text = "config t 'n'\n\toption a \\\n  'v'\no b 2; l c x; l c y\n\tlist c z\n"
    (s,) = parse_uci(text)
    assert s.options == {"a": "v", "b": "2"} and s.lists == {"c": ["x", "y", "z"]}
    assert s.lines["b"] == [4] and s.lines["c"] == [4, 4, 5]


def test_option_override_list_conversion_and_named_merge() -> None:
    text = """config t 'n'
	option a 1
	option a 2
	option l first
	list l second
config other
config t 'n'
	option b 3
"""
    sections = parse_uci(text)
    assert len(sections) == 2
    assert sections[0].options == {"a": "2", "b": "3"}
    assert sections[0].lists == {"l": ["first", "second"]}
    assert sections[0].lines["l"] == [4, 5]


def test_empty_text_and_only_comments() -> None:
    assert parse_uci("") == []
    assert parse_uci("# nothing\n\n   \n\t# here\n") == []


@pytest.mark.parametrize("text, line, reason", [
    ("option a b\n", 1, "before any 'config'"),
    ("\n# c\n\tlist a b\nconfig t\n", 3, "before any 'config'"),
    ("config t\n\toption a 'unterminated\n", 2, "unterminated single quote"),
    ('config t\n\toption a "x\n\n', 2, "unterminated double quote"),
    ("config t\n\toption a\n", 2, "missing value for option 'a'"),
    ("config t\n\tlist\n", 2, "missing name after 'list'"),
    ("config t\n\toption a b c\n", 2, "extra word 'c'"),
    ("config t\n\tlist a b c\n", 2, "extra word 'c'"),
    ("config t\n\toptoin a b\n", 2, "unknown keyword 'optoin'"),
    ("config\n", 1, "missing section type"),
    ("config t n extra\n", 1, "extra word 'extra'"),
    ("config t 'bad-name'\n", 1, "invalid section name 'bad-name'"),
    ("config t\n\toption 'wan-if' x\n", 2, "invalid option name 'wan-if'"),
    ("config t\n\tlist 'a b' x\n", 2, "invalid list name 'a b'"),
    ("config 'a b'\n", 1, "invalid section type"),
    ("package\n", 1, "'package' takes exactly one name"),
    ("config a 'n'\nconfig b 'n'\n", 2, "section 'n' redefined as 'b'"),
])
def test_errors(text: str, line: int, reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_uci(text, "/etc/config/igdpcp")
    msg = str(exc.value)
    assert msg.startswith(f"/etc/config/igdpcp:{line}: "), msg
    assert reason in msg


def test_default_filename() -> None:
    with pytest.raises(ConfigError, match=r"^<config>:1: "):
        parse_uci("bogus\n")


def test_load_uci(tmp_path: Path) -> None:
    p = tmp_path / "igdpcp"
    p.write_text(IGDPCP)
    assert [s.type for s in load_uci(str(p))] == ["natd", "controld"]
    p.write_text("config t\n\toption x\n")
    with pytest.raises(ConfigError, match=rf"^{p}:2: missing value"):
        load_uci(str(p))


def test_load_uci_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as exc:
        load_uci(str(missing))
    assert str(exc.value).startswith(f"{missing}: ")
    assert "No such file" in str(exc.value)


# ---------------------------------------------------- parse_args_with_config

def natd_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="natd", exit_on_error=False)  # ConfigError raised
    p.add_argument("--config", metavar="PATH")
    p.add_argument("--wan-if", required=True)
    p.add_argument("--lan-if", default="br-lan")
    p.add_argument("--rpc", default="ipc:///tmp/rpc.sock")
    p.add_argument("--lan-subnet", action="append", type=ipaddress.ip_network)
    p.add_argument("--port", type=int, default=5351)
    p.add_argument("--secure-mode", action="store_true")
    p.add_argument("--no-announce", dest="announce", action="store_false")
    p.add_argument("--mode", choices=["auto", "pcp", "off"], default="auto")
    return p


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "igdpcp"
    p.write_text(text)
    return str(p)


def test_file_values_reach_namespace(tmp_path: Path) -> None:
    path = write(tmp_path, IGDPCP.replace("config natd 'natd'",
                                          "config natd 'natd'\n\toption port 5400"))
    ns = parse_args_with_config(natd_parser(), ["--config", path], "natd")
    assert ns.wan_if == "wan" and ns.lan_if == "br-lan"
    assert ns.rpc == "ipc:///var/run/igdpcp/rpc.sock"
    assert ns.lan_subnet == [ipaddress.ip_network("192.168.1.0/24"),
                             ipaddress.ip_network("10.0.0.0/8")]
    assert ns.port == 5400
    assert ns.secure_mode is False and ns.announce is True and ns.mode == "auto"
    assert ns.config == path


def test_command_line_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "config natd\n\toption wan_if wan\n\toption port 1\n"
                           "\toption secure_mode 1\n\tlist lan_subnet 10.0.0.0/8\n")
    ns = parse_args_with_config(
        natd_parser(),
        ["--wan-if", "eth1", "--config", path, "--port", "2", "--lan-subnet", "172.16.0.0/12"],
        "natd")
    assert ns.wan_if == "eth1" and ns.port == 2
    # An append flag on the command line replaces the file's list rather than extending it.
    assert ns.lan_subnet == [ipaddress.ip_network("172.16.0.0/12")]
    assert ns.secure_mode is True


def test_without_config_is_plain_argparse() -> None:
    ns = parse_args_with_config(natd_parser(), ["--wan-if", "wan"], "natd")
    assert ns.config is None and ns.lan_subnet is None and ns.port == 5351
    with pytest.raises(SystemExit):
        parse_args_with_config(natd_parser(), [], "natd")


def test_config_flag_added_when_missing(tmp_path: Path) -> None:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--lan-if")
    path = write(tmp_path, "config controld\n\toption lan_if br-lan\n")
    ns = parse_args_with_config(p, ["--config", path], "controld")
    assert ns.lan_if == "br-lan" and ns.config == path


@pytest.mark.parametrize("word, on", [
    ("1", True), ("yes", True), ("on", True), ("true", True), ("enabled", True),
    ("0", False), ("no", False), ("off", False), ("false", False), ("disabled", False),
])
def test_booleans(tmp_path: Path, word: str, on: bool) -> None:
    path = write(tmp_path, f"config natd\n\toption wan_if w\n\toption secure_mode '{word}'\n"
                           f"\toption no_announce {word}\n")
    ns = parse_args_with_config(natd_parser(), ["--config", path], "natd")
    assert ns.secure_mode is on
    assert ns.announce is (not on)


def test_boolean_optional_action(tmp_path: Path) -> None:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=True)
    path = write(tmp_path, "config natd\n\toption ipv6 0\n")
    assert parse_args_with_config(p, ["--config", path], "natd").ipv6 is False
    assert parse_args_with_config(p, ["--config", path, "--ipv6"], "natd").ipv6 is True


def test_bad_boolean(tmp_path: Path) -> None:
    path = write(tmp_path, "config natd\n\toption wan_if w\n\toption secure_mode maybe\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: invalid boolean 'maybe'"):
        parse_args_with_config(natd_parser(), ["--config", path], "natd")


def test_required_flag_from_file_alone(tmp_path: Path) -> None:
    parser = natd_parser()
    path = write(tmp_path, "config natd 'natd'\n\toption wan_if 'wan'\n")
    assert parse_args_with_config(parser, ["--config", path], "natd").wan_if == "wan"
    # The parser is left as it was: without the file the flag is required again.
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert parser.get_default("wan_if") is None


def test_required_flag_missing_everywhere(tmp_path: Path) -> None:
    path = write(tmp_path, "config natd\n\toption lan_if br0\n")
    with pytest.raises(SystemExit):
        parse_args_with_config(natd_parser(), ["--config", path], "natd")


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "config natd 'natd'\n\toption wan_if wan\n\toption wna_if x\n")
    with pytest.raises(ConfigError) as exc:
        parse_args_with_config(natd_parser(), ["--config", path], "natd")
    assert str(exc.value).startswith(f"{path}:3: unknown option 'wna_if' in section natd")
    assert "did you mean 'wan_if'" in str(exc.value)


def test_config_and_help_keys_are_refused(tmp_path: Path) -> None:
    for key in ("config", "help"):
        path = write(tmp_path, f"config natd\n\toption wan_if w\n\toption {key} x\n")
        with pytest.raises(ConfigError, match=rf"^{path}:3: unknown option '{key}'"):
            parse_args_with_config(natd_parser(), ["--config", path], "natd")


def test_other_section_types_ignored_first_section_used(tmp_path: Path) -> None:
    path = write(tmp_path, """\
config controld 'controld'
	option state_dir /var/lib/igdpcp
	option bogus_for_natd 1
config natd 'first'
	option wan_if wan1
config natd 'second'
	option wan_if wan2
	option nonsense x
""")
    ns = parse_args_with_config(natd_parser(), ["--config", path], "natd")
    assert ns.wan_if == "wan1"


def test_no_section_of_type_gives_no_values(tmp_path: Path) -> None:
    path = write(tmp_path, "config controld\n\toption mode auto\n")
    ns = parse_args_with_config(natd_parser(), ["--config", path, "--wan-if", "w"], "natd")
    assert ns.mode == "auto" and ns.port == 5351


def test_conversion_errors_name_file_and_line(tmp_path: Path) -> None:
    cases = [
        ("\toption port http\n", "invalid value 'http' for 'port'"),
        ("\tlist lan_subnet 10.0.0.0/8\n\tlist lan_subnet 300.1.1.0/24\n",
         "invalid value '300.1.1.0/24' for 'lan_subnet'"),
        ("\toption mode turbo\n", "invalid value 'turbo' for 'mode' (choose from"),
        ("\tlist lan_if a\n", "'lan_if' takes one value; use 'option', not 'list'"),
    ]
    for body, reason in cases:
        path = write(tmp_path, "config natd\n\toption wan_if w\n" + body)
        line = 2 + body.count("\n")
        with pytest.raises(ConfigError) as exc:
            parse_args_with_config(natd_parser(), ["--config", path], "natd")
        assert str(exc.value).startswith(f"{path}:{line}: "), str(exc.value)
        assert reason in str(exc.value)


def test_option_feeds_append_as_one_element_list(tmp_path: Path) -> None:
    path = write(tmp_path, "config natd\n\toption wan_if w\n\toption lan_subnet 10.0.0.0/8\n")
    ns = parse_args_with_config(natd_parser(), ["--config", path], "natd")
    assert ns.lan_subnet == [ipaddress.ip_network("10.0.0.0/8")]


def test_nargs_list_and_controld_permissions(tmp_path: Path) -> None:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--lan-if")
    p.add_argument("--mode")
    p.add_argument("--state-dir")
    p.add_argument("--secure-mode", action="store_true")
    p.add_argument("--permission", nargs="+", default=[])
    path = write(tmp_path, IGDPCP)
    ns = parse_args_with_config(p, ["--config", path], "controld")
    assert ns.permission == ["allow 1024-65535 192.168.1.0/24 1024-65535",
                             "deny 0-65535 0.0.0.0/0 0-65535"]
    assert ns.secure_mode is True and ns.state_dir == "/var/lib/igdpcp"
    ns = parse_args_with_config(p, ["--config", path, "--permission", "deny 0-65535 x 0-65535"],
                                "controld")
    assert ns.permission == ["deny 0-65535 x 0-65535"]


def test_type_conversion_runs_once(tmp_path: Path) -> None:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--name", type=lambda s: "x" + s)
    path = write(tmp_path, "config natd\n\toption name abc\n")
    assert parse_args_with_config(p, ["--config", path], "natd").name == "xabc"


def test_missing_config_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match=f"^{missing}: cannot read"):
        parse_args_with_config(natd_parser(), ["--config", missing, "--wan-if", "w"], "natd")


def test_syntax_error_in_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "config natd\n\toption wan_if 'wan\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: unterminated single quote"):
        parse_args_with_config(natd_parser(), ["--config", path], "natd")


def test_crlf_empty_name_semicolon_in_quotes_and_trailing_backslash() -> None:
    text = "config t ''\r\n\toption a 'x;y'\r\n\toption b \"p#q\"\r\n\toption c end\\"
    (s,) = parse_uci(text)
    assert s.name is None
    assert s.options == {"a": "x;y", "b": "p#q", "c": "end"}


def test_bare_config_flag_is_reported_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    parser = natd_parser()
    parser.exit_on_error = True
    with pytest.raises(SystemExit):
        parse_args_with_config(parser, ["--wan-if", "w", "--config"], "natd")
    assert "--config: expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize("daemon, body, reason", [
    ("natd", "config natd\n\toption wan_if 'wan\n", ":2: unterminated single quote"),
    ("controld", "config controld\n\toption lan_if br-lan\n\toption mode turbo\n",
     ":3: invalid value 'turbo' for 'mode'"),
    ("natd", "config natd\n\toption wna_if eth1\n", ":2: unknown option 'wna_if' in section natd"),
])
def test_daemon_with_bad_config_exits_with_one_line(tmp_path: Path, daemon: str, body: str,
                                                     reason: str) -> None:
    """The real daemons: a bad /etc/config/igdpcp gives one line naming file and line,
    exit code 2, no traceback (procd logs it; nothing crashes half-started)."""
    import subprocess
    import sys

    path = write(tmp_path, body)
    res = subprocess.run([sys.executable, "-m", f"{daemon}.main", "--config", path], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 2
    assert res.stderr == f"igdpcp-{daemon}: error: {path}{reason}" + res.stderr.split(reason, 1)[1]
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_config_error_exits_cleanly_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--mode", choices=["a"])
    path = write(tmp_path, "config natd\n\toption mode b\n")
    with pytest.raises(SystemExit) as exc:
        parse_args_with_config(parser, ["--config", path], "natd")
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"x: error: {path}:2: invalid value 'b' for 'mode' (choose from 'a')\n"


def test_count_and_short_only_flags(tmp_path: Path) -> None:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("-v", dest="verbose", action="count", default=0)
    p.add_argument("-q", dest="quiet", action="store_true")
    path = write(tmp_path, "config natd\n\toption verbose 2\n\toption quiet yes\n")
    ns = parse_args_with_config(p, ["--config", path], "natd")
    assert (ns.verbose, ns.quiet) == (2, True)
    assert parse_args_with_config(p, ["--config", path, "-v"], "natd").verbose == 1


# --- the option table: one row per option, read by argparse, UCI and the reload -------------

def test_each_daemon_parser_is_its_table_rows() -> None:
    from controld.main import build_parser as controld_parser
    from natd.main import build_parser as natd_parser
    from shared.config import OPTIONS, options

    for daemon, parser in (("natd", natd_parser()), ("controld", controld_parser())):
        flags = {s[2:] for a in parser._actions for s in a.option_strings
                 if s.startswith("--") and not s.startswith("--no-")} - {"help", "config"}
        assert flags == {o.name for o in options(daemon)}, daemon
        for o in options(daemon):
            action = next(a for a in parser._actions if f"--{o.name}" in a.option_strings)
            assert (action.default, action.required, action.help) == (o.default, o.required, o.help), o.name
    assert len({o.name for o in OPTIONS}) == len(OPTIONS)  # no option declared twice


def test_code_defaults_are_the_table_defaults() -> None:
    from natd.bindings import Limits
    from shared.config import default

    assert (Limits().max_total, Limits().max_per_host) == (default("max-bindings"), default("max-per-host")) \
        == (65536, 4096)


def test_restart_only_options_keep_their_value_on_reload() -> None:
    import logging

    from shared.config import restart_only
    from shared.daemon import reread_args

    assert set(restart_only("natd")) == {"wan_if", "lan_if", "rpc", "events", "table", "layout", "ipc_group",
                                         "curve_dir", "ipv6_firewall", "pcp_steer_to"}
    assert "max_bindings" not in restart_only("natd") and "log_level" not in restart_only("controld")
    old = argparse.Namespace(wan_if="eth1", max_bindings=10, log_level="info")
    new = reread_args(lambda: argparse.Namespace(wan_if="eth9", max_bindings=20, log_level="info"), old,
                      restart_only("natd"), logging.getLogger("test"))
    assert new is not None and (new.wan_if, new.max_bindings) == ("eth1", 20)


def test_uci_sample_shows_the_table_defaults() -> None:
    """A commented ``#option KEY 'VALUE'`` in the shipped sample is the table's default."""
    import re
    from pathlib import Path

    from shared.config import options

    text = (Path(__file__).resolve().parents[2] / "packaging" / "files" / "igdpcp.config").read_text()
    shown = 0
    for stype in ("natd", "controld"):
        body = text.split(f"config {stype} '{stype}'", 1)[1].split("\nconfig ", 1)[0]
        commented = dict(re.findall(r"^\s*#option (\w+) '([^']*)'", body, re.M))
        for o in options(stype):
            if o.dest in commented and o.default is not None and o.kind == "store":
                assert o.type(commented[o.dest]) == o.default, (stype, o.dest)
                shown += 1
    assert shown >= 10


# --- miniupnpd's perm_rule sections and the persistent UUID ---------------------------------

REQUIRED = ("--lan-if", "l", "--rpc", "ipc:///r", "--events", "ipc:///e", "--state-dir", "/s")


def _controld_ns(path: Path, *argv: str) -> argparse.Namespace:
    from controld.main import build_parser

    return parse_args_with_config(build_parser(), ["--config", str(path), *REQUIRED, *argv], "controld")


def test_perm_rule_sections_follow_the_permission_list(tmp_path: Path) -> None:
    conf = tmp_path / "igdpcp"
    conf.write_text("config controld 'controld'\n\tlist permission 'allow 8080 192.168.1.5 80'\n\n" + UPNPD
                    + "config perm_rule\n\toption action 'allow'\n\toption ext_ports '27015:27030'\n"
                      "\toption int_addr '192.168.1.0/255.255.255.0'\n\toption int_ports 27015:27030\n")
    ns = _controld_ns(conf)
    assert ns.permission == ["allow 8080 192.168.1.5 80",
                             "allow 1024-65535 0.0.0.0/0 1024-65535",
                             "deny 0-65535 0.0.0.0/0 0-65535",  # miniupnpd's init fills what is left out
                             "allow 27015-27030 192.168.1.0/255.255.255.0 27015-27030"]
    assert _controld_ns(conf, "--permission", "deny 0-65535 0.0.0.0/0 0-65535").permission == \
        ["deny 0-65535 0.0.0.0/0 0-65535"]  # the command line replaces the file's rules, as for any list


def test_perm_rules_without_a_controld_section(tmp_path: Path) -> None:
    conf = tmp_path / "igdpcp"
    conf.write_text(UPNPD)
    assert _controld_ns(conf).permission == ["allow 1024-65535 0.0.0.0/0 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535"]


@pytest.mark.parametrize("body, line, reason", [
    ("\toption action 'permit'\n", 2, "allow or deny"),
    ("\toption ext_ports '80-70000'\n", 2, "ext_ports must be"),
    ("\toption int_ports '90-80'\n", 2, "int_ports must be"),
    ("\toption int_addr '192.168.1.0/24 evil'\n", 2, "int_addr must be"),
    ("\toption int_adr '192.168.1.0/24'\n", 2, "did you mean 'int_addr'"),
    ("\tlist ext_ports '80'\n", 2, "not 'list'"),
])
def test_bad_perm_rule_names_file_and_line(tmp_path: Path, body: str, line: int, reason: str) -> None:
    conf = tmp_path / "igdpcp"
    conf.write_text("config perm_rule\n" + body)
    from controld.main import build_parser

    p = build_parser()
    p.exit_on_error = False
    with pytest.raises(ConfigError, match=f"{conf}:{line}: .*{reason}"):
        parse_args_with_config(p, ["--config", str(conf), *REQUIRED], "controld")


def test_natd_ignores_perm_rules(tmp_path: Path) -> None:
    from natd.main import build_parser

    conf = tmp_path / "igdpcp"
    conf.write_text("config perm_rule\n\toption action 'bogus'\n")  # controld's business, not natd's
    ns = parse_args_with_config(build_parser(), ["--config", str(conf), "--wan-if", "w", *REQUIRED[:6]], "natd")
    assert ns.stun_server is None and (ns.stun_port, ns.stun_interval) == (3478, 300)


def test_ensure_uuid_fills_an_empty_option_once(tmp_path: Path) -> None:
    import uuid

    from shared.config import ensure_uuid

    conf = tmp_path / "igdpcp"
    conf.write_text("config natd 'natd'\n\toption uuid ''\n\nconfig controld 'controld'\n\toption uuid ''\n"
                    "\toption state_dir '/x'\n")
    made = ensure_uuid(str(conf), "controld")
    assert str(uuid.UUID(made)) == made
    assert conf.read_text() == ("config natd 'natd'\n\toption uuid ''\n\nconfig controld 'controld'\n"
                                f"\toption uuid '{made}'\n\toption state_dir '/x'\n")
    assert ensure_uuid(str(conf), "controld") == made
    assert _controld_ns(conf).uuid == made


def test_ensure_uuid_after_a_last_line_without_newline(tmp_path: Path) -> None:
    from shared.config import ensure_uuid

    conf = tmp_path / "igdpcp"
    conf.write_text("config controld 'controld'")
    made = ensure_uuid(str(conf), "controld")
    assert conf.read_text() == f"config controld 'controld'\n\toption uuid '{made}'\n"


def test_ensure_uuid_refuses_a_bad_uuid_and_a_missing_section(tmp_path: Path) -> None:
    from shared.config import ensure_uuid

    conf = tmp_path / "igdpcp"
    conf.write_text("config controld 'controld'\n\toption uuid 'nope'\n")
    with pytest.raises(ConfigError, match=":2: not a UUID"):
        ensure_uuid(str(conf), "controld")
    with pytest.raises(ConfigError, match="no section named 'other'"):
        ensure_uuid(str(conf), "other")


@pytest.mark.parametrize("key, value, ok", [
    ("uuid", "uuid:E9D1BC39-6A5E-4C73-A2A4-6E1B3A9F1C20", "e9d1bc39-6a5e-4c73-a2a4-6e1b3a9f1c20"),
    ("uuid", "xyz", None),
    ("external_ip", "203.0.113.7", "203.0.113.7"),
    ("external_ip", "2001:db8::1", None),
    ("notify_interval", "900", 900),
    ("notify_interval", "0", None),
])
def test_new_controld_options_are_checked(tmp_path: Path, key: str, value: str, ok: object) -> None:
    conf = tmp_path / "igdpcp"
    conf.write_text(f"config controld 'controld'\n\toption {key} '{value}'\n")
    if ok is None:
        from controld.main import build_parser

        p = build_parser()
        p.exit_on_error = False
        with pytest.raises(ConfigError, match=f":2: invalid value .* for '{key}'"):
            parse_args_with_config(p, ["--config", str(conf), *REQUIRED], "controld")
    else:
        assert getattr(_controld_ns(conf), key) == ok
