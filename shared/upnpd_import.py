"""``igdpcp import-upnpd``: carry a miniupnpd / luci-app-upnp config (/etc/config/upnpd) over
into igdpcp's (/etc/config/igdpcp).

The target file is edited in place as text: only the options named below change (a line
replaced or added after its section's ``config`` line) and its ``perm_rule`` sections are
replaced by upnpd's, so comments and everything else stay. Whatever has no igdpcp
counterpart is listed in the report, never dropped silently.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.config import PERM_RULE, ConfigError, device_uuid, ipv4, perm_rule_line, seconds
from shared.uci import Section, err, load_uci, parse_uci

_TRUE = {"1", "yes", "on", "true", "enabled"}
_FALSE = {"0", "no", "off", "false", "disabled"}
# upnpd options with no igdpcp counterpart, and why (shown in the report).
IGNORED = {
    "enable_natpmp": "igdpcp always answers NAT-PMP and PCP on the LAN",
    "enable_upnp": "igdpcp always serves UPnP IGD",
    "enable_pcp_pmp": "igdpcp always answers NAT-PMP and PCP on the LAN",
    "download": "igdpcp reports the WAN counters, not configured bitrates",
    "upload": "igdpcp reports the WAN counters, not configured bitrates",
    "log_output": "igdpcp logs one line per event (option log_level)",
    "upnp_lease_file": "igdpcp keeps its mappings in state_dir (SQLite)",
    "upnp_lease_file6": "igdpcp keeps its mappings in state_dir (SQLite)",
    "clean_ruleset_interval": "igdpcp expires mappings by their lease itself",
    "clean_ruleset_threshold": "igdpcp expires mappings by their lease itself",
    "system_uptime": "not configurable in igdpcp",
    "external_iface6": "igdpcp maps IPv4 only",
    "external_zone": "set service.wan_network (a network, not a zone)",
    "ipv6_disable": "igdpcp maps IPv4 only",
    "model_number": "not configurable in igdpcp",
    "serial_number": "not configurable in igdpcp",
    "allow_cgnat": "igdpcp maps through the provider's NAT with PCP (RFC 6970)",
    "ext_allow_private_ipv4": "igdpcp maps through the provider's NAT with PCP (RFC 6970)",
}


@dataclass
class Plan:
    """What the import does: option values by (section name, key), the perm_rule sections
    (as option dicts), and report lines."""

    options: dict[tuple[str, str], str] = field(default_factory=dict)
    rules: list[dict[str, str]] = field(default_factory=list)
    report: list[str] = field(default_factory=list)


def _boolean(value: str) -> str:
    raw = value.strip().lower()
    if raw not in _TRUE | _FALSE:
        raise ValueError(f"invalid boolean {value!r}")
    return "1" if raw in _TRUE else "0"


# upnpd option -> (igdpcp section, option, conversion that raises ValueError on bad input)
SIMPLE: tuple[tuple[str, str, str, Callable[[str], object]], ...] = (
    ("enabled", "service", "enabled", _boolean),
    ("external_iface", "service", "wan_network", str.strip),
    ("secure_mode", "controld", "secure_mode", _boolean),
    ("notify_interval", "controld", "notify_interval", seconds),
    ("presentation_url", "controld", "presentation_url", str.strip),
    ("uuid", "controld", "uuid", device_uuid),
    ("friendly_name", "controld", "friendly_name", str.strip),
    ("port", "controld", "http_port", int),
    ("igdv1", "controld", "igd_version", lambda v: "1" if _boolean(v) == "1" else "2"),
    ("ext_ip", "controld", "external_ip", ipv4),
)
HANDLED = {k for k, *_ in SIMPLE} | {"internal_iface", "use_stun", "stun_host", "stun_port"}


def plan(sections: list[Section], path: str) -> Plan:
    """The changes an upnpd config asks for; raises ConfigError for values igdpcp would refuse."""
    p = Plan()
    main = next((s for s in sections if s.type == "upnpd"), None)
    if main is None:
        raise ConfigError(f"{path}: no 'config upnpd' section: not a miniupnpd configuration")
    o = {**main.options, **{k: " ".join(v) for k, v in main.lists.items()}}

    def put(key: str, section: str, ours: str, conv: Callable[[str], object], src: str | None = None) -> None:
        try:
            value = str(conv(o[key]))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise err(path, main.lines[key][0], f"{key}: {e}") from None
        p.options[(section, ours)] = value
        p.report.append(f"{section}.{ours} = {value!r}  (from {src or key})")

    for key, section, ours, conv in SIMPLE:
        if o.get(key, "").strip():
            put(key, section, ours, conv)
    lans = o.get("internal_iface", "").split()
    if lans:
        put("internal_iface", "service", "lan_network", lambda v: v.split()[0])
        if len(lans) > 1:
            p.report.append(f"not carried over: internal_iface {' '.join(lans[1:])} (igdpcp serves one LAN)")
    _stun(o, put, p)
    for key in sorted(set(o) - HANDLED):
        p.report.append(f"not carried over: {key} {o[key]!r} ({IGNORED.get(key, 'no igdpcp counterpart')})")
    for s in sections:
        if s.type == PERM_RULE:
            perm_rule_line(s, path)  # refuses what controld would refuse, naming the line
            p.rules.append(dict(s.options))
    if p.rules:
        p.report.append(f"perm_rule: {len(p.rules)} sections replace igdpcp's")
    return p


def _stun(o: dict[str, str], put: Callable[..., None], p: Plan) -> None:
    """use_stun + stun_host (+ stun_port) -> natd's stun_server (+ stun_port)."""
    host = o.get("stun_host", "").strip()
    if not host:
        return
    try:
        on = _boolean(o.get("use_stun", "0")) == "1"
    except ValueError:
        on = False
    if not on:
        p.report.append("not carried over: stun_host (use_stun is off)")
        return
    put("stun_host", "natd", "stun_server", str.strip, "use_stun, stun_host")
    if o.get("stun_port", "").strip():
        put("stun_port", "natd", "stun_port", int)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def apply(text: str, p: Plan, path: str) -> str:
    """``text`` (igdpcp's config) with the plan's options set and its perm_rules replaced."""
    sections = parse_uci(text, path)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    drop: set[int] = set()
    if p.rules:  # each old perm_rule: its config line up to the next section's comments
        starts = sorted(s.line for s in sections) + [len(lines) + 1]
        for s in sections:
            if s.type != PERM_RULE:
                continue
            end = next(x for x in starts if x > s.line) - 1  # last line before the next section
            while end > s.line and lines[end - 1].lstrip().startswith("#"):
                end -= 1  # comments just above the next section belong to it
            drop.update(range(s.line, end + 1))
    edits: dict[int, str] = {}  # 1-based line -> replacement
    inserts: dict[int, list[str]] = {}  # after 1-based line
    by_name = {s.name: s for s in sections if s.name}
    for (sname, key), value in p.options.items():
        target = by_name.get(sname)
        if target is None:
            raise ConfigError(f"{path}: no section named {sname!r} to set {key} in")
        entry = f"\toption {key} {_quote(value)}\n"
        if key in target.options:
            edits[target.lines[key][0]] = entry
        else:
            inserts.setdefault(target.line, []).append(entry)
    out: list[str] = []
    for i, line in enumerate(lines, 1):
        if i not in drop:
            out.append(edits.get(i, line))
        out.extend(inserts.get(i, []))
    for rule in p.rules:
        out.append("\nconfig perm_rule\n")
        out.extend(f"\toption {k} {_quote(v)}\n" for k, v in rule.items())
    result = "".join(out)
    check = parse_uci(result, path)  # what was written must read back as planned
    names = {s.name: s for s in check if s.name}
    if any(names[sn].options.get(k) != v for (sn, k), v in p.options.items()) \
            or [dict(s.options) for s in check if s.type == PERM_RULE] != (p.rules or
                                                                          [dict(s.options) for s in sections
                                                                           if s.type == PERM_RULE]):
        raise ConfigError(f"{path}: the edited file does not read back as planned; nothing written")
    return result


def run(src: str, dst: str, dry_run: bool) -> tuple[str, list[str]]:
    """Import ``src`` into ``dst``; returns (new text of dst, report). Writes only without dry_run."""
    p = plan(load_uci(src), src)
    try:
        with open(dst, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{dst}: cannot read igdpcp's config: {e.strerror or e}") from e
    new = apply(text, p, dst)
    if not dry_run and new != text:
        tmp = f"{dst}.igdpcp-new"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(new)
        os.chmod(tmp, os.stat(dst).st_mode & 0o7777)
        os.replace(tmp, dst)
    return new, p.report
