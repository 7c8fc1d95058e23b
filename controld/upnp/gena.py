"""GENA eventing (UPnP Device Architecture 1.1 §4): SUBSCRIBE, renewal, UNSUBSCRIBE, NOTIFY.

:class:`Subscriptions` is the sans-I/O core: headers, peer address and time in, a
subscription or a :class:`GenaError` (HTTP status) out. :class:`GenaServer` is the
edge: it answers the HTTP layer and delivers NOTIFY requests with asyncio streams.

Safety: a callback URL must point at the subscriber's own address, or the SUBSCRIBE
is refused with 412 (CallStranger, CVE-2020-12695); subscriptions
are bounded per host and in total; expired ones are dropped; each subscriber has at
most one NOTIFY in flight and changes are coalesced, so no queue grows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from controld.core.events import ChangeEvent
from controld.upnp.description import Device, Gateway, Service, wants_igd1
from controld.upnp.parse import ascii_uint
from controld.upnp.xmltext import escape

log = logging.getLogger("controld.upnp.gena")

DEFAULT_TIMEOUT = 1800
MIN_TIMEOUT = 60
MAX_TIMEOUT = 86400
MAX_PER_HOST = 8
MAX_TOTAL = 64
NOTIFY_TIMEOUT = 3.0  # per delivery, as miniupnpd (as miniupnpd does)
MAX_FAILURES = 3  # consecutive failed deliveries before a subscription is dropped
COALESCE = 0.05  # seconds: a burst of changes becomes one event
_CALLBACK = re.compile(r"<([^<>]{1,512})>")


class GenaError(Exception):
    """A refused (UN)SUBSCRIBE, answered with ``status``."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass
class Subscription:
    sid: str
    path: str  # the event URL subscribed to
    host: str  # the subscriber's address; the callback points here
    callback: str  # http URL
    timeout: int
    expires: float
    seq: int = 0
    igd1_view: bool = False  # it was given the IGD:1 description (UDA 1.1 §4.3: only its variables)
    sent: dict[str, str] = field(default_factory=dict)  # values last delivered
    failures: int = 0
    pending: bool = False
    task: asyncio.Task[None] | None = None


def parse_timeout(header: str) -> int:
    """TIMEOUT: Second-N (or infinite, or absent) -> the granted seconds, bounded."""
    h = header.strip().lower()
    seconds = ascii_uint(h[7:]) if h.startswith("second-") else None
    if seconds is not None:
        return max(MIN_TIMEOUT, min(MAX_TIMEOUT, seconds))
    return DEFAULT_TIMEOUT


def callback_for(header: str, peer: str) -> str | None:
    """The first ``<http://peer[:port]/...>`` URL of a CALLBACK header; others are skipped (CallStranger)."""
    for url in _CALLBACK.findall(header)[:8]:
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError:
            continue
        if parts.scheme != "http" or host is None or port == 0:
            continue
        try:
            if ipaddress.ip_address(host) == ipaddress.ip_address(peer):
                return url
        except ValueError:
            continue  # a name is never accepted: it could resolve anywhere
    return None


def propertyset(values: dict[str, str]) -> bytes:
    """The NOTIFY body for ``values`` (UDA 1.1 §4.3)."""
    props = "".join(f"<e:property><{k}>{escape(v)}</{k}></e:property>" for k, v in values.items())
    return ('<?xml version="1.0"?>\r\n<e:propertyset xmlns:e="urn:schemas-upnp-org:event-1-0">'
            f"{props}</e:propertyset>\r\n").encode()


def notify_request(sub: Subscription, body: bytes) -> bytes:
    """The whole NOTIFY request for one event to ``sub``."""
    parts = urlsplit(sub.callback)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    head = (f"NOTIFY {path} HTTP/1.1\r\nHOST: {parts.netloc}\r\n"
            'CONTENT-TYPE: text/xml; charset="utf-8"\r\nNT: upnp:event\r\nNTS: upnp:propchange\r\n'
            f"SID: {sub.sid}\r\nSEQ: {sub.seq}\r\nCONTENT-LENGTH: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class Subscriptions:
    """The subscription table (sans-I/O): time is passed in."""

    def __init__(self, max_per_host: int = MAX_PER_HOST, max_total: int = MAX_TOTAL) -> None:
        self.by_sid: dict[str, Subscription] = {}
        self.max_per_host = max_per_host
        self.max_total = max_total

    def request(self, method: str, path: str, headers: dict[str, str], peer: str,
                now: float) -> Subscription | None:
        """Apply one SUBSCRIBE (new or renewal) or UNSUBSCRIBE; headers lower-cased.

        Returns the (new or renewed) subscription, None for an UNSUBSCRIBE; raises GenaError.
        """
        sid = headers.get("sid", "").strip()
        nt, cb = headers.get("nt"), headers.get("callback")
        if sid and (nt is not None or cb is not None):
            raise GenaError(400, "SID together with NT or CALLBACK")  # UDA 1.1 §4.1.2
        if method == "UNSUBSCRIBE" or sid:
            sub = self.by_sid.get(sid)
            if not sid or sub is None or sub.path != path or sub.host != peer:
                raise GenaError(412, f"no subscription {sid[:64]!r} of {peer} at {path}")
            if method == "UNSUBSCRIBE":
                self.drop(sub, "unsubscribed")
                return None
            sub.timeout = parse_timeout(headers.get("timeout", ""))
            sub.expires = now + sub.timeout
            return sub
        if nt != "upnp:event":
            raise GenaError(412, "NT must be upnp:event")
        url = callback_for(cb or "", peer)
        if url is None:
            raise GenaError(412, f"no CALLBACK URL pointing at the subscriber {peer} (CallStranger)")
        self.expire(now)
        if len(self.by_sid) >= self.max_total:
            raise GenaError(503, f"{self.max_total} subscriptions already")
        if sum(1 for s in self.by_sid.values() if s.host == peer) >= self.max_per_host:
            raise GenaError(503, f"{peer} holds {self.max_per_host} subscriptions already")
        timeout = parse_timeout(headers.get("timeout", ""))
        sub = Subscription(f"uuid:{uuid.uuid4()}", path, peer, url, timeout, now + timeout)
        self.by_sid[sub.sid] = sub
        log.info("subscribed %s for %s at %s -> %s (%d s)", sub.sid, peer, path, url, timeout)
        return sub

    def drop(self, sub: Subscription, why: str) -> None:
        """Remove ``sub`` (and stop its delivery)."""
        if self.by_sid.pop(sub.sid, None) is not None:
            log.info("subscription %s of %s dropped: %s", sub.sid, sub.host, why)
        if sub.task is not None and not sub.task.done() and sub.task is not _current_task():
            sub.task.cancel()

    def expire(self, now: float) -> int:
        """Drop every subscription past its timeout; returns how many went."""
        gone = [s for s in self.by_sid.values() if s.expires <= now]
        for s in gone:
            self.drop(s, "expired")
        return len(gone)


def _current_task() -> asyncio.Task[None] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


class GenaServer:
    """The edge: answers (UN)SUBSCRIBE for the HTTP server and delivers events."""

    def __init__(self, device: Device | Gateway, evented: Callable[[Service, str], dict[str, str]],
                 subs: Subscriptions | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.evented = evented  # (service, subscriber address) -> current values
        self.subs = subs or Subscriptions()
        self.clock = clock
        self._flush: asyncio.TimerHandle | None = None

    def request(self, method: str, path: str, headers: dict[str, str],
                peer: str) -> tuple[int, dict[str, str], Callable[[], None] | None]:
        """(status, response headers, what to run once the response is sent)."""
        try:
            sub = self.subs.request(method, path, headers, peer, self.clock())
        except GenaError as exc:
            log.info("gena %s %s from %s: %d %s", method, path, peer, exc.status, exc)
            return exc.status, {}, None
        if sub is None:
            return 200, {}, None
        if "user-agent" in headers:
            sub.igd1_view = wants_igd1(headers["user-agent"])
        out = {"SID": sub.sid, "TIMEOUT": f"Second-{sub.timeout}",
               "DATE": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())}
        initial = not sub.sent and sub.seq == 0 and sub.task is None
        return 200, out, (lambda: self._kick(sub)) if initial else None

    def changed(self, ev: ChangeEvent | None = None) -> None:
        """Mappings or addresses changed: one coalesced event round (a store event only if a CP sees it)."""
        if ev is not None and not ev.shown:
            return
        if self._flush is None and self.subs.by_sid:
            self._flush = asyncio.get_running_loop().call_later(COALESCE, self._flush_now)

    def _flush_now(self) -> None:
        self._flush = None
        self.subs.expire(self.clock())
        for sub in list(self.subs.by_sid.values()):
            self._kick(sub)

    def _kick(self, sub: Subscription) -> None:
        if sub.sid not in self.subs.by_sid:
            return
        sub.pending = True
        if sub.task is None or sub.task.done():
            sub.task = asyncio.create_task(self._deliver(sub))

    async def _deliver(self, sub: Subscription) -> None:
        """Send what changed for ``sub`` until nothing is pending; one request at a time."""
        service = self.device.events.get(sub.path)
        while sub.pending and service is not None and sub.sid in self.subs.by_sid:
            sub.pending = False
            now_values = self.evented(service, sub.host)
            if sub.igd1_view:
                now_values.pop("SystemUpdateID", None)
            diff = {k: v for k, v in now_values.items() if sub.sent.get(k) != v}
            if not diff:
                continue
            ok = await self._send(sub, propertyset(diff))
            if ok:
                sub.failures = 0
                sub.sent.update(diff)
            else:
                sub.failures += 1
                if sub.failures >= MAX_FAILURES:
                    self.subs.drop(sub, f"{MAX_FAILURES} deliveries failed")
                    return
            # SEQ counts events sent, delivered or not (UDA 1.1 §4.3.2); wraps to 1
            sub.seq = sub.seq + 1 if sub.seq < 2**32 - 1 else 1

    async def _send(self, sub: Subscription, body: bytes) -> bool:
        parts = urlsplit(sub.callback)
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, parts.port or 80), NOTIFY_TIMEOUT)
            writer.write(notify_request(sub, body))
            await asyncio.wait_for(writer.drain(), NOTIFY_TIMEOUT)
            status = await asyncio.wait_for(reader.readline(), NOTIFY_TIMEOUT)
            ok = status.split(b" ")[1:2] == [b"200"]
            log.info("event %s seq %d to %s: %s", sub.sid, sub.seq, sub.callback, status[:40].strip())
            return ok
        except (TimeoutError, OSError, ValueError) as exc:
            log.info("event %s seq %d to %s failed: %s", sub.sid, sub.seq, sub.callback, exc)
            return False
        finally:
            if writer is not None:
                writer.close()

    async def run_expiry(self, every: float = 30.0) -> None:
        """Drop expired subscriptions now and then, even when nothing changes."""
        while True:
            await asyncio.sleep(every)
            self.subs.expire(self.clock())

    def close(self) -> None:
        for sub in list(self.subs.by_sid.values()):
            self.subs.drop(sub, "shutdown")
