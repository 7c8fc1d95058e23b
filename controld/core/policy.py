"""Who may map what: permission rules, quotas, secure mode and manage rights, sans-I/O.

Checked once, inside the core (controld/core/service.py), for every front end; a
refusal is a :class:`controld.core.model.CoreError` that each front end maps to its
own code. Secure mode: a client maps only to itself (docs/requirements.md IWF-88).
Quotas: per requester and in total (IWF-90). Manage rights (``--manage-host``): who may
list and delete other clients' mappings.

Admin rights: the operator's own requests (the admin socket, and the page's admin after
login) run inside :func:`admin_rights`; there secure mode, ownership, the permission rules
and the per-host quota do not apply (the operator is root on the router), while the port
conflict and the total quota still do. A context variable carries it, so it reaches the
checks in the core without a flag on every call, and only the task that asked.

Permission rules use miniupnpd's allow/deny syntax.

One rule a line::

    allow|deny <eport>[-<eport>] <ip>[/<bits>|/<dotted mask>] <iport>[-<iport>] ["<regex>"]

The optional regex is matched case-insensitively against the mapping's description
(miniupnpd's ``--regex`` builds). Evaluation is first match wins. Difference from
miniupnpd, on purpose (safer): when rules are configured and none matches, the mapping
is refused; miniupnpd accepts it. With no rules at all every mapping is allowed (secure
mode and quotas still apply).
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from controld.core.model import CoreError, ErrorKind

MAX_RULES = 256
MAX_REGEX = 256

_ADMIN: contextvars.ContextVar[bool] = contextvars.ContextVar("igdpcp_admin_rights", default=False)


@contextlib.contextmanager
def admin_rights() -> Iterator[None]:
    """Run the enclosed core calls as the operator (see the module's docstring)."""
    token = _ADMIN.set(True)
    try:
        yield
    finally:
        _ADMIN.reset(token)


def is_admin() -> bool:
    """True inside :func:`admin_rights`."""
    return _ADMIN.get()


class RuleError(ValueError):
    """A rule line that cannot be parsed; the message names the line."""


@dataclass(frozen=True)
class Rule:
    allow: bool
    eport: tuple[int, int]
    net: ipaddress.IPv4Network
    iport: tuple[int, int]
    regex: re.Pattern[str] | None = None

    def matches(self, eport: int, client: str, iport: int, description: str) -> bool:
        """Does this rule cover the mapping (external port, internal client, port, description)?"""
        if not (self.eport[0] <= eport <= self.eport[1] and self.iport[0] <= iport <= self.iport[1]):
            return False
        try:
            if ipaddress.IPv4Address(client) not in self.net:
                return False
        except ValueError:
            return False
        return self.regex is None or self.regex.search(description) is not None

    def __str__(self) -> str:
        def rng(r: tuple[int, int]) -> str:
            return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"
        tail = f' "{self.regex.pattern}"' if self.regex else ""
        return f"{'allow' if self.allow else 'deny'} {rng(self.eport)} {self.net} {rng(self.iport)}{tail}"


def _ports(text: str, line: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise RuleError(f"bad port range {text!r} in {line!r}")
    a, b = int(lo), int(hi) if sep else int(lo)
    if not 0 <= a <= b <= 65535:
        raise RuleError(f"port range {text!r} out of 0-65535 or reversed in {line!r}")
    return a, b


def _network(text: str, line: str) -> ipaddress.IPv4Network:
    addr, sep, mask = text.partition("/")
    try:
        if not sep:
            return ipaddress.IPv4Network(f"{addr}/32")
        bits = mask if mask.isdigit() else str(ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen)
        # strict=False: miniupnpd masks the address, so 192.168.1.5/24 means 192.168.1.0/24
        return ipaddress.IPv4Network(f"{addr}/{bits}", strict=False)
    except ValueError:
        raise RuleError(f"bad address/mask {text!r} in {line!r}") from None


def parse_rule(line: str) -> Rule:
    """One rule from its text; raises :class:`RuleError`."""
    text = line.strip()
    regex: re.Pattern[str] | None = None
    q = text.find('"')
    if q >= 0:
        if not text.endswith('"') or q == len(text) - 1:
            raise RuleError(f"unterminated regex in {line!r}")
        pattern = text[q + 1:-1]
        if len(pattern) > MAX_REGEX:
            raise RuleError(f"regex longer than {MAX_REGEX} characters in {line!r}")
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise RuleError(f"bad regex in {line!r}: {exc}") from None
        text = text[:q].strip()
    words = text.split()
    if len(words) != 4 or words[0].lower() not in ("allow", "deny"):
        raise RuleError(f"expected 'allow|deny EPORT[-EPORT] IP[/MASK] IPORT[-IPORT]', got {line!r}")
    return Rule(words[0].lower() == "allow", _ports(words[1], line), _network(words[2], line),
                _ports(words[3], line), regex)


@dataclass(frozen=True)
class Permissions:
    """An ordered rule list; first match wins."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def parse(cls, lines: list[str]) -> Permissions:
        """Rules from config lines (blank lines and '#' comments skipped); raises RuleError."""
        rules = [parse_rule(x) for x in lines if x.strip() and not x.strip().startswith("#")]
        if len(rules) > MAX_RULES:
            raise RuleError(f"more than {MAX_RULES} permission rules")
        return cls(tuple(rules))

    def allowed(self, eport: int, client: str, iport: int, description: str = "") -> bool:
        """True when the first matching rule allows; no rules: True; rules but no match: False."""
        if not self.rules:
            return True
        for r in self.rules:
            if r.matches(eport, client, iport, description):
                return r.allow
        return False

    def nearest_allowed(self, eport: int, client: str, iport: int, description: str = "",
                        lo: int = 1024) -> int | None:
        """The allowed external port closest to ``eport`` (ties go up) for AddAnyPortMapping,
        like miniupnpd's bitmap search; None if no port is allowed.

        The decision can only change at a rule's port-range edge, so it is evaluated once per
        segment between edges: O(rules^2), never a walk over 64k ports per request.
        """
        if self.allowed(eport, client, iport, description) and eport:
            return eport
        start = eport if eport >= lo else lo
        edges = {lo, 65536}
        for r in self.rules:
            edges.update(e for e in (r.eport[0], r.eport[1] + 1) if lo < e < 65536)
        bounds = sorted(edges)
        best: int | None = None
        for a, b in zip(bounds, bounds[1:], strict=False):  # segment [a, b): one decision for all its ports
            if not self.allowed(a, client, iport, description):
                continue
            p = min(max(start, a), b - 1)  # the segment's port nearest to start
            if best is None or (abs(p - start), p < start) < (abs(best - start), best < start):
                best = p
        return best


@dataclass
class Policy:
    """Every limit a request meets before anything is sent, from the config (controld/main.py)."""

    permissions: Permissions = field(default_factory=Permissions)
    max_per_host: int = 256  # 0: unlimited
    max_total: int = 4096  # 0: unlimited
    manage_hosts: tuple[ipaddress.IPv4Network, ...] = ()  # may act on others' mappings
    secure_mode: bool = True  # the internal client must be the requester (IWF-88)

    def may_manage(self, client: str) -> bool:
        """Is ``client`` allowed to manage (list/delete) other clients' mappings?"""
        try:
            a = ipaddress.IPv4Address(client)
        except ValueError:
            return False
        return any(a in n for n in self.manage_hosts)

    def check_client(self, requester: str, int_client: str) -> None:
        """Secure mode: one maps only to oneself (IWF-88)."""
        if self.secure_mode and not is_admin() and int_client != requester:
            raise CoreError(ErrorKind.NOT_AUTHORIZED, "the internal client must be the requester's own "
                                                      "address (docs/requirements.md IWF-88)")

    def may_touch(self, requester: str, owner: str, int_client: str) -> bool:
        """May ``requester`` act on a mapping of ``owner`` for ``int_client``? Always without secure mode."""
        return not self.secure_mode or requester in (owner, int_client) or is_admin()

    def check_rules(self, eport: int, client: str, iport: int, description: str) -> None:
        """DENIED unless the permission rules allow exactly this mapping."""
        if not is_admin() and not self.permissions.allowed(eport, client, iport, description):
            raise CoreError(ErrorKind.DENIED, f"permission rules refuse {eport} -> {client}:{iport}")

    def nearest_port(self, eport: int, client: str, iport: int, description: str) -> int:
        """The allowed external port nearest ``eport`` for an any-port request; DENIED if none."""
        wanted = self.permissions.nearest_allowed(eport, client, iport, description)
        if wanted is None:
            raise CoreError(ErrorKind.DENIED, f"permission rules allow no external port for {client}:{iport}")
        return wanted

    def check_quota(self, requester: str, total: int, mine: int) -> None:
        """QUOTA when the requester (holding ``mine``) or the router (``total``) is at its limit (IWF-90)."""
        if self.max_total and total >= self.max_total:
            raise CoreError(ErrorKind.QUOTA, f"the router holds its maximum of {self.max_total} mappings")
        if self.max_per_host and mine >= self.max_per_host and not is_admin():
            raise CoreError(ErrorKind.QUOTA, f"{requester} holds its maximum of {self.max_per_host} mappings")
