"""igdpcp: the operator's command-line tool, a client of controld's admin socket.

    igdpcp status | list | get ID | add PROTO EXT_PORT INT_IP INT_PORT | delete ID | delete PROTO EXT_PORT
    igdpcp flush [--host IP] | host-left IP | reload | watch        (each takes --json and --socket)
    igdpcp hash-password                                             (the page's admin password, for UCI)
    igdpcp import-upnpd [--from FILE] [--to FILE] [--dry-run]      (miniupnpd's UCI config into igdpcp's)

Exit status: 0 done, 1 refused by controld (the reason on stderr), 2 bad usage,
3 controld not reachable (one line on stderr). docs/operating.md has the details.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from controld.adminapi import client
from controld.adminapi.backend import BackendError

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
SOCKET_ENV = "IGDPCP_ADMIN_SOCKET"

# rpcd's exec protocol (docs/operating.md, "LuCI"): method -> argument signature.
# rpcd infers each argument's type from the sample value (32: an integer, "": a string).
RPCD_METHODS: dict[str, dict[str, Any]] = {"status": {}, "list": {}, "delete": {"id": 32},
                                           "hash_password": {"password": ""}}


def duration(seconds: int | None) -> str:
    """A lifetime for people: 'permanent', '45s', '12m05s', '3h20m', '2d04h'."""
    if seconds is None:
        return "permanent"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def endpoint(ip: str | None, port: int | None) -> str:
    """``ip:port``, with '-' for what does not exist (no NAT1 binding in no-nat1 mode)."""
    if port is None:
        return "-"
    return f"{ip or '?'}:{port}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows as left-aligned columns; the last column is not padded."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = []
    for r in [list(headers), *rows]:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


LIST_HEADERS = ("ID", "PROTO", "EXTERNAL", "NAT1", "INTERNAL", "ORIGIN", "OWNER", "LIFETIME", "STATE", "DESCRIPTION")


def mapping_row(m: dict[str, Any]) -> list[str]:
    """One ``igdpcp list`` row."""
    return [str(m["id"]), m["proto"], endpoint(m["ext_ip"], m["ext_port"]), endpoint(m["nat1_ip"], m["nat1_port"]),
            endpoint(m["int_ip"], m["int_port"]), m["origin"], m["owner"], duration(m["remaining"]), m["state"],
            m["description"]]


def format_list(mappings: list[dict[str, Any]]) -> str:
    """``igdpcp list``: an aligned table, or one line saying there is nothing."""
    if not mappings:
        return "no mappings"
    return table(LIST_HEADERS, [mapping_row(m) for m in mappings])


def _pairs(d: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def format_status(st: dict[str, Any], now: float) -> str:
    """``igdpcp status``: one fact a line."""
    c = st["counters"]
    last = st["pcp_last_answer"]
    pcp = st["pcp_server"] or "none"
    if st["pcp_server"]:
        pcp += f"  epoch {st['pcp_epoch'] if st['pcp_epoch'] is not None else '-'}"
        pcp += f"  last answer {duration(int(now - last)) + ' ago' if last else 'never'}"
    errors = "  ".join(f"{origin} {code}x{n}" for origin, codes in sorted(c["errors"].items())
                       for code, n in sorted(codes.items())) or "none"
    rtt = f"{c['pcp_rtt_p50_ms']:.1f} ms" if c["pcp_rtt_p50_ms"] is not None else "-"
    facts = [
        ("controld", f"{st['version']}, mode {st['mode']}, secure mode {'on' if st['secure_mode'] else 'off'}"),
        ("WAN address", st["wan_ip"] or "-"),
        ("external address", st["ext_ip"] or "-"),
        ("PCP server", pcp),
        ("mappings", f"{sum(st['mappings'].values())}  ({_pairs(st['mappings'])})"),
        ("requests", _pairs(c["requests"])),
        ("errors", errors),
        ("PCP RTT p50", rtt),
        ("renewals", str(c["renewals"])),
        ("re-syncs", str(c["resyncs"])),
        ("natd restarts", str(c["natd_restarts"])),
    ]
    return "\n".join(f"{k:<17}{v}" for k, v in facts)


def format_event(ev: dict[str, Any]) -> str:
    """One ``igdpcp watch`` line, naming the mapping and its origin as the log does."""
    if "mapping" not in ev:
        return f"{ev.get('event', '?')}: {ev.get('reason', '')}"
    m = ev["mapping"]
    when = time.strftime("%H:%M:%S", time.localtime(ev.get("time") or time.time()))
    why = f" ({ev['reason']})" if ev.get("reason") else ""
    return (f"{when} {ev['event']:<7} mapping {m['id']} {m['proto']} {endpoint(m['ext_ip'], m['ext_port'])}"
            f" -> {endpoint(m['int_ip'], m['int_port'])} origin {m['origin']} owner {m['owner']}"
            f" {m['state']}{why}")


def _target(args: argparse.Namespace) -> dict[str, Any]:
    """delete's selector: ``ID`` or ``PROTO EXT_PORT``."""
    if len(args.what) == 1 and args.what[0].isdigit():
        return {"id": int(args.what[0])}
    if len(args.what) == 2 and args.what[1].isdigit():
        return {"proto": args.what[0].upper(), "ext_port": int(args.what[1])}
    raise SystemExit("igdpcp delete: give a mapping ID, or PROTO EXT_PORT (e.g. 'delete TCP 8080')")


def _watch(path: str, as_json: bool, out: TextIO, limit: int | None) -> int:
    with client.Connection(path) as conn:
        conn.call("watch")
        for n, ev in enumerate(conn.events(), 1):
            print(json.dumps(ev, sort_keys=True) if as_json else format_event(ev), file=out, flush=True)
            if limit is not None and n >= limit:
                break
    return 0


def _hash_password(out: TextIO) -> int:
    from controld.web.auth import MIN_PASSWORD, make_hash

    if sys.stdin.isatty():
        pw = getpass.getpass("admin password for the page: ")
        if pw != getpass.getpass("again: "):
            print("igdpcp hash-password: the two differ", file=sys.stderr)
            return EXIT_REFUSED
    else:
        pw = sys.stdin.readline().rstrip("\n")
    if len(pw) < MIN_PASSWORD:
        print(f"igdpcp hash-password: use at least {MIN_PASSWORD} characters", file=sys.stderr)
        return EXIT_REFUSED
    print(make_hash(pw), file=out)
    return 0


def rpcd(path: str, argv: list[str], out: TextIO) -> int:
    """rpcd's exec-plugin protocol: ``list`` prints the methods, ``call METHOD`` reads its
    arguments as JSON on stdin and prints one JSON object (errors as {"error": {...}})."""
    if argv[:1] == ["list"]:
        print(json.dumps(RPCD_METHODS), file=out)
        return 0
    if len(argv) != 2 or argv[0] != "call" or argv[1] not in RPCD_METHODS:
        print(json.dumps({"error": {"kind": "unknown_command", "message": "usage: list | call METHOD"}}), file=out)
        return 0
    try:
        raw = sys.stdin.read(65536).strip()
        params = json.loads(raw) if raw else {}
        if not isinstance(params, dict):
            raise ValueError
    except ValueError:
        print(json.dumps({"error": {"kind": "bad_request", "message": "arguments must be a JSON object"}}), file=out)
        return 0
    method = argv[1]
    try:
        if method == "hash_password":
            result: Any = _rpcd_hash(params.get("password"))
        elif method == "delete":
            result = {"deleted": client.call(path, "delete", id=params.get("id"))}
        elif method == "list":
            result = {"mappings": client.call(path, "list")}
        else:
            result = client.call(path, "status")
    except BackendError as exc:
        result = {"error": {"kind": exc.kind.value, "message": exc.message}}
    except client.Unreachable as exc:
        result = {"error": {"kind": "unreachable", "message": str(exc)}}
    print(json.dumps(result), file=out)
    return 0


def _rpcd_hash(password: Any) -> dict[str, Any]:
    """LuCI's settings form cannot hash (no WebCrypto over plain http): the router does."""
    from controld.web.auth import MIN_PASSWORD, make_hash

    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        return {"error": {"kind": "invalid", "message": f"use at least {MIN_PASSWORD} characters"}}
    return {"hash": make_hash(password)}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=os.environ.get(SOCKET_ENV, client.DEFAULT_SOCKET),
                        help=f"controld's admin socket (default: ${SOCKET_ENV} or {client.DEFAULT_SOCKET})")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = argparse.ArgumentParser(prog="igdpcp", description="Look at and steer controld through its admin socket.",
                                epilog="docs/operating.md describes every command and counter.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[common], help="mode, addresses, PCP server, counters")
    sub.add_parser("list", parents=[common], help="every mapping, as a table")
    g = sub.add_parser("get", parents=[common], help="one mapping")
    g.add_argument("id", type=int)
    a = sub.add_parser("add", parents=[common], help="a static mapping (operator's port forward)")
    a.add_argument("proto", type=str.upper, choices=("TCP", "UDP"))
    a.add_argument("ext_port", type=int)
    a.add_argument("int_ip")
    a.add_argument("int_port", type=int)
    a.add_argument("--description", default="")
    a.add_argument("--lifetime", type=int, default=0, help="seconds; 0 (default) = permanent")
    d = sub.add_parser("delete", parents=[common], help="one mapping: ID, or PROTO EXT_PORT")
    d.add_argument("what", nargs="+", metavar="ID | PROTO EXT_PORT")
    f = sub.add_parser("flush", parents=[common], help="delete every mapping, or one LAN host's")
    f.add_argument("--host", help="only this LAN host's mappings")
    h = sub.add_parser("host-left", parents=[common], help="a LAN host left (DHCP release): remove its mappings")
    h.add_argument("ip", help="the host's IPv4 address")
    sub.add_parser("reload", parents=[common], help="re-read the configuration, keeping the mappings")
    w = sub.add_parser("watch", parents=[common], help="print each mapping change as it happens")
    w.add_argument("--count", type=int, help=argparse.SUPPRESS)  # stop after N events (tests)
    sub.add_parser("hash-password", help="read a password, print its hash for UCI web_password_hash")
    i = sub.add_parser("import-upnpd", help="carry /etc/config/upnpd (miniupnpd, luci-app-upnp) over into igdpcp's")
    i.add_argument("--from", dest="src", default="/etc/config/upnpd", help="miniupnpd's UCI file")
    i.add_argument("--to", dest="dst", default="/etc/config/igdpcp", help="igdpcp's UCI file, edited in place")
    i.add_argument("--dry-run", action="store_true", help="print the result, change nothing")
    r = sub.add_parser("rpcd", parents=[common], help=argparse.SUPPRESS)  # the rpcd plugin's back end
    r.add_argument("rpcd_args", nargs="*")
    return p


Action = Callable[[argparse.Namespace], tuple[Any, Callable[[Any], str]]]

# Each command: (its request to controld -> (result, how to print it as text)).
ACTIONS: dict[str, Action] = {
    "status": lambda a: (client.call(a.socket, "status"), lambda r: format_status(r, time.time())),
    "list": lambda a: (client.call(a.socket, "list"), format_list),
    "get": lambda a: (client.call(a.socket, "get", id=a.id), lambda m: format_list([m])),
    "add": lambda a: (client.call(a.socket, "add", proto=a.proto, ext_port=a.ext_port, int_ip=a.int_ip,
                                  int_port=a.int_port, description=a.description, lifetime=a.lifetime),
                      lambda m: format_list([m])),
    "delete": lambda a: (client.call(a.socket, "delete", **_target(a)),
                         lambda m: f"deleted mapping {m['id']} {m['proto']} {m['ext_port']}"),
    "flush": lambda a: (client.call(a.socket, "flush", **({"host": a.host} if a.host else {})),
                        lambda r: f"removed {r['removed']} mappings"),
    "host-left": lambda a: ({"removed": _host_left(a.socket, a.ip)}, lambda r: f"ok {r['removed']}"),
    "reload": lambda a: (client.call(a.socket, "reload"), lambda r: "reloaded"),
}


def run(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.cmd == "hash-password":
        return _hash_password(out)
    if args.cmd == "rpcd":
        return rpcd(args.socket, args.rpcd_args, out)
    if args.cmd == "import-upnpd":
        return _import_upnpd(args, out)
    try:
        if args.cmd == "watch":
            return _watch(args.socket, args.json, out, args.count)
        result, text = ACTIONS[args.cmd](args)
        print(json.dumps(result, indent=2, sort_keys=True) if args.json else text(result), file=out)
    except client.Unreachable as exc:
        print(f"igdpcp {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BackendError as exc:
        if args.json:
            print(json.dumps({"error": {"kind": exc.kind.value, "message": exc.message}}), file=out)
        print(f"igdpcp {args.cmd}: {exc.kind.value}: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 0
    return 0


def _import_upnpd(args: argparse.Namespace, out: TextIO) -> int:
    """The converter (shared/upnpd_import.py); the report goes to stderr, --dry-run's file to stdout."""
    from shared.config import ConfigError
    from shared.upnpd_import import run as import_upnpd

    try:
        text, report = import_upnpd(args.src, args.dst, args.dry_run)
    except (ConfigError, OSError) as exc:
        print(f"igdpcp import-upnpd: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    for line in report:
        print(f"igdpcp import-upnpd: {line}", file=sys.stderr)
    if args.dry_run:
        print(text, end="", file=out)
    else:
        print(f"igdpcp import-upnpd: wrote {args.dst}; apply it with the service's reload", file=sys.stderr)
    return 0


def _host_left(path: str, ip: str) -> int:
    """host-left, also against controld 0.1's line protocol (an upgrade whose old daemon still runs)."""
    try:
        return int(client.call(path, "host-left", ip=ip)["removed"])
    except client.Unreachable as exc:
        if "not an admin API answer" not in str(exc):
            raise
    return client.host_left_legacy(path, ip)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``igdpcp``."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
