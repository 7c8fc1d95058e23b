"""Client side of the admin API, for the CLI and the rpcd plugin (blocking: one short-lived process)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

from controld.adminapi.backend import BackendError, ErrorKind
from controld.adminapi.protocol import MAX_LINE

DEFAULT_SOCKET = "/var/run/igdpcp/controld.sock"
TIMEOUT_S = 30.0  # a delete or add may wait for the PCP server (pcp_timeout, 10 s by default)
MAX_REPLY = 16 * 1024 * 1024  # a list of 65536 mappings fits


class Unreachable(Exception):
    """controld's admin socket does not answer (daemon down, wrong path, no permission)."""


class Connection:
    """One connection to the admin socket; requests go one at a time."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = TIMEOUT_S) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise Unreachable(f"controld is not answering on {path}: {exc.strerror or exc}") from None
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_line(self, line: bytes) -> None:
        try:
            self.sock.sendall(line)
        except OSError as exc:
            raise Unreachable(f"controld closed {self.path}: {exc.strerror or exc}") from None

    def read_line(self, timeout: float | None = TIMEOUT_S) -> bytes:
        """The next line from controld (without the newline)."""
        self.sock.settimeout(timeout)
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_REPLY:
                raise Unreachable("controld's reply is too long")
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise Unreachable(f"controld did not answer on {self.path} in {timeout:.0f} s") from None
            except OSError as exc:
                raise Unreachable(f"controld closed {self.path}: {exc.strerror or exc}") from None
            if not chunk:
                raise Unreachable(f"controld closed {self.path} without an answer")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def call(self, cmd: str, **args: Any) -> Any:
        """Send one request; returns its result or raises BackendError (refused) / Unreachable."""
        line = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
        if len(line) > MAX_LINE:
            raise BackendError(ErrorKind.TOO_LARGE, f"request over {MAX_LINE} bytes")
        self.send_line(line)
        raw = self.read_line()
        try:
            reply = json.loads(raw)
        except ValueError:
            raise Unreachable(f"not an admin API answer: {raw[:80]!r}") from None
        if not isinstance(reply, dict):
            raise Unreachable(f"not an admin API answer: {raw[:80]!r}")
        if reply.get("ok") is True:
            return reply.get("result")
        err = reply.get("error") or {}
        try:
            kind = ErrorKind(err.get("kind"))
        except ValueError:
            kind = ErrorKind.INTERNAL
        raise BackendError(kind, str(err.get("message", "refused")))

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """After ``call("watch")``: each event as it comes (``timeout`` None waits for ever)."""
        while True:
            try:
                ev = json.loads(self.read_line(timeout))
            except ValueError:
                continue
            if isinstance(ev, dict):
                yield ev


def call(path: str, cmd: str, timeout: float = TIMEOUT_S, **args: Any) -> Any:
    """One request on a fresh connection."""
    with Connection(path, timeout) as conn:
        return conn.call(cmd, **args)


def host_left_legacy(path: str, ip: str, timeout: float = TIMEOUT_S) -> int:
    """``host-left`` in controld 0.1's line protocol (an upgrade's old daemon still running)."""
    with Connection(path, timeout) as conn:
        conn.send_line(f"host-left {ip}\n".encode())
        answer = conn.read_line().decode(errors="replace").split()
    if len(answer) == 2 and answer[0] == "ok" and answer[1].isdigit():
        return int(answer[1])
    raise BackendError(ErrorKind.INTERNAL, " ".join(answer) or "no answer")
