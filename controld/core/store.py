"""The one mapping table behind every front end: in memory for speed, SQLite (WAL) for truth.

The store is the only writer of rows. Every write goes to SQLite before the caller
answers a client (docs/requirements.md IWF-28 to IWF-30, IWF-32: persist the nonce with
the entry). Listing order is creation order: a mapping keeps its index until something
before it is removed. Indexes: by external (port, proto), by owner, by listing index
(O(1) for GetGenericPortMappingEntry). :meth:`MappingTable.publish` tells every
subscriber (GENA, SSDP today) that mappings or addresses changed.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from controld.core.lifecycle import LISTED, State
from controld.core.model import Mapping

_COLUMNS = [f.name for f in fields(Mapping)]
# Text columns are interned: a host's address, a description, the mode repeat across thousands of
# rows, and one object per distinct value is a third less memory with 10k rows (128 MB routers).
_TEXT = [f.name for f in fields(Mapping) if "str" in str(f.type)]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS mappings (
    id INTEGER PRIMARY KEY, cp TEXT NOT NULL, igd INTEGER NOT NULL, remote_host TEXT NOT NULL,
    ext_port INTEGER NOT NULL, proto INTEGER NOT NULL, int_client TEXT NOT NULL,
    int_port INTEGER NOT NULL, description TEXT NOT NULL, lease INTEGER NOT NULL,
    lease_end REAL, state TEXT NOT NULL, created REAL NOT NULL, nat1_port INTEGER,
    nonce BLOB, pcp_server TEXT, ext_ip TEXT, pcp_lifetime INTEGER, pcp_expiry REAL,
    prefer_failure INTEGER NOT NULL, mode TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class MappingTable:
    """Mappings by id, by (ext port, proto), and by listing index."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.db = sqlite3.connect(os.path.join(state_dir, "mappings.sqlite3"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes of the daemon
        self.db.executescript(_SCHEMA)
        self.by_id: dict[int, Mapping] = {}
        self.by_key: dict[tuple[int, int], int] = {}
        self._key_of: dict[int, tuple[int, int]] = {}  # the key each mapping is indexed under
        self._listed: list[int] = []  # ids of listed mappings, ascending
        self._owned: dict[str, set[int]] = {}  # listed ids by owner (quota checks in O(1))
        self._owner_of: dict[int, str] = {}
        self._subscribers: list[Callable[[], None]] = []
        state_at, pf_at = _COLUMNS.index("state"), _COLUMNS.index("prefer_failure")
        text_at = [_COLUMNS.index(c) for c in _TEXT]
        for row in self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM mappings ORDER BY id"):
            values: list[Any] = list(row)
            for i in text_at:
                if values[i]:
                    values[i] = sys.intern(values[i])
            values[state_at], values[pf_at] = State(values[state_at]), bool(values[pf_at])
            self._index(Mapping(*values))
        row = self.db.execute("SELECT MAX(id) FROM mappings").fetchone()
        self._next_id = (row[0] or 0) + 1

    def new_id(self) -> int:
        nid = self._next_id
        self._next_id += 1
        return nid

    def _index(self, m: Mapping) -> None:
        self.by_id[m.id] = m
        key = (m.ext_port, m.proto)
        old = self._key_of.get(m.id)
        if old != key:
            if old is not None and self.by_key.get(old) == m.id:
                del self.by_key[old]
            # A pending request never displaces a mapping already holding the port.
            holder = self.by_key.get(key)
            if holder is None or m.state in LISTED or holder not in self.by_id:
                self.by_key[key] = m.id
                self._key_of[m.id] = key
            else:
                self._key_of.pop(m.id, None)
        pos = bisect.bisect_left(self._listed, m.id)
        present = pos < len(self._listed) and self._listed[pos] == m.id
        if m.state in LISTED and not present:
            self._listed.insert(pos, m.id)
        elif m.state not in LISTED and present:
            del self._listed[pos]
        self._unown(m.id)
        if m.state in LISTED:
            self._owned.setdefault(m.cp, set()).add(m.id)
            self._owner_of[m.id] = m.cp

    def apply(self, row: Mapping, durable: bool = True, **changes: Any) -> Mapping:
        """The one write. With ``changes``: the current row of ``row``'s id with those changes
        (nothing is written for a row deleted meanwhile); without: ``row`` as given (a new row).
        On disk first (unless not ``durable``: then with the next durable write), then
        re-indexed. Returns the row as stored; earlier copies are stale from then on."""
        if changes:
            cur = self.by_id.get(row.id)
            if cur is None:  # deleted while its writer waited: it stays deleted
                return dataclasses.replace(row, **changes)
            m = dataclasses.replace(cur, **changes)
        else:
            shared: dict[str, Any] = {f: sys.intern(getattr(row, f)) for f in _TEXT if getattr(row, f)}
            m = dataclasses.replace(row, **shared)
        if durable:
            values = [getattr(m, c) for c in _COLUMNS]
            values[_COLUMNS.index("state")] = m.state.value
            self.db.execute(f"INSERT OR REPLACE INTO mappings ({', '.join(_COLUMNS)}) VALUES "
                            f"({', '.join('?' * len(_COLUMNS))})", values)
        self._index(m)
        return m

    def delete(self, m: Mapping) -> None:
        self.db.execute("DELETE FROM mappings WHERE id = ?", (m.id,))
        self.by_id.pop(m.id, None)
        key = self._key_of.pop(m.id, None)
        if key is not None and self.by_key.get(key) == m.id:
            del self.by_key[key]
        pos = bisect.bisect_left(self._listed, m.id)
        if pos < len(self._listed) and self._listed[pos] == m.id:
            del self._listed[pos]
        self._unown(m.id)

    def _unown(self, mid: int) -> None:
        owner = self._owner_of.pop(mid, None)
        ids = self._owned.get(owner) if owner is not None else None
        if ids is not None:
            ids.discard(mid)
            if not ids:
                del self._owned[owner]  # type: ignore[arg-type]

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every published change (mappings or addresses)."""
        self._subscribers.append(callback)

    def publish(self) -> None:
        """Tell every subscriber that something they show changed."""
        for callback in self._subscribers:
            callback()

    def owned_by(self, owner: str) -> int:
        """How many listed mappings ``owner`` holds."""
        return len(self._owned.get(owner, ()))

    def find(self, ext_port: int, proto: int) -> Mapping | None:
        mid = self.by_key.get((ext_port, proto))
        return None if mid is None else self.by_id[mid]

    def listed(self) -> list[Mapping]:
        return [self.by_id[i] for i in self._listed]

    def at_index(self, index: int) -> Mapping | None:
        """The ``index``-th listed mapping (GetGenericPortMappingEntry), O(1)."""
        return self.by_id[self._listed[index]] if 0 <= index < len(self._listed) else None

    def count(self) -> int:
        return len(self._listed)

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        self.db.close()
