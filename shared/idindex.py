"""Two-level indexes of ids that are nearly always one id per key: controld's mappings by internal
tuple, natd's forwards by LAN endpoint.

``index[outer][port]`` holds the id itself, or a tuple of ids when several share the key (UPnP may
point several external ports at one LAN endpoint). A dict per outer key, keyed by the port's own
int, and no set or tuple per entry: a few hundred bytes less per mapping with 10,000 of them.
"""

from __future__ import annotations

from typing import Any, TypeVar

K = TypeVar("K")
Held = int | tuple[int, ...]
# What an absent outer key reads as, in every two-level index of both daemons (read, never
# written): ``index.get(outer, EMPTY)`` makes no dict per miss.
EMPTY: dict[Any, Any] = {}


def members(held: Held) -> tuple[int, ...]:
    """An entry as a tuple of ids."""
    return held if isinstance(held, tuple) else (held,)


def add(index: dict[K, dict[int, Held]], outer: K, port: int, ident: int) -> None:
    """Put ``ident`` (not in the entry yet) under ``outer``, ``port``."""
    ports = index.setdefault(outer, {})
    held = ports.get(port)
    ports[port] = ident if held is None else (*members(held), ident)


def discard(index: dict[K, dict[int, Held]], outer: K, port: int, ident: int) -> None:
    """Take ``ident`` out of the entry; an emptied entry, and an emptied outer dict, go too."""
    ports = index.get(outer)
    if ports is None:
        return
    rest = tuple(i for i in members(ports.get(port, ())) if i != ident)
    if len(rest) > 1:
        ports[port] = rest
    elif rest:
        ports[port] = rest[0]
    else:
        ports.pop(port, None)
        if not ports:
            del index[outer]


def lowest(index: dict[K, dict[int, Held]], outer: K, port: int) -> int | None:
    """The entry's oldest (lowest) id, or None."""
    held = index.get(outer, EMPTY).get(port)
    return None if held is None else min(members(held))
