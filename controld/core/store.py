"""The one mapping table behind every front end: in memory for speed, SQLite (WAL) for truth.

The store is the only writer of rows. Every write goes to SQLite before the caller
answers a client (docs/requirements.md IWF-28 to IWF-30, IWF-32: persist the nonce with
the entry). Listing order is creation order: a mapping keeps its index until something
before it is removed. Indexes: by external (port, proto), by owner, by listing index
(O(1) for GetGenericPortMappingEntry). Every write is told to every subscriber as a
:class:`~controld.core.model.ChangeEvent` (row before and after, a sequence number):
GENA and SystemUpdateID today, the admin ``watch`` and LAN PCP ANNOUNCE next;
:meth:`MappingTable.publish` tells them of changes that are not a row (addresses, mode).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from controld.core.events import ChangeEvent, ChangeKind
from controld.core.lifecycle import LISTED, State
from controld.core.model import CoreError, ErrorKind, Mapping
from shared import idindex

log = logging.getLogger("controld.core.store")
Subscriber = Callable[[ChangeEvent], object]
MAX_UNSAVED_DELETES = 100_000
SQLITE_CACHE_KIB = 64
SQLITE_BUSY_S = 5.0  # how long a write waits for another process's lock (sqlite3's own default)
# The WAL file left after SQLite's automatic checkpoint (every ~1000 pages, ~4 MiB): the state dir
# is RAM on OpenWrt (/var), so a file kept at its high-water mark would hold that much for good.
WAL_KEEP_BYTES = 512 * 1024
_COLUMNS = [f.name for f in fields(Mapping)]
# Text columns are interned: a host's address, a description, the mode repeat across thousands of
# rows, and one object per distinct value is a third less memory with 10k rows (128 MB routers).
_TEXT = [f.name for f in fields(Mapping) if "str" in str(f.type)]
_STATE_AT = _COLUMNS.index("state")
# Ports that nearly always equal the external one (UPnP maps a port to itself; nat1-only's NAT1 port
# is it) hold the external port's int object: 64 bytes less per mapping.
_SAME_PORT = ("int_port", "nat1_port")
_PORTS = ("ext_port", *_SAME_PORT)
_FIELD_SET = frozenset(_COLUMNS)
_new, _set = object.__new__, object.__setattr__
_SAVE = f"INSERT OR REPLACE INTO mappings ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS mappings (
    id INTEGER PRIMARY KEY, cp TEXT NOT NULL, igd INTEGER NOT NULL, remote_host TEXT NOT NULL,
    ext_port INTEGER NOT NULL, proto INTEGER NOT NULL, int_client TEXT NOT NULL,
    int_port INTEGER NOT NULL, description TEXT NOT NULL, lease INTEGER NOT NULL,
    lease_end REAL, state TEXT NOT NULL, created REAL NOT NULL, nat1_port INTEGER,
    nonce BLOB, pcp_server TEXT, ext_ip TEXT, pcp_lifetime INTEGER, pcp_expiry REAL,
    prefer_failure INTEGER NOT NULL, mode TEXT NOT NULL, origin TEXT NOT NULL DEFAULT 'upnp'
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS upstream_deletes (
    id INTEGER PRIMARY KEY, server TEXT NOT NULL, nonce BLOB NOT NULL, proto INTEGER NOT NULL,
    int_port INTEGER NOT NULL, third_party TEXT, until REAL NOT NULL, attempt INTEGER NOT NULL, due REAL NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class PendingDelete:
    """An upstream delete (MAP lifetime 0) NAT2 has not confirmed: the mapping's id, its server,
    nonce, protocol, the internal port NAT2 knows (the NAT1 port when cascaded), THIRD_PARTY."""

    id: int
    server: str
    nonce: bytes
    proto: int
    int_port: int
    third_party: str | None
    until: float  # the mapping's NAT2 lifetime ends: nothing left to delete after this
    attempt: int
    due: float


def _evolve(row: Mapping, changes: dict[str, Any]) -> Mapping:
    """``dataclasses.replace(row, **changes)`` on the store's hot path, 2.5x faster: a row is
    plain values (no __post_init__), so copying the slots is the same row without the keyword
    binding of __init__; an unknown field is a TypeError as there."""
    if not _FIELD_SET.issuperset(changes):
        raise TypeError(f"Mapping has no field {sorted(set(changes) - _FIELD_SET)}")
    new = _new(Mapping)
    for name in _COLUMNS:
        _set(new, name, changes[name] if name in changes else getattr(row, name))
    return new


class MappingTable:
    """Mappings by id, by (ext port, proto), and by listing index."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.db = sqlite3.connect(os.path.join(state_dir, "mappings.sqlite3"), isolation_level=None,
                                  timeout=SQLITE_BUSY_S)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes of the daemon
        # Rows live in memory (by_id); SQLite only writes by primary key and reads at start, so its
        # page cache (2 MiB by default, filled by the start's full read) would only hold RSS. At 64 KiB
        # a write by id still finds the b-tree's upper pages cached (31 us, as at 256 KiB, at 10k rows).
        self.db.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        self.db.executescript(_SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(mappings)")}
        if "origin" not in have:  # a table from before origins were stored: every row came by UPnP
            self.db.execute("ALTER TABLE mappings ADD COLUMN origin TEXT NOT NULL DEFAULT 'upnp'")
        self.by_id: dict[int, Mapping] = {}
        # The indexes hold ids under keys made of the row's own objects where they can (a nested dict
        # per protocol, not a key tuple per row), and no reverse maps: they are undone from the row
        # last indexed, by_id's. ~250 bytes less per mapping than tuples, sets and reverse maps.
        self._by_port: dict[int, dict[int, int]] = {}  # proto -> ext port -> id holding it
        self._listed: list[int] = []  # ids of listed mappings, ascending
        self._owned: dict[str, int] = {}  # listed mappings per owner (quota checks in O(1))
        # (proto, internal client) -> internal port -> listed id (PCP, NAT-PMP key on it); a tuple of
        # ids when UPnP points several external ports at one (rare: nearly always a single id)
        self._internal: dict[tuple[int, str], dict[int, idindex.Held]] = {}
        self._subscribers: list[Subscriber] = []
        self.seq = 0  # the last ChangeEvent's sequence number
        self._unsaved_deletes: set[int] = set()  # deleted in memory, not yet on disk (disk full)
        state_at, pf_at = _COLUMNS.index("state"), _COLUMNS.index("prefer_failure")
        text_at = [_COLUMNS.index(c) for c in _TEXT]
        ext_at, same_at = _COLUMNS.index("ext_port"), [_COLUMNS.index(c) for c in _SAME_PORT]
        created_at = _COLUMNS.index("created")
        created: dict[float, float] = {}  # one float per second, shared as the rows made in it share it
        for row in self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM mappings ORDER BY id"):
            values: list[Any] = list(row)
            values[created_at] = created.setdefault(values[created_at], values[created_at])
            for i in text_at:
                if values[i]:
                    values[i] = sys.intern(values[i])
            for i in same_at:
                if values[i] == values[ext_at]:
                    values[i] = values[ext_at]
            values[state_at], values[pf_at] = State(values[state_at]), bool(values[pf_at])
            self._index(Mapping(*values))
        row = self.db.execute("SELECT MAX(id) FROM mappings").fetchone()
        self._next_id = (row[0] or 0) + 1

    def new_id(self) -> int:
        nid = self._next_id
        self._next_id += 1
        return nid

    def _index(self, m: Mapping) -> None:
        prev = self.by_id.get(m.id)
        self.by_id[m.id] = m
        ports = self._by_port.setdefault(m.proto, {})
        if prev is not None and (prev.ext_port, prev.proto) != (m.ext_port, m.proto):
            self._unport(prev)
        holder = ports.get(m.ext_port)
        # A pending request never displaces a mapping already holding the port.
        if holder != m.id and (holder is None or m.state in LISTED or holder not in self.by_id):
            ports[m.ext_port] = m.id
        pos = bisect.bisect_left(self._listed, m.id)
        present = pos < len(self._listed) and self._listed[pos] == m.id
        if m.state in LISTED and not present:
            self._listed.insert(pos, m.id)
        elif m.state not in LISTED and present:
            del self._listed[pos]
        if prev is not None:
            self._unown(prev)
        if m.state in LISTED:
            self._owned[m.cp] = self._owned.get(m.cp, 0) + 1
            idindex.add(self._internal, (m.proto, m.int_client), m.int_port, m.id)

    def _unport(self, row: Mapping) -> None:
        """Take ``row`` (as last indexed) out of the external port index, if it holds its port."""
        ports = self._by_port.get(row.proto)
        if ports is not None and ports.get(row.ext_port) == row.id:
            del ports[row.ext_port]

    def apply(self, row: Mapping, durable: bool = True, **changes: Any) -> Mapping:
        """The one write. With ``changes``: the current row of ``row``'s id with those changes
        (nothing is written for a row deleted meanwhile); without: ``row`` as given (a new row).
        On disk first (unless not ``durable``: then with the next durable write), then
        re-indexed. Returns the row as stored; earlier copies are stale from then on."""
        before = self.by_id.get(row.id)
        if changes:
            if before is None:  # deleted while its writer waited: it stays deleted
                return dataclasses.replace(row, **changes)
            for f in _PORTS:  # a port that equals the external one holds its int (a NAT1 port, a grant)
                if f in changes and changes[f] == before.ext_port:
                    changes[f] = before.ext_port
            m = _evolve(before, changes)
        else:
            shared: dict[str, Any] = {f: sys.intern(getattr(row, f)) for f in _TEXT if getattr(row, f)}
            shared.update((f, row.ext_port) for f in _SAME_PORT if getattr(row, f) == row.ext_port)
            m = _evolve(row, shared)
        if durable:
            values = [getattr(m, c) for c in _COLUMNS]
            values[_STATE_AT] = m.state.value
            self._write(_SAVE, values)
        self._index(m)  # only once on disk: memory never holds a row the disk refused
        if m != before:
            self._emit(ChangeKind.ADDED if before is None else ChangeKind.CHANGED, before, m)
        return m

    def _write(self, sql: str, args: Any) -> None:
        """One write to disk, after any deletes a full disk held back; a failure (disk full,
        read-only state dir) is an UNAVAILABLE CoreError and changes nothing."""
        try:
            if self._unsaved_deletes:
                self.db.executemany("DELETE FROM mappings WHERE id = ?", [(i,) for i in self._unsaved_deletes])
                self._unsaved_deletes.clear()
            self.db.execute(sql, args)
        except sqlite3.Error as exc:
            raise CoreError(ErrorKind.UNAVAILABLE, f"cannot save the mapping table: {exc}") from None

    def delete(self, m: Mapping, why: str = "") -> None:
        """Forget ``m``: from memory always, from disk now or with the next write that succeeds
        (so a clean-up on a full disk still goes on to remove the NAT1 binding); subscribers hear
        it with ``why``."""
        try:
            self._write("DELETE FROM mappings WHERE id = ?", (m.id,))
        except CoreError:
            if len(self._unsaved_deletes) < MAX_UNSAVED_DELETES:  # bounded; a restart cleans up the rest
                self._unsaved_deletes.add(m.id)
        before = self.by_id.pop(m.id, None)
        if before is not None:
            self._unport(before)
        pos = bisect.bisect_left(self._listed, m.id)
        if pos < len(self._listed) and self._listed[pos] == m.id:
            del self._listed[pos]
        if before is not None:
            self._unown(before)
            self._emit(ChangeKind.REMOVED, before, None, why)

    def _unown(self, row: Mapping) -> None:
        """Take ``row`` (as it was last indexed) out of the owner and internal-tuple indexes."""
        if row.state not in LISTED:
            return  # only listed rows are in them
        idindex.discard(self._internal, (row.proto, row.int_client), row.int_port, row.id)
        left = self._owned.get(row.cp, 0) - 1
        if left > 0:
            self._owned[row.cp] = left
        else:
            self._owned.pop(row.cp, None)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` with every :class:`ChangeEvent` from now on (synchronously, after
        the write, so it must not block); returns the function that stops it."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    def publish(self, reason: str = "") -> None:
        """Tell every subscriber that something they show changed that is no row (addresses, mode)."""
        self._emit(ChangeKind.ADDRESSES, None, None, reason)

    def _emit(self, kind: ChangeKind, before: Mapping | None, after: Mapping | None, reason: str = "") -> None:
        self.seq += 1
        ev = ChangeEvent(self.seq, kind, before, after, reason)
        for callback in list(self._subscribers):
            try:
                callback(ev)
            except Exception:  # one broken subscriber must not fail the write nor starve the others
                log.exception("change subscriber %r failed on event %d", callback, ev.seq)

    def owned_by(self, owner: str) -> int:
        """How many listed mappings ``owner`` holds."""
        return self._owned.get(owner, 0)

    def find(self, ext_port: int, proto: int) -> Mapping | None:
        mid = self._by_port.get(proto, idindex.EMPTY).get(ext_port)
        return None if mid is None else self.by_id[mid]

    def find_internal(self, proto: int, int_client: str, int_port: int) -> Mapping | None:
        """The listed mapping of an internal tuple, O(1) (PCP and NAT-PMP key mappings on it)."""
        mid = idindex.lowest(self._internal, (proto, int_client), int_port)
        return None if mid is None else self.by_id[mid]  # the oldest, when UPnP made several

    def listed(self) -> list[Mapping]:
        return [self.by_id[i] for i in self._listed]

    def at_index(self, index: int) -> Mapping | None:
        """The ``index``-th listed mapping (GetGenericPortMappingEntry), O(1)."""
        return self.by_id[self._listed[index]] if 0 <= index < len(self._listed) else None

    def count(self) -> int:
        return len(self._listed)

    def save_pending_delete(self, d: PendingDelete) -> None:
        """Remember an upstream delete NAT2 has not confirmed (retried until it does or ``until``)."""
        self._write("INSERT OR REPLACE INTO upstream_deletes (id, server, nonce, proto, int_port, third_party, "
                    "until, attempt, due) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", dataclasses.astuple(d))

    def pending_deletes(self) -> list[PendingDelete]:
        """Every unconfirmed upstream delete, soonest due first."""
        rows = self.db.execute("SELECT id, server, nonce, proto, int_port, third_party, until, attempt, due "
                               "FROM upstream_deletes ORDER BY due").fetchall()
        return [PendingDelete(*r) for r in rows]

    def drop_pending_delete(self, did: int) -> None:
        """NAT2 confirmed (or the mapping's NAT2 lifetime passed)."""
        self._write("DELETE FROM upstream_deletes WHERE id = ?", (did,))

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and empty its file, waiting for nobody; for a quiet
        moment (controld's QuietTrim after a burst of writes). Off the request path, the
        checkpoint's fsync (12-14 ms on the bench's disk) stalls no answer, and the WAL gives its
        pages back (RAM on OpenWrt). False when another reader held it back or it failed: the
        automatic checkpoint still bounds the WAL, and the next quiet moment tries again."""
        try:
            self.db.execute("PRAGMA busy_timeout=0")
            try:
                busy, frames, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                self.db.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_S * 1000)}")
        except sqlite3.Error as exc:
            log.warning("WAL checkpoint failed (the next quiet moment tries again): %s", exc)
            return False
        log.debug("WAL checkpoint: %d frames, %s", frames, "held back by a reader" if busy else "emptied")
        return not busy

    def close(self) -> None:
        self.db.close()
