"""controld's local admin endpoint: a Unix stream socket for hooks on the router itself.

One request line, one answer line (both bounded), then the connection closes:

    host-left 192.168.1.2    ->  ok 3          (mappings removed; docs/requirements.md IWF-79, IWF-80)
    anything else            ->  error <why>

The DHCP-release hook (packaging/hooks/) sends ``host-left`` through ``igdpcp
host-left``. The socket is mode 0660: only root and the igdpcp group may use it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable

from shared.guard import Guard

log = logging.getLogger("controld.admin")

MAX_LINE = 256
READ_TIMEOUT_S = 5.0


def parse_command(line: bytes) -> tuple[str, str]:
    """(command, argument) from one request line; raises ValueError for anything else."""
    parts = line.decode("ascii", errors="replace").split()
    if len(parts) != 2 or parts[0] != "host-left":
        raise ValueError("expected: host-left <IPv4 address>")
    return parts[0], str(ipaddress.IPv4Address(parts[1]))


class AdminServer:
    """Serves ``host-left`` on a Unix socket; ``host_left`` removes the host's mappings."""

    def __init__(self, path: str, host_left: Callable[[str], Awaitable[int]]) -> None:
        self.path = path
        self.host_left = host_left
        self._server: asyncio.AbstractServer | None = None
        self.guard = Guard(log, "admin")

    async def start(self) -> None:
        """Bind the socket (replacing a stale one)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_LINE)
        os.chmod(self.path, 0o660)
        log.info("admin socket at %s", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            try:
                _, ip = parse_command(line)
            except ValueError as exc:
                answer = f"error {exc}"
            else:
                n = await self.host_left(ip)
                log.info("admin: host-left %s removed %d mappings", ip, n)
                answer = f"ok {n}"
            writer.write(answer.encode()[:MAX_LINE] + b"\n")
            await writer.drain()
        except (TimeoutError, asyncio.LimitOverrunError, ValueError, ConnectionError) as exc:
            log.info("admin: dropped a request: %s", type(exc).__name__)
        except Exception as exc:  # the guard (shared/guard.py): a request never ends the admin socket
            self.guard.unexpected("admin socket", exc)
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


async def send_host_left(path: str, ip: str, timeout: float = 30.0) -> str:
    """Client side (``igdpcp host-left``): returns controld's answer line."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=MAX_LINE), timeout)
    try:
        writer.write(f"host-left {ip}\n".encode())
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), timeout)).decode(errors="replace").strip()
    finally:
        writer.close()
