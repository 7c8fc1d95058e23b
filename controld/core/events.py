"""The store's change events: one per write, typed, numbered (docs/core.md, "Change events").

Every subscriber (GENA and SystemUpdateID today, the admin API's watch and LAN PCP
ANNOUNCE next) hears the same :class:`ChangeEvent` from
:meth:`controld.core.store.MappingTable.subscribe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from controld.core.lifecycle import LISTED
from controld.core.model import Mapping


class ChangeKind(str, Enum):
    """What a :class:`ChangeEvent` reports."""

    ADDED = "added"  # a new row
    CHANGED = "changed"  # a row's new version (state, grant, lease, ...)
    REMOVED = "removed"  # the row is gone
    ADDRESSES = "addresses"  # no row: an external address or the mode changed


# What a client can see of a listed mapping; a change elsewhere (renewal times, nonce) is not news to it.
SHOWN_FIELDS = ("remote_host", "ext_port", "proto", "int_client", "int_port", "description", "lease", "ext_ip")


@dataclass(frozen=True)
class ChangeEvent:
    """One write of the table, as every subscriber hears it (docs/core.md, "Change events").

    ``before``/``after`` are the row as it was and as it is now (None for an added row's
    before and a removed row's after, both None for ADDRESSES); ``seq`` counts the store's
    events from 1, so a subscriber sees a gap if it ever misses one; ``reason`` says why a
    row went ("lease expired", "host left", ...), "" when nothing more is known.
    """

    seq: int
    kind: ChangeKind
    before: Mapping | None = None
    after: Mapping | None = None
    reason: str = ""

    @property
    def mapping(self) -> Mapping | None:
        """The row concerned as it is now, or as it was if it went."""
        return self.after if self.after is not None else self.before

    @property
    def shown(self) -> bool:
        """Does a client listing the mappings (or reading its external address) see a difference?"""
        if self.kind == ChangeKind.ADDRESSES:
            return True
        was = self.before is not None and self.before.state in LISTED
        now = self.after is not None and self.after.state in LISTED
        if was != now:
            return True
        return was and any(getattr(self.before, f) != getattr(self.after, f) for f in SHOWN_FIELDS)
