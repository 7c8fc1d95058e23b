"""OpenWrt UCI config files (``/etc/config/igdpcp``) as defaults for argparse.

The parser follows libuci's own tokenizer (what ``uci import`` accepts), so a
file that ``uci show`` reads is read the same way here; it needs only the
standard library because most OpenWrt feeds ship no python3-uci.
"""
from __future__ import annotations

import argparse
import difflib
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConfigError", "Section", "parse_uci", "load_uci", "parse_args_with_config"]

_NAME = re.compile(r"[A-Za-z0-9_]+")
_TYPE = re.compile(r"[!-~]+")  # libuci lets types hold '-', e.g. wifi-device
_BLANK = re.compile(r"(?:[ \t\r\f\v]|\\\n)+")  # backslash-newline joins lines
_PIECE = re.compile(r"""'([^']*)'|"((?:[^"\\]|\\.)*)"|\\(.?)|([^\s'"\\#;]+)""", re.S)
_ESCAPE = re.compile(r"\\(.)", re.S)
# libuci also accepts each keyword's first letter on its own.
_KEYWORDS = {w: k for k in ("package", "config", "option", "list") for w in (k, k[0])}
_BOOLS = {"1": True, "yes": True, "on": True, "true": True, "enabled": True,
          "0": False, "no": False, "off": False, "false": False, "disabled": False}


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


def _err(filename: str, line: int, reason: str) -> ConfigError:
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
                raise _err(filename, line, f"unterminated {kind} quote")
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
            raise _err(filename, line, f"unknown keyword {words[0]!r} "
                                       "(expected package, config, option or list)")
        if kw == "package":
            if len(args) != 1:
                raise _err(filename, line, "'package' takes exactly one name")
            continue
        if kw == "config":
            if not args:
                raise _err(filename, line, "missing section type after 'config'")
            if len(args) > 2:
                raise _err(filename, line, f"extra word {args[2]!r} after section name")
            stype, name = args[0], (args[1] if len(args) == 2 and args[1] else None)
            if not _TYPE.fullmatch(stype):
                raise _err(filename, line, f"invalid section type {stype!r}")
            if name is None:
                sections.append(cur := Section(stype, None, {}, {}, line))
            elif not _NAME.fullmatch(name):
                raise _err(filename, line, f"invalid section name {name!r} "
                                           "(use letters, digits and _)")
            elif (cur := by_name.get(name)) is None:
                cur = by_name[name] = Section(stype, name, {}, {}, line)
                sections.append(cur)
            elif cur.type != stype:
                raise _err(filename, line, f"section {name!r} redefined as {stype!r} "
                                           f"(was {cur.type!r} at line {cur.line})")
            continue
        if not args:
            raise _err(filename, line, f"missing name after '{kw}'")
        key = args[0]
        if not _NAME.fullmatch(key):
            raise _err(filename, line, f"invalid {kw} name {key!r} (use letters, digits and _)")
        if len(args) < 2:
            raise _err(filename, line, f"missing value for {kw} {key!r}")
        if len(args) > 2:
            raise _err(filename, line, f"extra word {args[2]!r} after value of {kw} {key!r} "
                                       "(quote values that contain spaces)")
        if cur is None:
            raise _err(filename, line, f"{kw} {key!r} before any 'config' section")
        if kw == "option":
            cur.lists.pop(key, None)
            cur.options[key] = args[1]
            cur.lines[key] = [line]
        else:
            if key in cur.options:  # as in libuci, an option turns into the list's first entry
                cur.lists[key] = [cur.options.pop(key)]
            elif key not in cur.lists:
                cur.lines[key] = []
            cur.lists.setdefault(key, []).append(args[1])
            cur.lines[key].append(line)
    return sections


def load_uci(path: str) -> list[Section]:
    """Read and parse the UCI file at ``path``; raises ConfigError if unreadable or invalid."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {getattr(e, 'strerror', None) or e}")
    return parse_uci(text, path)


def _config_value(action: argparse.Action, key: str, raw: list[str], lines: list[int],
                  is_list: bool, filename: str) -> Any:
    """Turn the file's raw strings for one key into the value the parser would store."""
    def conv(s: str, line: int) -> Any:
        try:
            v = action.type(s) if action.type is not None else s
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise _err(filename, line, f"invalid value {s!r} for {key!r}: {e}") from None
        if action.choices is not None and v not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            raise _err(filename, line, f"invalid value {s!r} for {key!r} (choose from {choices})")
        return v

    # argparse exposes no public way to ask an action what it does; these classes are stable.
    if isinstance(action, argparse._AppendAction):  # extend too: it subclasses append
        return [conv(s, ln) for s, ln in zip(raw, lines)]
    if isinstance(action, argparse._AppendConstAction):
        raise _err(filename, lines[0], f"{key!r} cannot be set from a config file")
    if isinstance(action, argparse._CountAction):
        if is_list:
            raise _err(filename, lines[0], f"{key!r} takes one value; use 'option', not 'list'")
        try:
            return int(raw[0])
        except ValueError:
            raise _err(filename, lines[0], f"invalid count {raw[0]!r} for {key!r}") from None
    if action.nargs in ("*", "+") or isinstance(action.nargs, int) and action.nargs > 0:
        values = [conv(s, ln) for s, ln in zip(raw, lines)]
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise _err(filename, lines[0], f"{key!r} needs exactly {action.nargs} values")
        return values
    if is_list:
        raise _err(filename, lines[0], f"{key!r} takes one value; use 'option', not 'list'")
    if action.nargs == 0:  # store_true/store_false/store_const and BooleanOptionalAction
        b = _BOOLS.get(raw[0].lower())
        if b is None:
            raise _err(filename, lines[0], f"invalid boolean {raw[0]!r} for {key!r} "
                                           "(use 1/0, yes/no, on/off, true/false, enabled/disabled)")
        if isinstance(action, argparse.BooleanOptionalAction):
            return b
        return action.const if b else action.default
    return conv(raw[0], lines[0])


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                           section_type: str) -> argparse.Namespace:
    """Parse ``argv`` with values from the ``--config`` UCI file as defaults.

    The first section of type ``section_type`` supplies values: UCI key
    ``wan_if`` sets flag ``--wan-if``.  Command-line flags win over the file
    (an append flag given on the command line replaces the file's list), and
    a ``required`` flag may be satisfied by the file alone.  Keys naming no
    flag, bad values and unreadable files are a ConfigError: like any argument
    error it ends the program with one line ``PROG: error: FILE:LINE: reason``
    and exit code 2, unless the parser has ``exit_on_error=False``, which
    makes it raise instead.
    """
    try:
        return _parse_args_with_config(parser, argv, section_type)
    except ConfigError as e:
        if not parser.exit_on_error:
            raise
        parser.exit(2, f"{parser.prog}: error: {e}\n")  # a daemon says why, without a traceback


def _parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                            section_type: str) -> argparse.Namespace:
    cfg = next((a for a in parser._actions if "--config" in a.option_strings), None)
    if cfg is None:
        cfg = parser.add_argument("--config", metavar="PATH", help="UCI config file to read")
    pre = argparse.ArgumentParser(add_help=False, prefix_chars=parser.prefix_chars,
                                  allow_abbrev=parser.allow_abbrev, exit_on_error=False)
    pre.add_argument(*cfg.option_strings, dest="config", default=cfg.default)
    try:
        path = pre.parse_known_args(argv)[0].config
    except argparse.ArgumentError:  # e.g. a bare --config: let the real parser say so
        path = None
    if not path:
        return parser.parse_args(argv)

    section = next((s for s in load_uci(path) if s.type == section_type), None)
    by_key: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a is cfg or not a.option_strings or isinstance(a, (argparse._HelpAction,
                                                               argparse._VersionAction)):
            continue
        for s in a.option_strings:
            if s.startswith("--") and not (isinstance(a, argparse.BooleanOptionalAction)
                                           and s.startswith("--no-")):
                by_key.setdefault(s[2:].replace("-", "_"), a)
        if not any(s.startswith("--") for s in a.option_strings):  # short-only flags go by dest
            by_key.setdefault(a.dest, a)

    values: dict[str, Any] = {}
    for key, raw in ([*section.options.items(), *section.lists.items()] if section else []):
        lines = section.lines.get(key) or [section.line]
        action = by_key.get(key)
        if action is None:
            hint = difflib.get_close_matches(key, by_key, n=1)
            raise _err(path, lines[0], f"unknown option {key!r} in section {section_type}"
                                       + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        is_list = isinstance(raw, list)
        values[action.dest] = _config_value(action, key, raw if is_list else [raw], lines,
                                            is_list, path)

    # Accumulating actions build on the default, so they get None and the file's
    # list is filled in afterwards only if the command line gave none; the rest
    # get a marker, so a value typed on the command line is never overwritten.
    accum = (argparse._AppendAction, argparse._CountAction)
    markers = {a.dest: (None if isinstance(a, accum) else object())
               for a in parser._actions if a.dest in values}
    saved = [(a, a.default, a.required) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for a in parser._actions:
            if a.dest in values:
                a.required = False
        parser.set_defaults(**markers)
        ns = parser.parse_args(argv)
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required
        parser._defaults.clear()
        parser._defaults.update(saved_defaults)
    for dest, marker in markers.items():
        if getattr(ns, dest, marker) is marker:
            setattr(ns, dest, values[dest])
    return ns
