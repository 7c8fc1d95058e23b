"""OpenWrt UCI config files (``/etc/config/igdpcp``): the tokenizer and parser.

The parser follows libuci's own tokenizer (what ``uci import`` accepts), so a
file that ``uci show`` reads is read the same way here; it needs only the
standard library because most OpenWrt feeds ship no python3-uci.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["ConfigError", "Section", "parse_uci", "load_uci"]

_NAME = re.compile(r"[A-Za-z0-9_]+")
_TYPE = re.compile(r"[!-~]+")  # libuci lets types hold '-', e.g. wifi-device
_BLANK = re.compile(r"(?:[ \t\r\f\v]|\\\n)+")  # backslash-newline joins lines
_PIECE = re.compile(r"""'([^']*)'|"((?:[^"\\]|\\.)*)"|\\(.?)|([^\s'"\\#;]+)""", re.S)
_ESCAPE = re.compile(r"\\(.)", re.S)
# libuci also accepts each keyword's first letter on its own.
_KEYWORDS = {w: k for k in ("package", "config", "option", "list") for w in (k, k[0])}


class ConfigError(Exception):
    """A config file that cannot be read or used; the message starts with ``FILE:LINE: ``."""


@dataclass
class Section:
    """One ``config TYPE ['NAME']`` block; ``lines`` maps each key to the line(s) that set it."""

    type: str
    name: str | None
    options: dict[str, str]
    lists: dict[str, list[str]]
    line: int
    lines: dict[str, list[int]] = field(default_factory=dict, repr=False, compare=False)


def err(filename: str, line: int, reason: str) -> ConfigError:
    return ConfigError(f"{filename}:{line}: {reason}")


def _tokenize(text: str, filename: str) -> list[tuple[int, list[str]]]:
    """Split text into statements (ended by newline or ';'), each as (line, words)."""
    stmts: list[tuple[int, list[str]]] = []
    words: list[str] = []
    i, line, start = 0, 1, 1
    while i < len(text):
        if m := _BLANK.match(text, i):
            line, i = line + m[0].count("\n"), m.end()
        elif text[i] in "\n;":
            if words:
                stmts.append((start, words))
                words = []
            line, i = line + (text[i] == "\n"), i + 1
        elif text[i] == "#":  # also ends a bare word mid-way, as in libuci
            i = j if (j := text.find("\n", i)) >= 0 else len(text)
        else:
            start = start if words else line
            buf: list[str] = []
            while m := _PIECE.match(text, i):
                single, double, escaped, bare = m.groups()
                if double is not None:
                    buf.append(_ESCAPE.sub(lambda e: "" if e[1] == "\n" else e[1], double))
                elif escaped is not None:  # an escaped newline continues the line
                    buf.append("" if escaped == "\n" else escaped)
                else:
                    buf.append(single if single is not None else bare)
                line, i = line + m[0].count("\n"), m.end()
            if i < len(text) and text[i] in "'\"":
                kind = "single" if text[i] == "'" else "double"
                raise err(filename, line, f"unterminated {kind} quote")
            words.append("".join(buf))
    if words:
        stmts.append((start, words))
    return stmts


def parse_uci(text: str, filename: str = "<config>") -> list[Section]:
    """Parse UCI config text into its sections, in file order.

    Named sections that repeat are merged into the first, as ``uci import``
    does; ``option`` overrides, ``list`` appends.  Raises ConfigError.
    """
    sections: list[Section] = []
    by_name: dict[str, Section] = {}
    cur: Section | None = None
    for line, words in _tokenize(text, filename):
        kw = _KEYWORDS.get(words[0])
        args = words[1:]
        if kw is None:
            raise err(filename, line, f"unknown keyword {words[0]!r} "
                                       "(expected package, config, option or list)")
        if kw == "package":
            if len(args) != 1:
                raise err(filename, line, "'package' takes exactly one name")
        elif kw == "config":
            cur = _section(args, line, filename, sections, by_name)
        else:
            _set_value(cur, kw, args, line, filename)
    return sections


def _section(args: list[str], line: int, filename: str, sections: list[Section],
             by_name: dict[str, Section]) -> Section:
    """``config TYPE [NAME]``: the section later options go to (a repeated name merges)."""
    if not args:
        raise err(filename, line, "missing section type after 'config'")
    if len(args) > 2:
        raise err(filename, line, f"extra word {args[2]!r} after section name")
    stype, name = args[0], (args[1] if len(args) == 2 and args[1] else None)
    if not _TYPE.fullmatch(stype):
        raise err(filename, line, f"invalid section type {stype!r}")
    if name is None:
        sections.append(cur := Section(stype, None, {}, {}, line))
        return cur
    if not _NAME.fullmatch(name):
        raise err(filename, line, f"invalid section name {name!r} (use letters, digits and _)")
    known = by_name.get(name)
    if known is None:
        known = by_name[name] = Section(stype, name, {}, {}, line)
        sections.append(known)
    elif known.type != stype:
        raise err(filename, line, f"section {name!r} redefined as {stype!r} "
                                  f"(was {known.type!r} at line {known.line})")
    return known


def _set_value(cur: Section | None, kw: str, args: list[str], line: int, filename: str) -> None:
    """``option KEY VALUE`` (replaces) or ``list KEY VALUE`` (appends) in the current section."""
    if not args:
        raise err(filename, line, f"missing name after '{kw}'")
    key = args[0]
    if not _NAME.fullmatch(key):
        raise err(filename, line, f"invalid {kw} name {key!r} (use letters, digits and _)")
    if len(args) < 2:
        raise err(filename, line, f"missing value for {kw} {key!r}")
    if len(args) > 2:
        raise err(filename, line, f"extra word {args[2]!r} after value of {kw} {key!r} "
                                   "(quote values that contain spaces)")
    if cur is None:
        raise err(filename, line, f"{kw} {key!r} before any 'config' section")
    if kw == "option":
        cur.lists.pop(key, None)
        cur.options[key] = args[1]
        cur.lines[key] = [line]
        return
    if key in cur.options:  # as in libuci, an option turns into the list's first entry
        cur.lists[key] = [cur.options.pop(key)]
    elif key not in cur.lists:
        cur.lines[key] = []
    cur.lists.setdefault(key, []).append(args[1])
    cur.lines[key].append(line)


def load_uci(path: str) -> list[Section]:
    """Read and parse the UCI file at ``path``; raises ConfigError if unreadable or invalid."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {getattr(e, 'strerror', None) or e}") from e
    return parse_uci(text, path)
