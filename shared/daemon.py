"""What both daemons do the same way: logging, signals, ZeroMQ endpoint details."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys


def setup_logging(name: str, level: str = "info") -> None:
    """One line per event on stderr, prefixed with the daemon's name."""
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT end the daemon cleanly through ``stop``."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint, else None."""
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def prepare_ipc(endpoint: str) -> None:
    """Make the directory of an ipc:// socket and clear a stale socket file."""
    path = ipc_path(endpoint)
    if path is None:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)


def restrict_ipc(endpoint: str, group: str | None) -> None:
    """Mode 0660 (and a dedicated group) on an ipc:// socket natd has bound."""
    path = ipc_path(endpoint)
    if path is None:
        return
    if group:
        import grp

        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    os.chmod(path, 0o660)
