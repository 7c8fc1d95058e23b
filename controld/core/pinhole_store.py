"""The pinhole rows in SQLite, beside the mappings in the same database (controld/core/store.py).

Leases are stored as wall-clock ends, since the monotonic clock restarts with the machine;
on load they are turned back into the core's clock, and rows already past their end are
dropped. Each write happens before the caller answers its client, as for mappings.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import fields, replace

from controld.core.pinhole import Pinhole

_COLUMNS = [f.name for f in fields(Pinhole)]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pinholes (
    uid INTEGER PRIMARY KEY, owner TEXT NOT NULL, int_client TEXT NOT NULL, int_port INTEGER NOT NULL,
    proto INTEGER NOT NULL, remote_host TEXT NOT NULL, remote_port INTEGER NOT NULL,
    lease INTEGER NOT NULL, expires REAL NOT NULL, nonce BLOB
);
"""


class PinholeStore:
    """Writes and loads pinhole rows; ``expires`` is kept as wall-clock time on disk."""

    def __init__(self, db: sqlite3.Connection, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.db, self.clock, self.wall = db, clock, wall
        self.on_write: Callable[[], object] | None = None  # controld: its QuietTrim counts the writes
        self.db.executescript(_SCHEMA)
        if "nonce" not in {r[1] for r in self.db.execute("PRAGMA table_info(pinholes)")}:
            self.db.execute("ALTER TABLE pinholes ADD COLUMN nonce BLOB")  # tables from before PCP pinholes

    def _to_wall(self, expires: float) -> float:
        return expires - self.clock() + self.wall()

    def load(self) -> list[Pinhole]:
        """The rows still within their lease, on the core's clock; expired ones are deleted."""
        now_wall = self.wall()
        self.db.execute("DELETE FROM pinholes WHERE expires <= ?", (now_wall,))
        rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM pinholes ORDER BY uid").fetchall()
        offset = self.clock() - now_wall
        return [replace(p, expires=p.expires + offset) for p in
                (Pinhole(**dict(zip(_COLUMNS, r, strict=True))) for r in rows)]

    def save(self, p: Pinhole) -> None:
        values = [getattr(p, c) for c in _COLUMNS]
        values[_COLUMNS.index("expires")] = self._to_wall(p.expires)
        self.db.execute(f"INSERT OR REPLACE INTO pinholes ({', '.join(_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(_COLUMNS))})", values)
        self._wrote()

    def delete(self, uid: int) -> None:
        self.db.execute("DELETE FROM pinholes WHERE uid = ?", (uid,))
        self._wrote()

    def _wrote(self) -> None:
        if self.on_write is not None:
            self.on_write()
