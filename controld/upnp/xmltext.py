"""Text into XML element content."""

from __future__ import annotations


def escape(text: str) -> str:
    """``text`` with &, < and > as entities (what xml.sax.saxutils.escape does).

    Kept here because xml.sax.saxutils imports urllib.request, http.client and email:
    about 8 MB of RSS in controld for three str.replace calls.
    """
    return text.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")
