"""The LAN web page as a pure request handler: (request, now) -> response, no sockets.

The UPnP HTTP server routes the presentationURL's paths (``WebConfig.prefix``) here.
A LAN host sees and manages its own forwards (to its own address only); with the admin
password (UCI ``web_password_hash``, controld/web/auth.py; unset = no admin login) it
sees and manages all. Every change goes through the same AdminBackend as the admin
socket, so the core's policy and quotas apply. Safety: Host must be an IP literal (DNS
rebinding, as for SOAP); every POST needs the session's CSRF token and, when the
browser sends one, an Origin naming this host; cookies are HttpOnly SameSite=Strict and
bound to the client address; sessions expire; login attempts are rate-limited.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from controld.adminapi.backend import (
    AddRequest,
    AdminBackend,
    BackendError,
    ErrorKind,
    MappingView,
    Origin,
    Requester,
    Status,
)
from controld.web import auth
from shared.const import PRODUCT, PROTO_NUMBERS

log = logging.getLogger("controld.web")

COOKIE = "igdpcp_sid"
MAX_BODY = 8192
MAX_SESSIONS = 256
MAX_SESSIONS_PER_CLIENT = 8  # so one host flooding the page cannot push others' sessions out
MAX_LOGIN_FAILURES = 5  # per client address within LOGIN_WINDOW_S, then LOGIN_WINDOW_S of refusal
LOGIN_WINDOW_S = 300.0
LIFETIMES = (("3600", "1 hour"), ("86400", "1 day"), ("604800", "7 days"))  # a LAN host's choices
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = [
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),  # no-referrer would make browsers send "Origin: null"
]
# How a refused operation is answered.
ERROR_STATUS = {ErrorKind.INVALID: 400, ErrorKind.NOT_FOUND: 404, ErrorKind.CONFLICT: 409, ErrorKind.DENIED: 403,
                ErrorKind.QUOTA: 403, ErrorKind.UPSTREAM: 502, ErrorKind.UNAVAILABLE: 503}


@dataclass(frozen=True)
class HttpRequest:
    """What the HTTP server read; header names in lower case."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    client: str  # the peer's address (the LAN host)
    now: float  # monotonic seconds


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class WebConfig:
    """The page's settings (UCI section controld)."""

    prefix: str = "/igdpcp"  # the presentationURL path
    password_hash: str = ""  # web_password_hash; empty = admin functions off
    session_ttl: float = 3600.0  # idle seconds before a LAN host's session ends
    admin_ttl: float = 900.0  # idle seconds before an admin session ends


@dataclass
class Session:
    sid: str
    csrf: str
    client: str
    admin: bool
    expires: float
    flash: tuple[str, str] | None = None  # (ok|error, text) shown once on the next page


@dataclass
class _Ctx:
    req: HttpRequest
    session: Session
    new_cookie: bool = False
    form: dict[str, str] = field(default_factory=dict)

    @property
    def who(self) -> Requester:
        s = self.session
        return Requester(Origin.OPERATOR if s.admin else Origin.WEB, s.client, admin=s.admin)


class Refused(Exception):
    """A request answered with an error page and nothing done."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def host_is_ip_literal(host: str | None) -> bool:
    """True for '192.168.1.1', '192.168.1.1:5000', '[fe80::1]:80' (DNS rebinding guard)."""
    if not host:
        return False
    if host.startswith("["):
        addr, _, rest = host[1:].partition("]")
        if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
            return False
        candidate = addr
    else:
        candidate, _, port = host.partition(":")
        if port and not (port.isdigit() and len(port) <= 5):
            return False
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return candidate.isascii()


def _static(name: str) -> bytes:
    import importlib.resources  # the page is rarely opened: not in every controld's memory

    return (importlib.resources.files("controld.web") / "static" / name).read_bytes()


def _e(value: object) -> str:
    import html  # imported once the page is first rendered (html.entities is a large table)

    return html.escape(str(value), quote=True)


def _token() -> str:
    """A session id or CSRF token: 128 random bits, as secrets.token_hex(16) (without importing
    secrets, whose hmac/hashlib load OpenSSL into every controld)."""
    return os.urandom(16).hex()


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "permanent"
    s = max(0, seconds)
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{s % size // subsize:02d}{sub}"
    return f"{s}s"


class WebApp:
    """The page for one controld: sessions in memory, everything else in the core."""

    def __init__(self, backend: AdminBackend, config: WebConfig,
                 token: Callable[[], str] = _token) -> None:
        self.backend = backend
        self.config = config
        self.token = token
        self.sessions: dict[str, Session] = {}
        self.failures: dict[str, list[float]] = {}  # client -> times of failed logins
        self.static: dict[str, bytes] = {}  # read at its first request
        p = config.prefix.rstrip("/")
        Route = Callable[[_Ctx], Awaitable[HttpResponse]]
        self.routes: dict[tuple[str, str], Route] = {
            ("GET", p + "/"): self._status_page,
            ("GET", p + "/mappings"): self._mappings_page,
            ("POST", p + "/add"): self._add,
            ("POST", p + "/delete"): self._delete,
            ("GET", p + "/login"): self._login_page,
            ("POST", p + "/login"): self._login,
            ("POST", p + "/logout"): self._logout,
        }

    @property
    def admin_enabled(self) -> bool:
        return auth.parse_hash(self.config.password_hash) is not None

    # ------------------------------------------------------------ dispatch

    def _static_file(self, name: str) -> bytes:
        data = self.static.get(name)
        if data is None:
            data = self.static[name] = _static(name)
        return data

    async def handle(self, req: HttpRequest) -> HttpResponse:
        """Answer one request; never raises for anything a client sends."""
        try:
            return await self._dispatch(req)
        except Refused as exc:
            return self._page_plain(exc.status, exc.text)

    async def _dispatch(self, req: HttpRequest) -> HttpResponse:
        if not host_is_ip_literal(req.headers.get("host")):
            raise Refused(403, "Use the router's address, not a name, to open this page.")
        path = urlsplit(req.target).path
        p = self.config.prefix.rstrip("/")
        if path == p:
            return HttpResponse(301, [("Location", p + "/"), *SECURITY_HEADERS], b"")
        if req.method == "GET" and path.startswith(p + "/static/") and path[len(p) + 8:] in STATIC:
            name = path[len(p) + 8:]
            return HttpResponse(200, [("Content-Type", STATIC[name]), ("Cache-Control", "max-age=3600"),
                                      ("X-Content-Type-Options", "nosniff")], self._static_file(name))
        route = self.routes.get((req.method, path))
        if route is None:
            if any(k[1] == path for k in self.routes):
                raise Refused(405, "Method not allowed.")
            raise Refused(404, "No such page.")
        ctx = self._session(req)
        if req.method == "POST":
            self._check_post(ctx)
        return await route(ctx)

    def _session(self, req: HttpRequest) -> _Ctx:
        """The request's session, or a new one (its cookie is set on the answer)."""
        self._expire(req.now)
        sid = _cookie(req.headers.get("cookie", ""), COOKIE)
        s = self.sessions.get(sid) if sid else None
        if s is not None and s.client == req.client:
            s.expires = req.now + (self.config.admin_ttl if s.admin else self.config.session_ttl)
            return _Ctx(req, s)
        if req.method == "POST":
            raise Refused(403, "Your session has expired: open the page again.")
        return _Ctx(req, self._new_session(req.client, False, req.now), new_cookie=True)

    def _new_session(self, client: str, admin: bool, now: float) -> Session:
        # Bounded: the session closest to expiry goes, the client's own first.
        own = [x for x in self.sessions.values() if x.client == client]
        pool = own if len(own) >= MAX_SESSIONS_PER_CLIENT else \
            list(self.sessions.values()) if len(self.sessions) >= MAX_SESSIONS else []
        if pool:
            del self.sessions[min(pool, key=lambda x: x.expires).sid]
        ttl = self.config.admin_ttl if admin else self.config.session_ttl
        s = Session(self.token(), self.token(), client, admin, now + ttl)
        self.sessions[s.sid] = s
        return s

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, s in self.sessions.items() if s.expires <= now]:
            del self.sessions[sid]

    def _check_post(self, ctx: _Ctx) -> None:
        req = ctx.req
        origin = req.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != req.headers.get("host"):
            raise Refused(403, "Refused: the form came from another site.")
        if "application/x-www-form-urlencoded" not in req.headers.get("content-type", ""):
            raise Refused(415, "Expected a form.")
        if len(req.body) > MAX_BODY:
            raise Refused(413, "Form too large.")
        try:
            fields = parse_qs(req.body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                              max_num_fields=16)
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "Malformed form.") from None
        ctx.form = {k: v[0] for k, v in fields.items()}
        from hmac import compare_digest  # here, not at start: hmac imports hashlib (OpenSSL)

        if not compare_digest(ctx.form.get("csrf", ""), ctx.session.csrf):
            raise Refused(403, "Refused: the form's security token is missing or stale. Reload the page.")

    # ------------------------------------------------------------ actions

    async def _add(self, ctx: _Ctx) -> HttpResponse:
        f, s = ctx.form, ctx.session
        try:
            proto = f.get("proto", "").upper()
            if proto not in PROTO_NUMBERS:
                raise ValueError("protocol must be TCP or UDP")
            ext_port, int_port = _port(f.get("ext_port", ""), "external"), _port(f.get("int_port", ""), "internal")
            int_ip = f.get("int_ip") or s.client
            lifetime = int(f.get("lifetime", LIFETIMES[0][0]))
            if not s.admin and str(lifetime) not in dict(LIFETIMES):
                raise ValueError("choose one of the offered lifetimes")
            if not 0 <= lifetime < 2**32:
                raise ValueError("lifetime out of range")
            description = f.get("description", "")[:64]
            if not description.isprintable():
                raise ValueError("description must be plain text")
        except ValueError as exc:
            return await self._mappings_page(ctx, ("error", f"Not added: {exc}."), 400)
        if not s.admin and int_ip != s.client:
            return await self._mappings_page(ctx, ("error", f"Not added: this page forwards only to your own "
                                                            f"address {s.client}."), 403)
        try:
            m = await self.backend.add(AddRequest(proto, ext_port, int_ip, int_port, description, lifetime), ctx.who)
        except BackendError as exc:
            return await self._mappings_page(ctx, ("error", f"Not added: {exc.message}."),
                                             ERROR_STATUS.get(exc.kind, 500))
        log.info("web: %s added mapping %d %s %s:%d -> %s:%d", s.client, m.id, m.proto, m.ext_ip or "?",
                 m.ext_port, m.int_ip, m.int_port)
        s.flash = ("ok", f"Added: {m.proto} {m.ext_ip or ''}:{m.ext_port} to {m.int_ip}:{m.int_port}.")
        return self._redirect(ctx, "/mappings")

    async def _delete(self, ctx: _Ctx) -> HttpResponse:
        raw = ctx.form.get("id", "")
        if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
            return await self._mappings_page(ctx, ("error", "Not deleted: no such forward."), 400)
        try:
            m = await self.backend.delete(int(raw), ctx.who)
        except BackendError as exc:
            return await self._mappings_page(ctx, ("error", f"Not deleted: {exc.message}."),
                                             ERROR_STATUS.get(exc.kind, 500))
        log.info("web: %s deleted mapping %d %s %d", ctx.session.client, m.id, m.proto, m.ext_port)
        ctx.session.flash = ("ok", f"Deleted: {m.proto} {m.ext_port}.")
        return self._redirect(ctx, "/mappings")

    async def _login(self, ctx: _Ctx) -> HttpResponse:
        req, client = ctx.req, ctx.req.client
        if not self.admin_enabled:
            return await self._login_page(ctx, ("error", "Admin login is off: no password is set."), 403)
        recent = [t for t in self.failures.get(client, []) if t > req.now - LOGIN_WINDOW_S]
        if len(recent) >= MAX_LOGIN_FAILURES:
            return await self._login_page(ctx, ("error", "Too many failed attempts: wait a few minutes."), 429)
        if not auth.verify(ctx.form.get("password", ""), self.config.password_hash):
            if len(self.failures) >= MAX_SESSIONS and client not in self.failures:
                self.failures.pop(next(iter(self.failures)))
            self.failures[client] = [*recent, req.now]
            log.warning("web: failed admin login from %s", client)
            return await self._login_page(ctx, ("error", "Wrong password."), 403)
        self.failures.pop(client, None)
        del self.sessions[ctx.session.sid]  # a fresh id after login (session fixation)
        ctx.session = self._new_session(client, True, req.now)
        ctx.new_cookie = True
        ctx.session.flash = ("ok", "Logged in as admin.")
        log.info("web: admin login from %s", client)
        return self._redirect(ctx, "/mappings")

    async def _logout(self, ctx: _Ctx) -> HttpResponse:
        del self.sessions[ctx.session.sid]
        ctx.session = self._new_session(ctx.req.client, False, ctx.req.now)
        ctx.new_cookie = True
        ctx.session.flash = ("ok", "Logged out.")
        return self._redirect(ctx, "/")

    # ------------------------------------------------------------ pages

    def _visible(self, ctx: _Ctx, mappings: list[MappingView]) -> list[MappingView]:
        s = ctx.session
        return mappings if s.admin else [m for m in mappings if s.client in (m.int_ip, m.owner)]

    async def _status_page(self, ctx: _Ctx) -> HttpResponse:
        try:
            st = await self.backend.status()
            mine = self._visible(ctx, await self.backend.list())
        except BackendError as exc:
            return self._page(ctx, "Status", f"<section><p>controld cannot answer: {_e(exc.message)}</p></section>",
                              503)
        return self._page(ctx, "Status", self._status_html(ctx, st, mine))

    def _status_html(self, ctx: _Ctx, st: Status, mine: list[MappingView]) -> str:
        s = ctx.session
        facts = [("Your address", s.client), ("Internet address", st.ext_ip or "unknown"),
                 ("Mode", st.mode), ("Your forwards", str(len(mine)) if not s.admin else str(len(mine)) + " (all)"),
                 ("Secure mode", "on: a host forwards only to itself" if st.secure_mode else "off")]
        if s.admin:
            c = st.counters
            pcp = st.pcp_server or "none"
            if st.pcp_server and st.pcp_epoch is not None:
                pcp += f", epoch {st.pcp_epoch}"
            facts += [("WAN address", st.wan_ip or "-"), ("PCP server", pcp),
                      ("Mappings by origin", ", ".join(f"{k} {v}" for k, v in sorted(st.mappings.items())) or "none"),
                      ("Requests", ", ".join(f"{k} {v}" for k, v in sorted(c.requests.items())) or "none"),
                      ("Errors", ", ".join(f"{o} {code}×{n}" for o, codes in sorted(c.errors.items())
                                           for code, n in sorted(codes.items())) or "none"),
                      ("PCP RTT p50", f"{c.pcp_rtt_p50_ms:.1f} ms" if c.pcp_rtt_p50_ms is not None else "-"),
                      ("Renewals / re-syncs / natd restarts", f"{c.renewals} / {c.resyncs} / {c.natd_restarts}"),
                      ("Version", st.version)]
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
        return (f'<section><h2>Router</h2><table class="facts" id="status">{rows}</table></section>'
                f'<p><a href="{_e(self.config.prefix.rstrip("/"))}/mappings">Port forwards →</a></p>')

    async def _mappings_page(self, ctx: _Ctx, flash: tuple[str, str] | None = None,
                             status: int = 200) -> HttpResponse:
        try:
            shown = self._visible(ctx, await self.backend.list())
        except BackendError as exc:
            return self._page(ctx, "Port forwards",
                              f"<section><p>controld cannot answer: {_e(exc.message)}</p></section>", 503)
        return self._page(ctx, "Port forwards", self._table_html(ctx, shown) + self._form_html(ctx), status, flash)

    def _table_html(self, ctx: _Ctx, shown: list[MappingView]) -> str:
        p = _e(self.config.prefix.rstrip("/"))
        token = _e(ctx.session.csrf)
        who = "All forwards" if ctx.session.admin else f"Forwards to {ctx.session.client}"
        if not shown:
            return f'<section><h2>{_e(who)}</h2><p class="muted" id="empty">None yet.</p></section>'
        head = "".join(f"<th>{h}</th>" for h in ("Internet side", "Protocol", "To (LAN)", "Made by", "Description",
                                                 "Time left", "State", ""))
        rows = []
        for m in shown:
            left = (f'<td class="num" data-remaining="{m.remaining}">{_e(_duration(m.remaining))}</td>'
                    if m.remaining is not None else '<td class="num">permanent</td>')
            what = f"{m.proto} {m.ext_port}"
            rows.append(
                f'<tr data-id="{m.id}"><td>{_e(m.ext_ip or "?")}:{m.ext_port}</td><td>{_e(m.proto)}</td>'
                f"<td>{_e(m.int_ip)}:{m.int_port}</td><td>{_e(m.origin.value)} ({_e(m.owner)})</td>"
                f"<td>{_e(m.description)}</td>{left}<td>{_e(m.state)}</td>"
                f'<td><form class="delete" method="post" action="{p}/delete" data-what="{_e(what)}">'
                f'<input type="hidden" name="csrf" value="{token}"><input type="hidden" name="id" value="{m.id}">'
                f'<button class="danger" type="submit">Delete</button></form></td></tr>')
        return (f'<section><h2>{_e(who)}</h2><table id="mappings"><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table></section>')

    def _form_html(self, ctx: _Ctx) -> str:
        s, p = ctx.session, _e(self.config.prefix.rstrip("/"))
        lifetimes = list(LIFETIMES) + ([("0", "permanent")] if s.admin else [])
        opts = "".join(f'<option value="{v}">{t}</option>' for v, t in lifetimes)
        # Only the admin picks the LAN address; a LAN host's forwards go to itself.
        target = ('<label>To LAN address<input name="int_ip" required inputmode="decimal" '
                  f'value="{_e(s.client)}"></label>') if s.admin else ""
        note = "" if s.admin else f'<p class="muted">Forwards go to this device: {_e(s.client)}</p>'
        return (f'<section><h2>Add a forward</h2>{note}'
                f'<form class="add" id="add" method="post" action="{p}/add">'
                f'<input type="hidden" name="csrf" value="{_e(s.csrf)}">'
                '<label>Protocol<select name="proto"><option>TCP</option><option>UDP</option></select></label>'
                '<label>Internet port<input name="ext_port" type="number" min="1" max="65535" required></label>'
                f'{target}'
                '<label>To port<input name="int_port" type="number" min="1" max="65535" required></label>'
                '<label>Description<input name="description" maxlength="64"></label>'
                f'<label>For<select name="lifetime">{opts}</select></label>'
                '<button class="primary" type="submit">Add</button></form></section>')

    async def _login_page(self, ctx: _Ctx, flash: tuple[str, str] | None = None, status: int = 200) -> HttpResponse:
        if not self.admin_enabled:
            body = ('<section><h2>Admin</h2><p>Admin login is off: no password is set '
                    '(<code>igdpcp hash-password</code>, then UCI <code>web_password_hash</code>).</p></section>')
        else:
            p = _e(self.config.prefix.rstrip("/"))
            body = (f'<section><h2>Admin login</h2><form method="post" action="{p}/login" id="login">'
                    f'<input type="hidden" name="csrf" value="{_e(ctx.session.csrf)}">'
                    '<label>Password <input type="password" name="password" autocomplete="current-password" '
                    'required></label> <button class="primary" type="submit">Log in</button></form></section>')
        return self._page(ctx, "Admin login", body, status, flash)

    # ------------------------------------------------------------ rendering

    def _page(self, ctx: _Ctx, title: str, body: str, status: int = 200,
              flash: tuple[str, str] | None = None) -> HttpResponse:
        s, p = ctx.session, _e(self.config.prefix.rstrip("/"))
        flash = flash or s.flash
        s.flash = None
        note = f'<div class="flash {flash[0]}" id="flash" role="status">{_e(flash[1])}</div>' if flash else ""
        if s.admin:
            account = (f'<form method="post" action="{p}/logout"><input type="hidden" name="csrf" '
                       f'value="{_e(s.csrf)}"><button type="submit">Log out (admin)</button></form>')
        else:
            account = f'<a href="{p}/login">Admin</a>' if self.admin_enabled else ""
        doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
               f'<meta name="viewport" content="width=device-width, initial-scale=1">'
               f'<title>{_e(title)} · igdpcp</title><link rel="stylesheet" href="{p}/static/style.css"></head>'
               f'<body><header><h1>Port forwarding</h1><nav><a href="{p}/">Status</a>'
               f'<a href="{p}/mappings">Port forwards</a>{account}</nav></header>'
               f'<main>{note}{body}<p class="muted">{_e(PRODUCT)}</p></main>'
               f'<script src="{p}/static/app.js"></script></body></html>')
        return HttpResponse(status, self._headers(ctx, "text/html; charset=utf-8"), doc.encode())

    def _page_plain(self, status: int, text: str) -> HttpResponse:
        doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{status}</title></head>'
               f'<body><p id="refused">{_e(text)}</p></body></html>')
        return HttpResponse(status, [("Content-Type", "text/html; charset=utf-8"), *SECURITY_HEADERS], doc.encode())

    def _headers(self, ctx: _Ctx, ctype: str) -> list[tuple[str, str]]:
        h = [("Content-Type", ctype), *SECURITY_HEADERS]
        if ctx.new_cookie:
            h.append(("Set-Cookie", f"{COOKIE}={ctx.session.sid}; Path={self.config.prefix.rstrip('/')}/; "
                                    "HttpOnly; SameSite=Strict"))
        return h

    def _redirect(self, ctx: _Ctx, sub: str) -> HttpResponse:
        return HttpResponse(303, [("Location", self.config.prefix.rstrip("/") + sub),
                                  *self._headers(ctx, "text/plain; charset=utf-8")], b"")


def _port(raw: str, what: str) -> int:
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ValueError(f"the {what} port must be 1-65535")
    return int(raw)


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name and v.isalnum() and len(v) <= 64:
            return v
    return None

