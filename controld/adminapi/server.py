"""The admin socket: a Unix stream server for the admin API (controld/adminapi/protocol.py).

Access is by file mode: 0660, group ``igdpcp`` where that group exists (else root's),
so root and the igdpcp group only. The socket of a live controld is never taken over:
a second instance that finds the path answering refuses to start, and only a stale
socket (nobody accepting) is removed. At close the path is unlinked only while it is
still the socket this server made (same inode), never a successor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import stat
from collections.abc import Callable

from controld.adminapi import protocol
from controld.adminapi.backend import AdminBackend, BackendError, ChangeEvent, ErrorKind

log = logging.getLogger("controld.admin")

SOCKET_MODE = 0o660
SOCKET_GROUP = "igdpcp"
MAX_CLIENTS = 32
IDLE_TIMEOUT_S = 60.0  # a connection with no request for this long is closed (watchers excepted)
WATCH_QUEUE = 1024  # events buffered for one slow watcher before it is cut off
PROBE_TIMEOUT_S = 1.0


class SocketInUse(OSError):
    """Another live process serves the admin socket path."""


def _probe(path: str) -> bool:
    """True if something accepts connections on ``path`` now."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PROBE_TIMEOUT_S)
    try:
        s.connect(path)
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        s.close()


def bind_socket(path: str, group: str = SOCKET_GROUP) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0660 from the start (no window at the umask's mode).
    Raises SocketInUse if a live server answers there, OSError if ``path`` is not a socket."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        if _probe(path):
            raise SocketInUse(errno.EADDRINUSE, f"{path} is served by another process (controld running?)")
        log.info("admin: removing stale socket %s", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~SOCKET_MODE)  # single-threaded daemon: the umask change is ours alone
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = -1  # no such group: root only
    if gid >= 0:
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            log.warning("admin: cannot give %s to group %s: %s", path, group, exc)
    os.chmod(path, SOCKET_MODE)
    sock.listen(MAX_CLIENTS)
    sock.setblocking(False)
    return sock


class AdminServer:
    """Serves the admin API on ``path`` for ``backend``."""

    def __init__(self, path: str, backend: AdminBackend, group: str = SOCKET_GROUP) -> None:
        self.path = path
        self.backend = backend
        self.group = group
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and listen. Raises SocketInUse when a live instance owns the path."""
        sock = bind_socket(self.path, self.group)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=protocol.MAX_LINE)
        log.info("admin socket at %s", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            if len(self._clients) >= MAX_CLIENTS:
                with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError,
                                         asyncio.LimitOverrunError):
                    await asyncio.wait_for(reader.readuntil(b"\n"), 1.0)  # answer its request, not a reset
                writer.write(protocol.error_line(BackendError(ErrorKind.BUSY, "too many admin clients")))
                await writer.drain()
                return
            if task is not None:
                self._clients.add(task)
            await self._conversation(reader, writer)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _conversation(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(1_000_000):  # bounded: a client may send many requests on one connection
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), IDLE_TIMEOUT_S)
            except asyncio.IncompleteReadError:
                return  # the client closed
            except asyncio.LimitOverrunError:
                writer.write(protocol.error_line(BackendError(
                    ErrorKind.TOO_LARGE, f"request over {protocol.MAX_LINE} bytes")))
                await writer.drain()
                return  # the rest of the line is unread: the stream cannot be resynchronised
            if line.startswith(protocol.LEGACY_HOST_LEFT):  # an old hook: one line, one answer, close
                writer.write(await protocol.legacy_host_left(self.backend, line))
                await writer.drain()
                return
            try:
                req = protocol.parse_request(line)
            except BackendError as exc:
                writer.write(protocol.error_line(exc))
                await writer.drain()
                continue
            try:
                reply = await protocol.execute(self.backend, req)
            except Exception:  # a bug in the core must not kill the admin socket
                log.exception("admin: %s failed", req.cmd)
                reply = protocol.error_line(BackendError(ErrorKind.INTERNAL, f"{req.cmd} failed (see log)"))
            if req.cmd not in ("status", "list", "get", "watch"):
                log.info("admin: %s %s -> %s", req.cmd, req.args, reply[:200].decode(errors="replace").strip())
            writer.write(reply)
            await writer.drain()
            if req.cmd == "watch":
                await self._watch(reader, writer)
                return

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[ChangeEvent | None] = asyncio.Queue(WATCH_QUEUE)

        def push(ev: ChangeEvent) -> None:
            try:
                queue.put_nowait(ev)
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                queue.put_nowait(None)  # too slow: tell it and stop

        stop: Callable[[], None] = self.backend.subscribe(push)
        closed = asyncio.ensure_future(reader.read(1))  # any byte or EOF from the client ends the watch
        got: asyncio.Future[ChangeEvent | None] | None = None
        try:
            while True:
                got = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({got, closed}, return_when=asyncio.FIRST_COMPLETED)
                if got not in done:
                    return
                ev = got.result()
                if ev is None:
                    writer.write(protocol.encode({"event": "overflow", "reason": "client too slow"}))
                    await writer.drain()
                    return
                writer.write(protocol.event_line(ev))
                await writer.drain()
        finally:
            stop()
            closed.cancel()
            if got is not None:
                got.cancel()  # also when the server closes mid-wait: no pending get left behind

    async def close(self) -> None:
        """Stop serving; unlink the path only if it is still our socket."""
        if self._server is not None:
            self._server.close()
            clients = list(self._clients)
            for task in clients:
                task.cancel()
            if clients:  # let them close their connections (bounded)
                await asyncio.wait(clients, timeout=2.0)
            self._server = None
        if self._inode is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
            self._inode = None
