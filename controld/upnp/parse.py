"""Numbers in untrusted text (HTTP headers, SOAP arguments, SSDP fields)."""

from __future__ import annotations


def ascii_uint(raw: str, max_digits: int = 10) -> int | None:
    """The value of a plain ASCII decimal, else None.

    ``str.isdigit`` alone also accepts digits like '²' that ``int`` refuses, and very long
    strings exceed Python's int conversion limit: both would raise deep inside a handler.
    """
    if not raw or len(raw) > max_digits or not raw.isascii() or not raw.isdigit():
        return None
    return int(raw)
