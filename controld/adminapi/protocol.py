"""The admin API's command table and wire format, sans I/O (docs/operating.md, "admin API").

One request is one JSON object on one line, ``{"cmd": "delete", "id": 3}``; its reply is
one line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"kind": ..., "message":
...}}``. ``watch`` replies once, then sends one ``{"event": ...}`` line per change.
The commands, their arguments and how each is checked are the data in :data:`COMMANDS`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from controld.adminapi.backend import (
    OPERATOR,
    AddRequest,
    AdminBackend,
    BackendError,
    ChangeEvent,
    ErrorKind,
    MappingKey,
)
from shared.const import PROTO_NUMBERS

MAX_LINE = 4096  # bytes of one request line, newline included
MAX_DESCRIPTION = 256
MAX_LIFETIME = 2**32 - 1


def _uint(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"an integer {lo}..{hi}")
        return v
    return check


def _proto(v: Any) -> str:
    if not isinstance(v, str) or v.upper() not in PROTO_NUMBERS:
        raise ValueError(" or ".join(PROTO_NUMBERS))
    return v.upper()


def _ipv4(v: Any) -> str:
    if isinstance(v, str):
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            pass
    raise ValueError("an IPv4 address")


def _text(v: Any) -> str:
    if not isinstance(v, str) or len(v) > MAX_DESCRIPTION or not v.isprintable():
        raise ValueError(f"printable text of at most {MAX_DESCRIPTION} characters")
    return v


@dataclass(frozen=True)
class Arg:
    """One argument: its JSON key, its check (value -> value or ValueError), and whether it must be there."""

    name: str
    check: Callable[[Any], Any]
    required: bool = True


Handler = Callable[[AdminBackend, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    """One admin command: what it takes and what it does."""

    args: tuple[Arg, ...]
    run: Handler
    help: str


PORT = _uint(1, 65535)
ID = _uint(1, 2**63 - 1)


async def _add(b: AdminBackend, a: dict[str, Any]) -> Any:
    req = AddRequest(a["proto"], a["ext_port"], a["int_ip"], a["int_port"], a.get("description", ""),
                     a.get("lifetime", 0))
    return await b.add(req, OPERATOR)


async def _delete(b: AdminBackend, a: dict[str, Any]) -> Any:
    if "id" in a and not {"proto", "ext_port"} & a.keys():
        return await b.delete(a["id"], OPERATOR)
    if "id" not in a and {"proto", "ext_port"} <= a.keys():
        return await b.delete(MappingKey(a["proto"], a["ext_port"]), OPERATOR)
    raise BackendError(ErrorKind.INVALID, "delete takes either id, or proto and ext_port")


async def _reload(b: AdminBackend, a: dict[str, Any]) -> Any:
    await b.reload()
    return {}


async def _watch(b: AdminBackend, a: dict[str, Any]) -> Any:
    return {"watching": True}  # the server streams the events after this reply


async def _flush(b: AdminBackend, a: dict[str, Any]) -> Any:
    return {"removed": await b.flush(a.get("host"), OPERATOR)}


async def _host_left(b: AdminBackend, a: dict[str, Any]) -> Any:
    return {"removed": await b.host_left(a["ip"])}


async def _status(b: AdminBackend, a: dict[str, Any]) -> Any:
    return await b.status()


async def _list(b: AdminBackend, a: dict[str, Any]) -> Any:
    return await b.list()


async def _get(b: AdminBackend, a: dict[str, Any]) -> Any:
    return await b.get(a["id"])


COMMANDS: dict[str, Command] = {
    "status": Command((), _status, "mode, addresses, PCP server, counts and counters"),
    "list": Command((), _list, "every mapping"),
    "get": Command((Arg("id", ID),), _get, "one mapping by id"),
    "add": Command((Arg("proto", _proto), Arg("ext_port", PORT), Arg("int_ip", _ipv4), Arg("int_port", PORT),
                    Arg("description", _text, False), Arg("lifetime", _uint(0, MAX_LIFETIME), False)),
                   _add, "a static mapping made by the operator (lifetime 0: permanent)"),
    "delete": Command((Arg("id", ID, False), Arg("proto", _proto, False), Arg("ext_port", PORT, False)),
                      _delete, "one mapping, by id or by proto and ext_port"),
    "flush": Command((Arg("host", _ipv4, False),), _flush, "every mapping, or one LAN host's"),
    "host-left": Command((Arg("ip", _ipv4),), _host_left, "a LAN host left (DHCP release): drop its mappings"),
    "reload": Command((), _reload, "re-read the configuration, keeping the mappings"),
    "watch": Command((), _watch, "stream change events until the client closes"),
}


@dataclass(frozen=True)
class Request:
    """A parsed, checked request."""

    cmd: str
    args: dict[str, Any]


def parse_request(line: bytes) -> Request:
    """One request line -> :class:`Request`; raises BackendError with the reason."""
    if len(line) > MAX_LINE:
        raise BackendError(ErrorKind.TOO_LARGE, f"request over {MAX_LINE} bytes")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise BackendError(ErrorKind.BAD_REQUEST, "not JSON: send one JSON object per line") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("cmd"), str):
        raise BackendError(ErrorKind.BAD_REQUEST, 'expected an object with "cmd"')
    name = obj.pop("cmd")
    command = COMMANDS.get(name)
    if command is None:
        raise BackendError(ErrorKind.UNKNOWN_COMMAND, f"unknown command {name[:40]!r}; "
                           f"known: {', '.join(COMMANDS)}")
    known = {a.name for a in command.args}
    if extra := sorted(obj.keys() - known):
        raise BackendError(ErrorKind.INVALID, f"{name}: unknown argument {extra[0][:40]!r}")
    args: dict[str, Any] = {}
    for arg in command.args:
        if arg.name not in obj:
            if arg.required:
                raise BackendError(ErrorKind.INVALID, f"{name}: missing {arg.name}")
            continue
        try:
            args[arg.name] = arg.check(obj[arg.name])
        except ValueError as exc:
            raise BackendError(ErrorKind.INVALID, f"{name}: {arg.name} must be {exc}") from None
    return Request(name, args)


LEGACY_HOST_LEFT = b"host-left "


async def legacy_host_left(backend: AdminBackend, line: bytes) -> bytes:
    """controld 0.1's one-line protocol, kept for hooks from before the admin API:
    ``host-left IP`` -> ``ok N`` (mappings removed) or ``error WHY``."""
    words = line.decode("ascii", errors="replace").split()
    try:
        if len(words) != 2:
            raise ValueError("expected: host-left <IPv4 address>")
        ip = _ipv4(words[1])
    except ValueError as exc:
        return f"error {exc}\n".encode()
    try:
        return f"ok {await backend.host_left(ip)}\n".encode()
    except BackendError as exc:
        return f"error {exc.kind.value}: {exc.message}\n".encode()


async def execute(backend: AdminBackend, req: Request) -> bytes:
    """Run a checked request against the core; returns the reply line."""
    try:
        result = await COMMANDS[req.cmd].run(backend, req.args)
    except BackendError as exc:
        return error_line(exc)
    return encode({"ok": True, "result": result})


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def encode(obj: dict[str, Any]) -> bytes:
    """One reply or event line (compact JSON, newline-terminated)."""
    return json.dumps({k: _plain(v) for k, v in obj.items()}, separators=(",", ":")).encode() + b"\n"


def error_line(exc: BackendError) -> bytes:
    """The reply line for a refused request."""
    return encode({"ok": False, "error": {"kind": exc.kind.value, "message": exc.message}})


def event_line(ev: ChangeEvent) -> bytes:
    """One ``watch`` line."""
    return encode({"event": ev.kind, "mapping": ev.mapping, "reason": ev.reason, "time": ev.time})
