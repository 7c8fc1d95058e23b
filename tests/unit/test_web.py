"""The LAN page's handler, request by request (no sockets): sessions, CSRF, Host, rights, login."""

from __future__ import annotations

import asyncio
import re

import pytest

from controld.adminapi.backend import Origin
from controld.web import auth
from controld.web.handler import (
    MAX_LOGIN_FAILURES,
    MAX_SESSIONS,
    MAX_SESSIONS_PER_CLIENT,
    HttpRequest,
    HttpResponse,
    WebApp,
    WebConfig,
    host_is_ip_literal,
)
from tests.unit.admin_fake import FakeBackend

ME, OTHER = "192.168.1.2", "192.168.1.3"
HASH = auth.make_hash("s3cret-pass", iterations=auth.MIN_ITERATIONS)
FORM = {"content-type": "application/x-www-form-urlencoded"}


class Browser:
    """One client: keeps its cookie, reads CSRF tokens from pages."""

    def __init__(self, app: WebApp, client: str = ME, host: str = "192.168.1.1:5000") -> None:
        self.app, self.client, self.host = app, client, host
        self.cookie = ""
        self.now = 1000.0
        self.csrf = ""

    def req(self, method: str, path: str, body: str = "", **headers: str) -> HttpResponse:
        h = {"host": self.host, **({"cookie": self.cookie} if self.cookie else {}), **headers}
        if method == "POST":
            h = {**FORM, **h}
        resp = asyncio.run(self.app.handle(HttpRequest(method, path, h, body.encode(), self.client, self.now)))
        for k, v in resp.headers:
            if k == "Set-Cookie":
                self.cookie = v.split(";")[0]
        if m := re.search(rb'name="csrf" value="([0-9a-f]+)"', resp.body):
            self.csrf = m[1].decode()
        return resp

    def get(self, path: str, **headers: str) -> HttpResponse:
        return self.req("GET", "/igdpcp" + path, **headers)

    def post(self, path: str, body: str, csrf: bool = True, **headers: str) -> HttpResponse:
        return self.req("POST", "/igdpcp" + path, body + (f"&csrf={self.csrf}" if csrf else ""), **headers)


def text(resp: HttpResponse) -> str:
    return resp.body.decode()


@pytest.fixture
def backend() -> FakeBackend:
    b = FakeBackend()
    b.seed(Origin.UPNP, ME, "TCP", 8080, 80, "mine")
    b.seed(Origin.PCP, OTHER, "UDP", 3478, 3478, "theirs")
    return b


@pytest.fixture
def app(backend: FakeBackend) -> WebApp:
    return WebApp(backend, WebConfig(password_hash=HASH))


@pytest.mark.parametrize("host, ok", [("192.168.1.1", True), ("192.168.1.1:80", True), ("[fe80::1]:5000", True),
                                      ("[::1]", True), ("router.lan", False), ("192.168.1.1.nip.io", False),
                                      ("localhost:80", False), ("", False), ("192.168.1.1:http", False),
                                      ("[fe80::1]x", False), ("１９２.168.1.1", False)])
def test_host_must_be_an_ip_literal(host: str, ok: bool) -> None:
    assert host_is_ip_literal(host) is ok


def test_dns_rebinding_name_is_refused(app: WebApp) -> None:
    resp = Browser(app, host="evil.example").get("/")
    assert resp.status == 403 and "not a name" in text(resp)
    assert Browser(app, host="").get("/").status == 403


def test_lan_host_sees_only_its_own_forwards(app: WebApp) -> None:
    b = Browser(app)
    page = text(b.get("/mappings"))
    assert "mine" in page and "theirs" not in page and 'name="int_ip"' not in page
    assert 'data-remaining="3600">1h00m</td>' in page
    assert "Forwards go to this device: 192.168.1.2" in page
    assert "Your forwards</th><td>1<" in text(b.get("/"))
    assert "PCP server" not in text(b.get("/"))  # the admin's facts are not shown


def test_add_and_delete_own_forward(app: WebApp, backend: FakeBackend) -> None:
    b = Browser(app)
    b.get("/mappings")
    resp = b.post("/add", "proto=UDP&ext_port=9000&int_port=9001&description=game&lifetime=86400")
    assert resp.status == 303 and ("Location", "/igdpcp/mappings") in resp.headers
    [m] = [m for m in backend.mappings.values() if m.ext_port == 9000]
    assert (m.int_ip, m.int_port, m.origin, m.owner, m.remaining) == (ME, 9001, Origin.WEB, ME, 86400)
    assert "Added: UDP 198.20.0.1:9000 to 192.168.1.2:9001." in text(b.get("/mappings"))
    assert b.post("/delete", f"id={m.id}").status == 303
    assert m.id not in backend.mappings


def test_lan_host_cannot_forward_to_or_delete_for_another(app: WebApp, backend: FakeBackend) -> None:
    b = Browser(app)
    b.get("/mappings")
    resp = b.post("/add", f"proto=TCP&ext_port=9000&int_port=80&int_ip={OTHER}&lifetime=3600")
    assert resp.status == 403 and "only to your own address" in text(resp)
    theirs = next(m for m in backend.mappings.values() if m.int_ip == OTHER)
    resp = b.post("/delete", f"id={theirs.id}")
    assert resp.status == 403 and theirs.id in backend.mappings
    resp = b.post("/add", "proto=TCP&ext_port=9000&int_port=80&lifetime=0")  # permanent is the admin's
    assert resp.status == 400 and len(backend.mappings) == 2


def test_core_refusals_are_shown(app: WebApp, backend: FakeBackend) -> None:
    b = Browser(app)
    b.get("/mappings")
    resp = b.post("/add", "proto=UDP&ext_port=3478&int_port=1&lifetime=3600")
    assert resp.status == 409 and "Not added: UDP 3478 is taken." in text(resp)
    for port in range(2, 5):
        assert b.post("/add", f"proto=TCP&ext_port={port}&int_port=1&lifetime=3600").status == 303
    resp = b.post("/add", "proto=TCP&ext_port=99&int_port=1&lifetime=3600")
    assert resp.status == 403 and "has 4 mappings" in text(resp)  # the core's quota
    for bad in ("proto=SCTP&ext_port=1&int_port=1", "proto=TCP&ext_port=0&int_port=1",
                "proto=TCP&ext_port=１&int_port=1", "proto=TCP&ext_port=1&int_port=1&lifetime=5"):
        assert b.post("/add", bad).status == 400, bad


def test_csrf_token_required_on_every_post(app: WebApp, backend: FakeBackend) -> None:
    b = Browser(app)
    b.get("/mappings")
    for path, body in (("/add", "proto=TCP&ext_port=9000&int_port=80"), ("/delete", "id=1"),
                       ("/login", "password=s3cret-pass"), ("/logout", "")):
        assert b.post(path, body, csrf=False).status == 403, path
        assert b.post(path, body + "&csrf=" + "0" * 32, csrf=False).status == 403, path
    assert len(backend.mappings) == 2
    other = Browser(app, client=OTHER)  # another host's token is not this session's
    other.get("/mappings")
    b.csrf = other.csrf
    assert b.post("/delete", "id=1").status == 403 and 1 in backend.mappings


def test_cross_site_origin_and_foreign_cookie_refused(app: WebApp, backend: FakeBackend) -> None:
    b = Browser(app)
    b.get("/mappings")
    resp = b.post("/delete", "id=1", origin="http://evil.example")
    assert resp.status == 403 and "another site" in text(resp)
    assert b.post("/delete", "id=1", origin="null").status == 403
    thief = Browser(app, client=OTHER)  # a stolen cookie from another address is no session
    thief.cookie, thief.csrf = b.cookie, b.csrf
    assert thief.post("/delete", "id=1").status == 403 and 1 in backend.mappings
    assert b.post("/delete", "id=1", origin="http://192.168.1.1:5000").status == 303


def test_sessions_expire(app: WebApp) -> None:
    b = Browser(app)
    b.get("/mappings")
    b.now += app.config.session_ttl + 1
    resp = b.post("/delete", "id=1")
    assert resp.status == 403 and "expired" in text(resp)


def test_sessions_are_bounded(app: WebApp) -> None:
    for i in range(MAX_SESSIONS + 10):
        Browser(app, client=f"10.0.{i // 250}.{i % 250 + 1}").get("/")
    assert len(app.sessions) == MAX_SESSIONS


def test_one_host_flooding_the_page_keeps_others_sessions(app: WebApp, backend: FakeBackend) -> None:
    admin = Browser(app, client=OTHER)
    admin.get("/login")
    admin.post("/login", "password=s3cret-pass")
    for _ in range(MAX_SESSIONS * 2):  # no cookie kept: a new session each time
        Browser(app).get("/")
    assert sum(s.client == ME for s in app.sessions.values()) == MAX_SESSIONS_PER_CLIENT
    admin.get("/mappings")
    assert admin.post("/delete", "id=1").status == 303 and 1 not in backend.mappings


def test_admin_login_sees_and_manages_all(app: WebApp, backend: FakeBackend) -> None:
    b = Browser(app)
    b.get("/login")
    before = b.cookie
    assert b.post("/login", "password=wrong").status == 403
    resp = b.post("/login", "password=s3cret-pass")
    assert resp.status == 303 and b.cookie != before  # a new session id after login
    page = text(b.get("/mappings"))
    assert "theirs" in page and "mine" in page and 'name="int_ip"' in page and "permanent" in page
    assert "PCP server" in text(b.get("/")) and "upnp 718×2" in text(b.get("/"))
    assert b.post("/add", f"proto=TCP&ext_port=2222&int_port=22&int_ip={OTHER}&lifetime=0").status == 303
    m = next(m for m in backend.mappings.values() if m.ext_port == 2222)
    assert (m.int_ip, m.origin, m.remaining) == (OTHER, Origin.OPERATOR, None)
    theirs = next(m for m in backend.mappings.values() if m.ext_port == 3478)
    assert b.post("/delete", f"id={theirs.id}").status == 303 and theirs.id not in backend.mappings
    b.now += app.config.admin_ttl + 1  # idle admin sessions end sooner
    assert b.post("/delete", f"id={m.id}").status == 403
    b.get("/")
    assert "theirs" not in text(b.get("/mappings"))


def test_logout(app: WebApp) -> None:
    b = Browser(app)
    b.get("/login")
    b.post("/login", "password=s3cret-pass")
    b.get("/")
    assert b.post("/logout", "").status == 303
    assert "All forwards" not in text(b.get("/mappings"))


def test_login_attempts_are_rate_limited(app: WebApp) -> None:
    b = Browser(app)
    b.get("/login")
    for _ in range(MAX_LOGIN_FAILURES):
        assert b.post("/login", "password=nope").status == 403
    assert b.post("/login", "password=s3cret-pass").status == 429  # even the right one, for now
    b.now += 301
    assert b.post("/login", "password=s3cret-pass").status == 303


@pytest.mark.parametrize("stored", ["", "plain", "pbkdf2_sha256$1$AA==$AA==", "pbkdf2_sha256$x$y$z"])
def test_no_or_bad_password_hash_means_admin_off(backend: FakeBackend, stored: str) -> None:
    app = WebApp(backend, WebConfig(password_hash=stored))
    b = Browser(app)
    assert "Admin login is off" in text(b.get("/login")) and 'href="/igdpcp/login"' not in text(b.get("/"))
    assert b.post("/login", "password=").status == 403


def test_routing_and_static(app: WebApp) -> None:
    b = Browser(app)
    assert b.req("GET", "/igdpcp").status == 301
    assert b.get("/nope").status == 404
    assert b.req("DELETE", "/igdpcp/mappings").status == 405
    js = b.get("/static/app.js")
    assert js.status == 200 and b"data-remaining" in js.body and ("Content-Type", "text/javascript; charset=utf-8") \
        in js.headers
    assert b.get("/static/../handler.py").status == 404


def test_hostile_input_is_escaped(app: WebApp, backend: FakeBackend) -> None:
    backend.seed(Origin.UPNP, ME, "TCP", 7000, 70, "<script>alert(1)</script>")
    page = text(Browser(app).get("/mappings"))
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_forms_and_bodies_are_bounded(app: WebApp) -> None:
    b = Browser(app)
    b.get("/mappings")
    assert b.post("/add", "x=" + "a" * 10000).status == 413
    assert b.post("/add", "&".join(f"f{i}=1" for i in range(40))).status == 400
    assert b.req("POST", "/igdpcp/add", "id=1", **{"content-type": "application/json"}).status == 415


def test_password_hash_round_trip() -> None:
    h = auth.make_hash("pw-123456", iterations=auth.MIN_ITERATIONS)
    assert h.startswith("pbkdf2_sha256$10000$") and auth.verify("pw-123456", h) and not auth.verify("pw", h)
