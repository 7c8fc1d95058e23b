"""The daemons' options, declared once, and argparse with a UCI file as defaults.

Every option is one row of :data:`OPTIONS` (flag, type, default, help, which daemon,
whether SIGHUP can change it live); :func:`build_parser` makes each daemon's argparse
parser from the table, the UCI section of the same name supplies defaults through
:func:`parse_args_with_config`, and :func:`restart_only` tells the reload which options
wait for the next start. The UCI syntax itself is :mod:`shared.uci`.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared import stun
from shared.uci import ConfigError, Section, err, load_uci, parse_uci

__all__ = ["ConfigError", "Section", "parse_uci", "load_uci", "parse_args_with_config",
           "Option", "OPTIONS", "build_parser", "default", "restart_only", "perm_rule_line", "ensure_uuid"]

_BOOLS = {"1": True, "yes": True, "on": True, "true": True, "enabled": True,
          "0": False, "no": False, "off": False, "false": False, "disabled": False}


NATD, CONTROLD = "natd", "controld"
BOTH = (NATD, CONTROLD)
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Option:
    """One option: ``--NAME`` on the command line, ``option NAME_WITH_UNDERSCORES`` in UCI.

    ``kind`` is ``store`` (one value of ``type``), ``append`` (repeatable; a UCI ``list``)
    or ``bool`` (``--NAME`` / ``--no-NAME``). ``live``: SIGHUP applies a new value at once;
    otherwise a change waits for the next start.
    """

    name: str
    daemons: tuple[str, ...]
    help: str
    default: Any = None
    type: Callable[[str], Any] = str
    kind: str = "store"
    required: bool = False
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    live: bool = False

    @property
    def dest(self) -> str:
        """The argparse attribute and the UCI key."""
        return self.name.replace("-", "_")


def ipv4(text: str) -> str:
    """argparse type: one IPv4 address, normalised."""
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {text!r}") from None


def device_uuid(text: str) -> str:
    """argparse type: a UUID (with or without a 'uuid:' prefix), normalised to 8-4-4-4-12."""
    try:
        return str(uuidlib.UUID(text.removeprefix("uuid:")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def seconds(text: str) -> int:
    """argparse type: a whole number of seconds, at least 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 s: {text!r}")
    return n


_O = Option
OPTIONS: tuple[Option, ...] = (
    # --- both daemons
    _O("lan-if", BOTH, "LAN interface: NAT1's inside, where controld serves UPnP", required=True),
    _O("rpc", BOTH, "ZeroMQ endpoint of natd's requests (ipc://PATH or tcp://HOST:PORT)", required=True),
    _O("events", BOTH, "ZeroMQ endpoint of natd's events", required=True),
    _O("curve-dir", BOTH, "CURVE keys for tcp:// endpoints (natd.key_secret and authorized/*.key, "
                          "controld.key_secret and natd.key; made by igdpcp-natd --gen-keys)"),
    _O("log-level", BOTH, "log level", default="info", choices=LOG_LEVELS, live=True),
    # --- natd
    _O("wan-if", (NATD,), "WAN interface (NAT1's outside)", required=True),
    _O("layout", (NATD,), "standalone: own table 'ip TABLE'; fw4: chains and maps inside OpenWrt's "
                          "'inet fw4' (needs the packaging/fw4 include files)", default="standalone"),
    _O("table", (NATD,), "nftables table name in the standalone layout (family ip)", default="igdpcp"),
    _O("ipc-group", (NATD,), "group owning the ipc:// socket files (mode 0660)"),
    _O("max-bindings", (NATD,), "total NAT1 forwards allowed", default=65536, type=int, live=True),
    _O("max-per-host", (NATD,), "NAT1 forwards allowed per LAN host", default=4096, type=int, live=True),
    _O("pcp-steer-to", (NATD,), "split layout: steer LAN PCP/NAT-PMP (gateway UDP 5351) to controld at this "
                                "address, keeping the client's source ('': controld shares the router)", default=""),
    # --- natd: IPv6 pinholes (docs/pinholes.md)
    _O("ipv6-firewall", (NATD,), "where IPv6 pinholes live: auto (fw4 layout: inside fw4's forward path; "
                                 "standalone: off), own (natd's table ip6 TABLE drops new inbound IPv6 from "
                                 "the WAN except pinholes), table:FAMILY:TABLE:CHAIN (natd's sets and rules in "
                                 "the admin's chain, which the admin's forward chain jumps to), or off",
       default="auto", metavar="MODE"),
    _O("max-pinholes", (NATD,), "IPv6 pinholes allowed in total", default=4096, type=int, live=True),
    _O("max-pinholes-per-host", (NATD,), "IPv6 pinholes allowed per LAN address", default=256, type=int,
       live=True),
    _O("pinhole-grace", (NATD,), "seconds a pinhole's kernel timeout outlives its lease (safety net if "
                                 "controld is gone; controld deletes it at the lease's end)",
       default=60, type=int, live=True),
    _O("stun-server", (NATD,), "STUN server (host name or IPv4 address) natd asks, from the WAN address, "
                               "for the external address the Internet sees (RFC 8489; a double NAT without "
                               "PCP); empty: no STUN", live=True),
    _O("stun-port", (NATD,), "UDP port of the STUN server", default=stun.DEFAULT_PORT, type=int, live=True),
    _O("stun-interval", (NATD,), "seconds between STUN probes (one also at start and on every WAN address "
                                 "change)", default=300, type=seconds, live=True),
    # --- controld
    _O("state-dir", (CONTROLD,), "where the mapping table (SQLite) lives", required=True),
    _O("mode", (CONTROLD,), "auto picks from the WAN address and PCP", default="auto"),
    _O("pcp-server", (CONTROLD,), "PCP server address (default: the WAN default router)", live=True),
    _O("pcp-timeout", (CONTROLD,), "seconds a UPnP action waits for NAT2 before answering 501",
       default=10.0, type=float, live=True),
    _O("pcp-server-file", (CONTROLD,), "PCP servers from DHCP option 158, written by the DHCP client hook; "
                                       "used when --pcp-server is not given ('' to ignore)",
       default="/var/run/igdpcp/pcp-server"),
    _O("pcp-service-wait", (CONTROLD,), "on start, re-assert stored mappings upstream after RAND(0, this) "
                                        "seconds", default=2.0, type=float, live=True),
    _O("pcp-recovery-window", (CONTROLD,), "renewals/re-creations in flight at once (paces recovery after a "
                                           "NAT2 restart)", default=32, type=int),
    _O("pcp-short-error-retry", (CONTROLD,), "retry a short-lifetime PCP error once after this many seconds "
                                             "(RFC 6970 §5.6; 0: off, the default, because UPnP answers "
                                             "within 30 s)", default=0.0, type=float, live=True),
    _O("pcp-cpe-retries", (CONTROLD,), "with --pcp-short-error-retry: retries of a short "
                                       "CANNOT_PROVIDE_EXTERNAL", default=2, type=int, live=True),
    _O("pcp-epoch-poll", (CONTROLD,), "send the PCP server an ANNOUNCE this often to notice a restart (0: off)",
       default=30.0, type=float, live=True),
    _O("admin-socket", (CONTROLD,), "Unix socket of the admin API (igdpcp, rpcd, the DHCP-release hook); "
                                    "'' for none", default="/var/run/igdpcp/controld.sock"),
    _O("web-password-hash", (CONTROLD,), "the LAN page's admin password, hashed (igdpcp hash-password); "
                                         "empty: admin login off", default="", live=True),
    _O("http-port", (CONTROLD,), "UPnP HTTP port on the LAN address (0: any)", default=0, type=int),
    _O("igd-version", (CONTROLD,), "IGD root devices to serve: both (an IGD:1 and an IGD:2 one over the same "
                                   "table, so either kind of control point finds a gateway), 1 or 2",
       default="both", choices=("both", "1", "2")),
    _O("inbound-pinholes", (CONTROLD,), "let LAN hosts open IPv6 pinholes (WANIPv6FirewallControl "
                                        "InboundPinholeAllowed; needs natd's IPv6 firewall)", default=True,
       kind="bool", live=True),
    _O("secure-mode", (CONTROLD,), "InternalClient must be the caller's own address", default=True,
       kind="bool", live=True),
    _O("permission", (CONTROLD,), "miniupnpd rule 'allow|deny EPORT[-EPORT] IP[/MASK] IPORT[-IPORT] "
                                  "[\"REGEX\"]', first match wins; with rules, no match is a deny; "
                                  "an IPv6 prefix makes a pinhole rule (each family decided by its own rules) "
                                  "(UCI: list permission, then each 'config perm_rule' section)", kind="append",
       metavar="RULE", live=True),
    _O("max-mappings-per-host", (CONTROLD,), "UPnP mappings per LAN host (0: no limit)", default=256, type=int,
       live=True),
    _O("max-mappings", (CONTROLD,), "UPnP mappings in total (0: no limit)", default=4096, type=int, live=True),
    _O("uuid", (CONTROLD,), "the IGD's device UUID, kept across restarts and reboots (the init script or "
                            "unit writes a generated one into the config when empty)", type=device_uuid),
    _O("friendly-name", (CONTROLD,), "friendlyName in the device description", default="igdpcp router"),
    _O("presentation-url", (CONTROLD,), "presentationURL in the device description (default: none)"),
    _O("notify-interval", (CONTROLD,), "seconds between SSDP NOTIFY rounds (max-age is three times this)",
       default=600, type=seconds),
    _O("external-ip", (CONTROLD,), "IPv4 address to report as the external one when no PCP server maps "
                                   "upstream (an outer NAT forwarded by hand; wins over STUN)", type=ipv4,
       live=True),
    _O("manage-host", (CONTROLD,), "hosts whose NewManage=1 reaches other hosts' mappings "
                                   "(UCI: list manage_host)", kind="append", metavar="IP[/LEN]", live=True),
    _O("enable-pcp", (CONTROLD,), "serve PCP (RFC 6887) to LAN hosts on UDP 5351, proxied upstream",
       default=True, kind="bool"),
    _O("enable-natpmp", (CONTROLD,), "serve NAT-PMP (RFC 6886) to LAN hosts on UDP 5351 (as miniupnpd's "
                                     "enable_natpmp)", default=True, kind="bool"),
    _O("pcp-manager", (CONTROLD,), "LAN hosts allowed PCP THIRD_PARTY (RFC 6887 §13.1; none by default) "
                                   "(UCI: list pcp_manager)", kind="append", metavar="IP"),
    _O("pcp-rate", (CONTROLD,), "PCP/NAT-PMP requests a second per LAN host (token bucket; more are dropped)",
       default=10.0, type=float),
    _O("pcp-burst", (CONTROLD,), "PCP/NAT-PMP burst per LAN host", default=50, type=int),
    _O("pcp-max-lifetime", (CONTROLD,), "longest lifetime granted to a LAN PCP/NAT-PMP mapping (seconds)",
       default=86400, type=int),
    _O("pcp-listen", (CONTROLD,), "address of the LAN PCP/NAT-PMP socket ('': the LAN address)", default=""),
)


def options(daemon: str) -> list[Option]:
    """The rows of one daemon, in table order."""
    return [o for o in OPTIONS if daemon in o.daemons]


def _formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter at a fixed width: its default asks shutil for the terminal's, and every
    add_argument makes one, so shutil (and bz2, lzma) would sit in both daemons' memory (~0.5 MiB)."""
    cols = os.environ.get("COLUMNS", "")
    return argparse.HelpFormatter(prog, width=int(cols) if cols.isdigit() else 100)


def _did_you_mean(key: str, names: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a misspelt option name, or ""; difflib only when one is."""
    import difflib

    hint = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def build_parser(daemon: str, prog: str, description: str,
                 choices: Mapping[str, Sequence[Any]] | None = None) -> argparse.ArgumentParser:
    """The daemon's argparse parser, made from :data:`OPTIONS`; ``choices`` supplies the
    allowed values a daemon owns (e.g. natd's layouts), by option name."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_formatter)
    p.add_argument("--config", help=f"UCI config file (section '{daemon}'); flags win")
    for o in options(daemon):
        allowed = (choices or {}).get(o.name, o.choices)
        if o.kind == "bool":
            p.add_argument(f"--{o.name}", action=argparse.BooleanOptionalAction, default=o.default, help=o.help)
        elif o.kind == "append":
            p.add_argument(f"--{o.name}", action="append", metavar=o.metavar, help=o.help)
        else:
            p.add_argument(f"--{o.name}", type=o.type, default=o.default, required=o.required,
                           choices=allowed, metavar=o.metavar, help=o.help)
    return p


def default(name: str) -> Any:
    """The declared default of option ``name`` (for code that runs without a command line)."""
    return next(o.default for o in OPTIONS if o.name == name)


def restart_only(daemon: str) -> tuple[str, ...]:
    """The options (argparse names) a running daemon cannot take over on SIGHUP."""
    return tuple(o.dest for o in options(daemon) if not o.live)


def _config_value(action: argparse.Action, key: str, raw: list[str], lines: list[int],
                  is_list: bool, filename: str) -> Any:
    """Turn the file's raw strings for one key into the value the parser would store."""
    def conv(s: str, line: int) -> Any:
        try:
            v = action.type(s) if callable(action.type) else s
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise err(filename, line, f"invalid value {s!r} for {key!r}: {e}") from None
        if action.choices is not None and v not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            raise err(filename, line, f"invalid value {s!r} for {key!r} (choose from {choices})")
        return v

    # argparse exposes no public way to ask an action what it does; these classes are stable.
    if isinstance(action, argparse._AppendAction):  # extend too: it subclasses append
        return [conv(s, ln) for s, ln in zip(raw, lines, strict=False)]
    if isinstance(action, argparse._AppendConstAction):
        raise err(filename, lines[0], f"{key!r} cannot be set from a config file")
    if isinstance(action, argparse._CountAction):
        if is_list:
            raise err(filename, lines[0], f"{key!r} takes one value; use 'option', not 'list'")
        try:
            return int(raw[0])
        except ValueError:
            raise err(filename, lines[0], f"invalid count {raw[0]!r} for {key!r}") from None
    if action.nargs in ("*", "+") or isinstance(action.nargs, int) and action.nargs > 0:
        values = [conv(s, ln) for s, ln in zip(raw, lines, strict=False)]
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise err(filename, lines[0], f"{key!r} needs exactly {action.nargs} values")
        return values
    if is_list:
        raise err(filename, lines[0], f"{key!r} takes one value; use 'option', not 'list'")
    if action.nargs == 0:  # store_true/store_false/store_const and BooleanOptionalAction
        b = _BOOLS.get(raw[0].lower())
        if b is None:
            raise err(filename, lines[0], f"invalid boolean {raw[0]!r} for {key!r} "
                                           "(use 1/0, yes/no, on/off, true/false, enabled/disabled)")
        if isinstance(action, argparse.BooleanOptionalAction):
            return b
        return action.const if b else action.default
    return conv(raw[0], lines[0])


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                           section_type: str) -> argparse.Namespace:
    """Parse ``argv`` with values from the ``--config`` UCI file as defaults.

    The first section of type ``section_type`` supplies values: UCI key
    ``wan_if`` sets flag ``--wan-if``.  Command-line flags win over the file
    (an append flag given on the command line replaces the file's list), and
    a ``required`` flag may be satisfied by the file alone.  Keys naming no
    flag, bad values and unreadable files are a ConfigError: like any argument
    error it ends the program with one line ``PROG: error: FILE:LINE: reason``
    and exit code 2, unless the parser has ``exit_on_error=False``, which
    makes it raise instead.
    """
    try:
        return _parse_args_with_config(parser, argv, section_type)
    except ConfigError as e:
        if not parser.exit_on_error:
            raise
        parser.exit(2, f"{parser.prog}: error: {e}\n")  # a daemon says why, without a traceback


def _parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                            section_type: str) -> argparse.Namespace:
    cfg = next((a for a in parser._actions if "--config" in a.option_strings), None)
    if cfg is None:
        cfg = parser.add_argument("--config", metavar="PATH", help="UCI config file to read")
    pre = argparse.ArgumentParser(add_help=False, prefix_chars=parser.prefix_chars, formatter_class=_formatter,
                                  allow_abbrev=parser.allow_abbrev, exit_on_error=False)
    pre.add_argument(*cfg.option_strings, dest="config", default=cfg.default)
    try:
        path = pre.parse_known_args(argv)[0].config
    except argparse.ArgumentError:  # e.g. a bare --config: let the real parser say so
        path = None
    if not path:
        return parser.parse_args(argv)

    values = _file_values(parser, cfg, path, section_type)
    # Accumulating actions build on the default, so they get None and the file's
    # list is filled in afterwards only if the command line gave none; the rest
    # get a marker, so a value typed on the command line is never overwritten.
    accum = (argparse._AppendAction, argparse._CountAction)
    markers = {a.dest: (None if isinstance(a, accum) else object())
               for a in parser._actions if a.dest in values}
    saved = [(a, a.default, a.required) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for a in parser._actions:
            if a.dest in values:
                a.required = False
        parser.set_defaults(**markers)
        ns = parser.parse_args(argv)
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required
        parser._defaults.clear()
        parser._defaults.update(saved_defaults)
    for dest, marker in markers.items():
        if getattr(ns, dest, marker) is marker:
            setattr(ns, dest, values[dest])
    return ns


def _uci_keys(parser: argparse.ArgumentParser, cfg: argparse.Action) -> dict[str, argparse.Action]:
    """UCI key -> the action it sets: ``wan_if`` for ``--wan-if`` (short-only flags by dest)."""
    by_key: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a is cfg or not a.option_strings or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for s in a.option_strings:
            if s.startswith("--") and not (isinstance(a, argparse.BooleanOptionalAction) and s.startswith("--no-")):
                by_key.setdefault(s[2:].replace("-", "_"), a)
        if not any(s.startswith("--") for s in a.option_strings):
            by_key.setdefault(a.dest, a)
    return by_key


def _file_values(parser: argparse.ArgumentParser, cfg: argparse.Action, path: str,
                 section_type: str) -> dict[str, Any]:
    """The values the file's first ``section_type`` section gives, by argparse dest."""
    sections = load_uci(path)
    section = next((s for s in sections if s.type == section_type), None)
    by_key = _uci_keys(parser, cfg)
    rules = [perm_rule_line(s, path) for s in sections if s.type == PERM_RULE] if "permission" in by_key else []
    if section is None:
        return {by_key["permission"].dest: rules} if rules else {}
    values: dict[str, Any] = {}
    given = [(k, [v], False) for k, v in section.options.items()] + [(k, v, True) for k, v in section.lists.items()]
    for key, raw, is_list in given:
        lines = section.lines.get(key) or [section.line]
        action = by_key.get(key)
        if action is None:
            raise err(path, lines[0], f"unknown option {key!r} in section {section_type}" + _did_you_mean(key, by_key))
        values[action.dest] = _config_value(action, key, raw, lines, is_list, path)
    if rules:  # miniupnpd's sections come after the list: first match wins across both
        dest = by_key["permission"].dest
        values[dest] = list(values.get(dest) or []) + rules
    return values


# --- miniupnpd's permission sections ------------------------------------------------

PERM_RULE = "perm_rule"
# miniupnpd's init script fills in what a perm_rule leaves out (openwrt/packages net/miniupnpd).
PERM_RULE_DEFAULTS = {"action": "deny", "ext_ports": "0-65535", "int_addr": "0.0.0.0/0", "int_ports": "0-65535"}
_PORTS = re.compile(r"(\d{1,5})(?:[-:](\d{1,5}))?")
_ADDR = re.compile(r"[0-9.]+(?:/[0-9.]+)?")


def perm_rule_line(section: Section, filename: str) -> str:
    """A ``config perm_rule`` section (miniupnpd's UCI names: action, ext_ports, int_addr,
    int_ports, comment) as the rule line ``--permission`` takes: ``allow 1024-65535
    0.0.0.0/0 1024-65535``. Ports may be ``x``, ``x-y`` or ``x:y``; ``comment`` is only
    a comment. Raises ConfigError naming the file and line."""
    if section.lists:
        key = next(iter(section.lists))
        raise err(filename, section.lines[key][0], f"perm_rule takes 'option {key}', not 'list'")
    for key in section.options:
        if key not in PERM_RULE_DEFAULTS and key != "comment":
            raise err(filename, section.lines[key][0], f"unknown option {key!r} in section perm_rule"
                      + _did_you_mean(key, [*PERM_RULE_DEFAULTS, "comment"]))
    v = {**PERM_RULE_DEFAULTS, **{k: x.strip() for k, x in section.options.items() if x.strip()}}

    def line(key: str) -> int:
        return section.lines.get(key, [section.line])[0]

    action = v["action"].lower()
    if action not in ("allow", "deny"):
        raise err(filename, line("action"), f"perm_rule action must be allow or deny, not {v['action']!r}")
    ports = {}
    for key in ("ext_ports", "int_ports"):
        m = _PORTS.fullmatch(v[key])
        if not m or int(m[1]) > 65535 or (m[2] and not int(m[1]) <= int(m[2]) <= 65535):
            raise err(filename, line(key), f"perm_rule {key} must be PORT, PORT-PORT or PORT:PORT "
                                            f"within 0-65535, not {v[key]!r}")
        ports[key] = m[1] if m[2] is None else f"{m[1]}-{m[2]}"
    if not _ADDR.fullmatch(v["int_addr"]):
        raise err(filename, line("int_addr"), f"perm_rule int_addr must be IP[/BITS|/MASK], not {v['int_addr']!r}")
    return f"{action} {ports['ext_ports']} {v['int_addr']} {ports['int_ports']}"


# --- the persistent device UUID -------------------------------------------------------


def ensure_uuid(path: str, section_name: str, key: str = "uuid") -> str:
    """The UUID in option ``key`` of the named section; when empty, write a new one into the
    file first (atomically, the rest of the file untouched), as miniupnpd's init script does
    with ``uci set``. Raises ConfigError when the file or section is unusable."""
    sections = load_uci(path)
    section = next((s for s in sections if s.name == section_name), None)
    if section is None:
        raise ConfigError(f"{path}: no section named {section_name!r}")
    if current := section.options.get(key, "").strip():
        try:
            return device_uuid(current)
        except argparse.ArgumentTypeError as e:
            raise err(path, section.lines[key][0], str(e)) from None
    new = str(uuidlib.uuid4())
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    entry = f"\toption {key} '{new}'\n"
    if key in section.options:  # an empty 'option uuid' line: replace it
        lines[section.lines[key][0] - 1] = entry
    else:  # right after the section's 'config' line
        lines.insert(section.line, entry)
    text = "".join(lines)
    check = next((s for s in parse_uci(text, path) if s.name == section_name), None)
    if check is None or check.options.get(key) != new:
        raise ConfigError(f"{path}: cannot add option {key} to section {section_name!r} safely; set it by hand")
    tmp = f"{path}.igdpcp-new"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, os.stat(path).st_mode & 0o7777)
    os.replace(tmp, path)
    return new
