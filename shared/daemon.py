"""What both daemons do the same way: logging, signals, ZeroMQ endpoint details."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.guard import SafeFormatter

if TYPE_CHECKING:
    import zmq

log = logging.getLogger("shared.daemon")

MAX_DEFERRED_RECORDS = 256  # log records held for the loop's next turn before they are written at once


class DeferredHandler(logging.StreamHandler):
    """A stream handler that formats and writes on the event loop's next turn.

    A daemon logs one line per mapping event from inside the request it answers; writing
    the line there put its formatting and write(2) before the answer. Here the record is
    kept (bounded) and written right after the current callback, so the answer goes first
    and the order of lines is unchanged. Without a running loop (start-up, shutdown, a
    crash) a record is written at once; :meth:`flush` writes whatever is held.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._held: list[logging.LogRecord] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or len(self._held) >= MAX_DEFERRED_RECORDS or record.exc_info:
            self.flush()
            super().emit(record)
            return
        # the message is fixed now: arguments may be mutable rows the request changes next
        record.msg, record.args = record.getMessage(), None
        self._held.append(record)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every held record, in order."""
        self._scheduled = False
        held, self._held = self._held, []
        for record in held:
            super().emit(record)
        super().flush()


def setup_logging(name: str, level: str = "info") -> None:
    """One line per event on stderr, prefixed with the daemon's name; control characters in
    messages escaped (shared.guard.SafeFormatter: a peer's string cannot forge a line);
    written after the answer a request is waiting for (:class:`DeferredHandler`)."""
    logging._srcfile = None  # no caller lookup: no format names a line
    logging.logThreads = logging.logMultiprocessing = False
    handler = DeferredHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def reread_args(parse: Callable[[], argparse.Namespace], old: argparse.Namespace,
                restart_only: tuple[str, ...], log: logging.Logger) -> argparse.Namespace | None:
    """SIGHUP: parse flags + config file again; None (old settings kept) if the file is bad.

    Options in ``restart_only`` cannot change in a running daemon: a changed one is
    logged, and keeps its old value until the next start.
    """
    try:
        new = parse()
    except (SystemExit, Exception) as exc:  # argparse exits on a bad file; a reload must not
        log.warning("reload: configuration not usable, keeping the running one (%s)", exc)
        return None
    for name in restart_only:
        if getattr(new, name, None) != getattr(old, name, None):
            log.warning("reload: %s changed; it takes effect at the next start", name)
            setattr(new, name, getattr(old, name, None))
    logging.getLogger().setLevel(getattr(logging, str(new.log_level).upper(), logging.INFO))
    return new


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT end the daemon cleanly through ``stop``."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


@functools.cache
def _glibc(name: str) -> Callable[..., int] | None:
    """glibc's function ``name`` (``malloc_trim``, ``mallopt``), or None (musl has neither)."""
    try:
        import ctypes  # already loaded by pyzmq in both daemons

        fn: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (ImportError, OSError, AttributeError):
        return None
    return fn


M_MMAP_THRESHOLD = -3  # mallopt(3) parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, held


def hold_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at MMAP_THRESHOLD (``mallopt``; nothing without glibc).

    By default glibc raises it to the size of each mmapped block freed: after a bulk write's
    batch buffer (~1 MiB at 10k forwards) every later block of that size comes from the heap,
    where anything allocated after it keeps the pages resident for good. Measured in natd after
    its restart sequence at 10k: 28.7-30.3 MiB from one run to the next, 28.7-28.9 held. The
    request path's buffers are far below the threshold, so it changes nothing there.
    """
    mallopt = _glibc("mallopt")
    if mallopt is not None:  # (musl: no mallopt, and no dynamic threshold either)
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_memory() -> None:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim``).

    Python frees into holes of the C heap that glibc keeps resident: after start-up (0.2-0.3 MiB
    a daemon; ~1 MiB when modules were compiled from source), a sync or a restore of thousands of
    forwards. Nothing to do without glibc (musl gives pages back itself).
    """
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


TRIM_AFTER_OPS = 200  # operations after which a quiet spell gives the heap's free pages back
TRIM_QUIET_S = 0.5


class QuietTrim:
    """:func:`release_memory` once a burst of work is over: a thousand adds leave the C heap
    with free holes (request buffers, replies, index growth) that glibc keeps resident,
    ~0.2-0.5 MiB a daemon. It trims at the first ``quiet`` seconds without an operation after
    at least ``ops`` of them (a steady stream: once it pauses), never on the request path.
    ``tidy`` runs just before, for the owner's own work of that kind (controld: the WAL checkpoint)."""

    def __init__(self, ops: int = TRIM_AFTER_OPS, quiet: float = TRIM_QUIET_S,
                 tidy: Callable[[], object] | None = None) -> None:
        self.ops, self.quiet, self.tidy = ops, quiet, tidy
        self.count = 0
        self._trimmed_at = 0

    def note(self, *_: object) -> None:
        """One operation done (usable as a subscriber or a callback of any signature)."""
        self.count += 1

    def soon(self) -> None:
        """A bulk operation (a sync, a restore) counts as a burst: trim at the next quiet moment, after
        what follows it (replies, the monitor's events of its own commit) is done as well."""
        self.count += self.ops

    def due(self, seen: int) -> bool:
        """Trim now? ``seen`` is the count one quiet period ago."""
        return self.count == seen and self.count - self._trimmed_at >= self.ops

    async def run(self) -> None:
        """The daemon's task: look once per quiet period (one wake-up, no work while idle)."""
        seen = self.count
        while True:
            await asyncio.sleep(self.quiet)
            if self.due(seen):
                if self.tidy is not None:
                    try:
                        self.tidy()
                    except Exception:  # a bug in the tidy-up must not end the trims
                        log.exception("quiet-time tidy-up failed")
                release_memory()
                self._trimmed_at = self.count
            seen = self.count


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


def bind_endpoint(sock: zmq.Socket, endpoint: str, group: str | None) -> None:
    """Bind ``sock``; an ipc:// socket file is born mode 0660 (umask) and handed to ``group``.

    Setting the umask before bind leaves no window in which another local user could
    connect to a more open socket file (docs/architecture.md, Trust).
    """
    prepare_ipc(endpoint)
    old = os.umask(0o117) if ipc_path(endpoint) else None
    try:
        sock.bind(endpoint)
    finally:
        if old is not None:
            os.umask(old)
    restrict_ipc(endpoint, group)


# --- CURVE keys for tcp:// (generated at install: igdpcp-natd --gen-keys DIR) ------------

NATD_KEY = "natd"
CONTROLD_KEY = "controld"
AUTHORIZED_DIR = "authorized"  # public keys of clients natd accepts


def needs_curve(endpoint: str) -> bool:
    """tcp:// (any non-ipc transport) is only allowed with CURVE."""
    return not endpoint.startswith(("ipc://", "inproc://"))


def gen_keys(directory: str) -> list[str]:
    """Create natd's and controld's CURVE key pairs in ``directory`` (secret files mode 0600)
    and authorise controld's public key for natd; returns the files written."""
    import shutil

    import zmq.auth

    os.makedirs(directory, mode=0o755, exist_ok=True)
    auth = os.path.join(directory, AUTHORIZED_DIR)
    os.makedirs(auth, mode=0o755, exist_ok=True)
    written = []
    for name in (NATD_KEY, CONTROLD_KEY):
        old = os.umask(0o077)
        try:
            pub, sec = zmq.auth.create_certificates(directory, name)
        finally:
            os.umask(old)
        os.chmod(pub, 0o644)
        os.chmod(sec, 0o600)
        written += [pub, sec]
    dst = os.path.join(auth, f"{CONTROLD_KEY}.key")
    shutil.copyfile(os.path.join(directory, f"{CONTROLD_KEY}.key"), dst)
    os.chmod(dst, 0o644)
    written.append(dst)
    return written


def _load(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        pub, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read CURVE key {path}: {exc}") from None
    if secret and not sec:
        raise SystemExit(f"{path} holds no secret key")
    return pub, sec


def curve_server(sock: zmq.Socket, key_dir: str) -> None:
    """Make ``sock`` a CURVE server with natd's key pair (before bind)."""
    pub, sec = _load(os.path.join(key_dir, f"{NATD_KEY}.key_secret"), True)
    sock.curve_secretkey = sec
    sock.curve_publickey = pub
    sock.curve_server = True


def curve_client(sock: zmq.Socket, key_dir: str) -> None:
    """Make ``sock`` a CURVE client with controld's key pair and natd's public key (before connect)."""
    pub, sec = _load(os.path.join(key_dir, f"{CONTROLD_KEY}.key_secret"), True)
    server, _ = _load(os.path.join(key_dir, f"{NATD_KEY}.key"), False)
    sock.curve_secretkey = sec
    sock.curve_publickey = pub
    sock.curve_serverkey = server
