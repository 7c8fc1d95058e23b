"""The UPnP HTTP server: descriptions (GET) and SOAP control (POST), LAN only, bounded.

One request per connection (Connection: close), as miniupnpc and most control
points use it. Limits: connections per host and in total (controld.upnp.fairness: one
over them is closed at once), header bytes, body bytes, header and body deadlines and a
deadline per request; anything malformed or over a limit gets a 4xx and the
connection is closed; any other exception is answered 400 (shared/guard.py). Requests
from outside the LAN subnets are dropped, and the Host header must be an IP literal (DNS
rebinding).

Two paths, one behaviour: a request that arrives whole in its connection's first read (what
control points send) is answered on a plain non-blocking socket from the loop's callbacks
(:class:`_Conn`); anything else is handed, with the bytes read so far, to the stream path
(StreamReader/StreamWriter, ``UpnpHttpServer._stream``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from controld.upnp import soap
from controld.upnp.description import Device, Gateway, Service
from controld.upnp.errors import UPnPError
from controld.upnp.fairness import Fairness
from controld.upnp.gena import GenaServer
from controld.upnp.igd import IgdActions
from controld.upnp.parse import ascii_uint
from controld.web.handler import HttpRequest, HttpResponse
from shared.const import SERVER
from shared.deadlines import Deadline, Deadlines
from shared.guard import Guard

log = logging.getLogger("controld.upnp.http")

MAX_HEADER = 8192
MAX_BODY = 65536
BACKLOG = 1024  # a burst of one host's connects must not crowd out another host's SYN
READ_DEADLINE = 5.0  # to receive the whole request
LINGER_S = 0.5  # after the answer, for the peer's EOF (see _linger)
MAX_REFUSING = 64  # connections over a host's share answered 503 at once (the rest: closed)
LINGER_READS = 16  # at most this many reads of unread input (bounded: ~1 MiB)
REQUEST_DEADLINE = 28.0  # to answer it; UPnP allows 30 s and actions bound their PCP wait below this
MAX_PEERS_KNOWN = 4096  # addresses whose LAN membership is remembered (cleared when full)
WEB_MAX_BODY = 8192  # the LAN page's form posts (controld/web)

XML_HEADERS = {"Content-Type": 'text/xml; charset="utf-8"', "EXT": ""}  # every SOAP answer's
_XML_HEADS: dict[int, list[bytes]] = {}  # status -> the head of a SOAP answer around its Content-Length
_HOST = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
_REASONS = {200: "OK", 301: "Moved Permanently", 303: "See Other", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
            411: "Length Required", 412: "Precondition Failed", 413: "Payload Too Large",
            415: "Unsupported Media Type", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable"}


def _normalise(target: str) -> str:
    """The path of a request target: absolute-form accepted (RFC 7230 §5.3.2), query dropped,
    repeated and trailing slashes folded, so /ctl/WANIPCn/ finds /ctl/WANIPCn."""
    if target.lower().startswith("http://"):
        target = urlsplit(target).path or "/"
    path = "/" + "/".join(p for p in target.split("?", 1)[0].split("/") if p)
    return path


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The request body by Content-Length or chunked (RFC 7230 §4.1), never over MAX_BODY."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        for _ in range(MAX_BODY // 16 + 2):  # bounded: tiny chunks cannot loop forever
            size = _hex((await reader.readuntil(b"\r\n")).split(b";")[0].strip())
            if size is None:
                raise HttpError(400, "bad chunk size")
            if size == 0:
                await reader.readuntil(b"\r\n")  # the empty trailer line
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise HttpError(413, "chunked body too large")
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        raise HttpError(413, "too many chunks")
    length = ascii_uint(headers.get("content-length", ""), 18)
    if length is None:
        raise HttpError(411, "Content-Length required")
    if length > MAX_BODY:
        raise HttpError(413, f"body of {length} bytes")
    return await reader.readexactly(length)


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers; :class:`_NoRequest` when the peer sent nothing at all."""
    try:
        async with asyncio.timeout(READ_DEADLINE):
            return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, "headers too large") from None
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():  # connected and closed without a request: nothing to answer
            raise _NoRequest from None
        raise
    except ConnectionError:  # reset before the request was complete: nobody left to answer
        raise _NoRequest from None


def _answer_bytes(status: int, headers: dict[str, str], body: bytes) -> bytes:
    """The whole answer (Connection: close); the head of a SOAP answer is made once per status."""
    if headers is XML_HEADERS:
        pre = _XML_HEADS.get(status)
        if pre is None:
            pre = _XML_HEADS[status] = _head_text(status, XML_HEADERS, "\0").encode().split(b"\0")
        return pre[0] + str(len(body)).encode() + pre[1] + body
    return _head_text(status, headers, str(len(body))).encode() + body


def _head_text(status: int, headers: dict[str, str], length: str) -> str:
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"SERVER: {SERVER}",
            "Connection: close", f"Content-Length: {length}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return "\r\n".join(head) + "\r\n\r\n"


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                headers: dict[str, str], body: bytes, deadline: float) -> None:
    """Write the answer (Connection: close) within ``deadline``, linger, close."""
    try:
        writer.write(_answer_bytes(status, headers, body))
        async with asyncio.timeout(deadline):
            await writer.drain()
        await _linger(reader, writer)
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After the answer: FIN, then read and discard what the peer still sends (an unread body)
    until its EOF, bounded. A close with unread input resets the connection, and the reset
    can destroy the answer before the peer reads it."""
    if reader.at_eof() or not writer.can_write_eof():
        return
    writer.write_eof()
    try:
        async with asyncio.timeout(LINGER_S):
            for _ in range(LINGER_READS):
                if not await reader.read(MAX_BODY):
                    return
    except (TimeoutError, ConnectionError, asyncio.LimitOverrunError):
        pass


def _hex(raw: bytes) -> int | None:
    """A chunk size: 1-8 ASCII hex digits."""
    if not 0 < len(raw) <= 8 or not all(c in b"0123456789abcdefABCDEF" for c in raw):
        return None
    return int(raw, 16)


Answer = tuple[int, dict[str, str], bytes]  # status, headers, body


@dataclass(frozen=True, slots=True)
class _Pending:
    """A SOAP action that waits for the core (answered by ``UpnpHttpServer._act``)."""

    service: Service
    action: soap.SoapAction


class _NoRequest(Exception):
    """The peer closed the connection before sending a byte of a request."""


class HttpError(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class UpnpHttpServer:
    def __init__(self, device: Device | Gateway, actions: IgdActions, lan_subnets: Callable[[], list[str]],
                 gena: GenaServer | None = None,
                 web: tuple[str, Callable[[HttpRequest], Awaitable[HttpResponse]]] | None = None) -> None:
        """``web``: (path prefix, handler) of the LAN page, served after the LAN and Host checks."""
        self.device = device
        self.web = web
        self.actions = actions
        self.lan_subnets = lan_subnets
        self.gena = gena
        self.fair = Fairness()
        self.guard = Guard(log, "http")
        self._refusing = 0  # connections being answered 503 (bounded by MAX_REFUSING)
        self._subnets: list[str] = []
        self._nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._peers: dict[str, bool] = {}  # address -> inside the LAN subnets (bounded, reset with them)
        self.server: _Listener | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # actions that wait, hand-overs: held until done
        # the fast path's timeouts, one queue per length (shared.deadlines: no heap work per request)
        self.read_deadlines, self.request_deadlines = Deadlines(READ_DEADLINE), Deadlines(REQUEST_DEADLINE)
        self.lingers = Deadlines(LINGER_S)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0: any); returns the port."""
        self.server = _Listener(self, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    def _accepted(self, sock: socket.socket, peer: str) -> bool:
        """A new connection: LAN only, within its host's share, then the fast path; False if it was
        answered at once (its request was there already)."""
        if not self._in_lan(peer):
            sock.close()
            return True
        sock.setblocking(False)
        if not self.fair.admit(peer, time.monotonic()):
            if self._refusing >= MAX_REFUSING:  # a flood: not even a 503 (see _refuse)
                sock.close()
            else:
                self._spawn(self._adopt(sock, b"", self._refuse, None))
            return True
        return _Conn(self, sock, peer).start()

    async def _adopt(self, sock: socket.socket, data: bytes,
                     client: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                     holder: str | None) -> None:
        """Serve ``sock`` on the stream path, ``data`` (already read) first; ``holder``: the host whose
        fairness slot it holds (``client`` frees it)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEADER, loop=loop)
        if data:
            reader.feed_data(data)
        try:
            await loop.connect_accepted_socket(lambda: asyncio.StreamReaderProtocol(reader, client, loop=loop), sock)
        except OSError:
            sock.close()
            if holder is not None:
                self.fair.release(holder)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def _in_lan(self, ip: str) -> bool:
        subnets = self.lan_subnets()
        if subnets != self._subnets:  # parsed once per change, not per connection
            self._subnets, self._nets = list(subnets), [ipaddress.ip_network(n) for n in subnets]
            self._peers.clear()
        inside = self._peers.get(ip)
        if inside is None:  # a LAN has few hosts: each address is parsed and matched once
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return False
            inside = any(addr in n for n in self._nets)
            if len(self._peers) >= MAX_PEERS_KNOWN:
                self._peers.clear()
            self._peers[ip] = inside
        return inside

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        """The stream path of an admitted connection (see :class:`_Conn`); frees its slot at the end."""
        try:
            await self._serve(reader, writer, peer)
        except Exception as exc:  # the guard (shared/guard.py): nothing escapes, the slot is freed
            self.guard.unexpected(peer, exc)
        finally:
            self.fair.release(peer)
            writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Over the host's share: 503 unread (a client learns to come back), at most
        MAX_REFUSING such answers at once; beyond that the connection is just closed."""
        if self._refusing >= MAX_REFUSING:
            writer.close()
            return
        self._refusing += 1
        try:
            await _send(reader, writer, 503, {"Retry-After": "1"}, b"", LINGER_S)
        finally:
            self._refusing -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        after = None
        try:
            async with asyncio.timeout(REQUEST_DEADLINE):  # no extra task per request, unlike wait_for
                status, headers, body, after = await self._request(reader, writer, peer)
        except _NoRequest:  # a port scan or a liveness probe (docs/upnp.md "Tolerances")
            log.debug("http %s: closed without a request", peer)
            return
        except HttpError as exc:
            log.info("http %s: %d %s", peer, exc.status, exc)
            status, headers, body = exc.status, {}, b""
        except TimeoutError:
            status, headers, body = 408, {}, b""
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            log.info("http %s: bad request: %s", peer, exc)
            status, headers, body = 400, {}, b""
        except Exception as exc:  # unexpected: answered 400 all the same, logged once (rate limited)
            self.guard.unexpected(peer, exc)
            status, headers, body = 400, {}, b""
        await _send(reader, writer, status, headers, body, REQUEST_DEADLINE)
        if after is not None:
            after()  # e.g. GENA's initial event, which must follow the SUBSCRIBE response

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       peer: str) -> tuple[int, dict[str, str], bytes, Callable[[], None] | None]:
        method, path, headers = _parse_head(await _read_head(reader))
        if self._is_web(path):
            return (*await self._web(method, path, headers, reader, peer), None)
        path = _normalise(path)
        if method == "GET":
            return (*self._get(path, headers.get("user-agent", "")), None)
        if method == "POST":
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return (*await self._post(path, headers, reader, peer), None)
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if self.gena is None or path not in self.device.events:
                raise HttpError(404, f"no event URL {path[:64]}")
            status, out, after = self.gena.request(method, path, headers, peer)
            return status, out, b"", after
        raise HttpError(405, f"method {method[:16]}")

    def _is_web(self, target: str) -> bool:
        return self.web is not None and _normalise(target).split("/")[1] == self.web[0].strip("/")

    async def _web(self, method: str, target: str, headers: dict[str, str], reader: asyncio.StreamReader,
                   peer: str) -> tuple[int, dict[str, str], bytes]:
        """The LAN page (docs/operating.md): bodies up to WEB_MAX_BODY, then its own handler."""
        assert self.web is not None
        body = b""
        if method == "POST":
            length = ascii_uint(headers.get("content-length", ""), 18)
            if length is not None and length > WEB_MAX_BODY:
                raise HttpError(413, f"form of {length} bytes")
            async with asyncio.timeout(READ_DEADLINE):
                body = await _read_body(reader, headers)
        resp = await self.web[1](HttpRequest(method, target, headers, body, peer, time.monotonic()))
        return resp.status, dict(resp.headers), resp.body

    def _query_state_variable(self, service: Service, action: soap.SoapAction, peer: str,
                              headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """UDA 1.0 §3.2.1 QueryStateVariable, still sent by Windows' UPnP API and libupnp:
        the evented variables, as the caller sees them (404 Invalid Var for the rest)."""
        if action.name != "QueryStateVariable":
            return 500, headers, soap.fault(401, "Invalid Action")
        values = self.actions.evented(service, peer)
        var = action.args.get("varName", "")
        if var not in values:
            return 500, headers, soap.fault(404, "Invalid Var")
        return 200, headers, soap.response(soap.CONTROL_URN, "QueryStateVariable", {"return": values[var]})

    def _get(self, path: str, user_agent: str) -> tuple[int, dict[str, str], bytes]:
        # IGD:1 view for agents that break on IGD:2 (controld.upnp.description.IGD1_ONLY_AGENTS)
        xml = self.device.description(path, user_agent)
        if xml is None:
            if path in self.device.services:
                return 405, {"Allow": "POST"}, b""
            raise HttpError(404, f"no {path[:64]}")
        return 200, {"Content-Type": 'text/xml; charset="utf-8"'}, xml

    async def _post(self, path: str, headers: dict[str, str], reader: asyncio.StreamReader,
                    peer: str) -> tuple[int, dict[str, str], bytes]:
        if path not in self.device.services:
            raise HttpError(404, f"no control URL {path[:64]}")
        async with asyncio.timeout(READ_DEADLINE):
            body = await _read_body(reader, headers)
        ready = self._soap(path, headers, body, peer)
        return await self._act(ready, peer) if isinstance(ready, _Pending) else ready

    def _soap(self, path: str, headers: dict[str, str], body: bytes,
              peer: str) -> Answer | _Pending:
        """A SOAP request's answer when it needs no waiting (faults, QueryStateVariable, actions
        answered from memory), else (service, action) for :meth:`_act`."""
        service = self.device.services[path]
        try:
            action = soap.parse_request(body, headers.get("soapaction", ""))
            if action.service_type == soap.CONTROL_URN:
                return self._query_state_variable(service, action, peer, XML_HEADERS)
            if action.service_type.rsplit(":", 1)[0] != service.type.rsplit(":", 1)[0]:
                raise soap.SoapError(f"{action.service_type} is not served at {path}")
        except soap.SoapActionError as exc:
            log.info("soap %s: %s", peer, exc)
            return 500, XML_HEADERS, soap.fault(401, "Invalid Action")
        except soap.SoapError as exc:
            log.info("soap %s: invalid request: %s", peer, exc)
            return 500, XML_HEADERS, soap.fault(402, "Invalid Args")
        if action.version > service.version:  # a :2 action on an IGD:1 router
            return 500, XML_HEADERS, soap.fault(401, "Invalid Action")
        try:
            out = self.actions.handle_now(service, action, peer)
        except UPnPError as exc:
            log.info("soap %s %s: %s", peer, action.name, exc)
            return 500, XML_HEADERS, soap.fault(exc.code, exc.description)
        if out is None:
            return _Pending(service, action)
        return 200, XML_HEADERS, soap.response(action.service_type, action.name, out)

    async def _act(self, ready: _Pending, peer: str) -> Answer:
        """Run an action that waits (the core, natd, NAT2); its answer or fault."""
        service, action = ready.service, ready.action
        try:
            out = await self.actions.handle(service, action, peer)
        except UPnPError as exc:
            log.info("soap %s %s: %s", peer, action.name, exc)
            return 500, XML_HEADERS, soap.fault(exc.code, exc.description)
        except Exception:
            log.exception("soap %s %s failed", peer, action.name)
            return 500, XML_HEADERS, soap.fault(501, "Action Failed")
        return 200, XML_HEADERS, soap.response(action.service_type, action.name, out)

    # --- the fast path (see _Conn) -------------------------------------------------------

    def _fast(self, conn: _Conn) -> bool:
        """Answer a request that came whole in the connection's first read: a GET, or a POST with
        Content-Length (what control points send). False: the stream path takes the connection."""
        buf = conn.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0 or end + 4 > MAX_HEADER:
            return False
        try:
            method, target, headers = _parse_head(buf[:end + 4])
        except (HttpError, ValueError):  # the stream path answers it, and logs it, as ever
            return False
        if method not in ("GET", "POST") or self._is_web(target):
            return False
        path = _normalise(target)
        try:
            if method == "GET":
                conn.answer(*self._get(path, headers.get("user-agent", "")))
                return True
            if "expect" in headers or "transfer-encoding" in headers:
                return False
            if path not in self.device.services:
                raise HttpError(404, f"no control URL {path[:64]}")
        except HttpError as exc:
            log.info("http %s: %d %s", conn.peer, exc.status, exc)
            conn.answer(exc.status, {}, b"")
            return True
        length = ascii_uint(headers.get("content-length", ""), 18)
        if length is None or length > MAX_BODY or len(buf) < end + 4 + length:
            return False
        ready = self._soap(path, headers, buf[end + 4:end + 4 + length], conn.peer)
        if isinstance(ready, _Pending):
            task = self._spawn(self._fast_act(conn, ready))
            conn.timer = self.request_deadlines.call_later(functools.partial(conn.too_slow, task))
        else:
            conn.answer(*ready)
        return True

    async def _fast_act(self, conn: _Conn, ready: _Pending) -> None:
        conn.answer(*await self._act(ready, conn.peer))  # (answer() ends the deadline set in _fast)


_WAIT, _BUSY, _SENDING, _LINGER, _DONE = range(5)  # a fast-path connection's phases
ACCEPT_BATCH = 64  # connections accepted per wake-up of the listening socket


class _Listener:
    """The listening socket on the loop (in place of asyncio's Server: ``sockets``, ``close()``);
    each accepted connection starts on the fast path (:class:`_Conn`)."""

    def __init__(self, srv: UpnpHttpServer, host: str, port: int) -> None:
        # bytes: a str host goes through the idna codec, whose import costs ~0.3 MiB for an address literal
        family, _, _, _, addr = socket.getaddrinfo(host.encode(), port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.srv = srv
        self.sockets = [sock]
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        sock = self.sockets[0]
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors or memory: the next wake-up tries again
                log.warning("http: accept failed: %s", exc)
                return
            if not self.srv._accepted(conn, addr[0]):
                return  # served at once: the loop first reads the EOFs of the connections answered so far

    def close(self) -> None:
        """Stop listening (connections being served finish)."""
        if self.sockets:
            self.loop.remove_reader(self.sockets[0].fileno())
            self.sockets.pop().close()


class _Conn:
    """One connection on the fast path: a plain non-blocking socket on the loop. A request that is
    whole in the first read (a GET, or a POST with Content-Length: miniupnpc and most control
    points send it in one segment) is answered from the loop's callbacks, one task only for an
    action that waits; then FIN, and the peer's input is discarded until its EOF (as ``_linger``).
    Anything else (a request in pieces, chunked, 100-continue, GENA, the LAN page) is handed with
    the bytes read so far to the stream path (``_stream``: StreamReader, every deadline and limit
    of the module docstring)."""

    __slots__ = ("srv", "sock", "fd", "peer", "buf", "phase", "held", "reads", "timer", "out", "loop", "answered")

    def __init__(self, srv: UpnpHttpServer, sock: socket.socket, peer: str) -> None:
        self.srv = srv
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.buf = b""
        self.phase = _WAIT
        self.held = True  # holds a fairness slot until it ends
        self.reads = 0
        self.timer: Deadline | None = None
        self.out = b""
        self.loop = asyncio.get_running_loop()
        self.answered = False  # told fairness (a serial client's next connection is not a parallel one)

    def start(self) -> bool:
        """Read the request if it is there already, else wait for it; False if it was answered."""
        self._read()
        if self.phase != _WAIT:
            return False
        self.loop.add_reader(self.fd, self._read)
        self.timer = self.srv.read_deadlines.call_later(self._read_timeout)
        return True

    def _read(self) -> None:
        try:
            data = self.sock.recv(MAX_HEADER + MAX_BODY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset: nobody left to answer
            self._close()
            return
        if self.phase == _WAIT:
            if not data:  # a port scan or a liveness probe (docs/upnp.md "Tolerances")
                log.debug("http %s: closed without a request", self.peer)
                self._close()
                return
            self._stop_reading()
            self.buf, self.phase = data, _BUSY
            try:
                handled = self.srv._fast(self)
            except Exception as exc:  # the guard (shared/guard.py): answered 400, logged once (rate limited)
                self.srv.guard.unexpected(self.peer, exc)
                self.answer(400, {}, b"")
                return
            if not handled:
                self._to_stream()
        elif self.phase == _LINGER:
            self.reads += 1
            if not data or self.reads >= LINGER_READS:
                self._close()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _stop_reading(self) -> None:
        self._stop_timer()
        self.loop.remove_reader(self.fd)

    def _read_timeout(self) -> None:
        self.timer = None
        if self.phase == _WAIT:
            self.loop.remove_reader(self.fd)
            self.phase = _BUSY
            self.answer(408, {}, b"")

    def too_slow(self, task: asyncio.Task[None]) -> None:
        """The action's deadline: it is cancelled (as asyncio.timeout would) and answered 408."""
        self.timer = None
        task.cancel()
        self.answer(408, {}, b"")

    def answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        """Send the answer (Connection: close), then linger for the peer's EOF."""
        if self.phase != _BUSY:
            return
        self._stop_timer()  # the action's deadline
        self.answered = True
        self.srv.fair.answered(self.peer)
        data = _answer_bytes(status, headers, body)
        try:
            # MSG_MORE: the shutdown in _linger puts the FIN on the answer's last segment, so
            # the control point gets answer and EOF in one packet rather than two
            sent = self.sock.send(data, socket.MSG_MORE)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close()
            return
        if sent < len(data):  # the socket buffer is full: the rest when it drains, within the deadline
            self.out, self.phase = data[sent:], _SENDING
            self.loop.add_writer(self.fd, self._write_more)
            self.timer = self.srv.request_deadlines.call_later(self._close)
            return
        self._linger()

    def _write_more(self) -> None:
        try:
            sent = self.sock.send(self.out, socket.MSG_MORE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        self.out = self.out[sent:]
        if not self.out:
            self.loop.remove_writer(self.fd)
            self._stop_timer()
            self._linger()

    def _linger(self) -> None:
        """FIN, then read and discard until the peer's EOF, bounded (see ``_linger`` above)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close()
            return
        self.phase = _LINGER
        self.loop.add_reader(self.fd, self._read)
        self.timer = self.srv.lingers.call_later(self._close)

    def _close(self) -> None:
        if self.phase == _DONE:
            return
        self._stop_timer()
        self.loop.remove_reader(self.fd)
        if self.phase == _SENDING:
            self.loop.remove_writer(self.fd)
        self.phase = _DONE
        self.sock.close()
        if self.held:
            self.held = False
            self.srv.fair.release(self.peer, self.answered)

    def _to_stream(self) -> None:
        """Hand the connection (and its fairness slot) to the stream path with what was read."""
        self.phase, self.held = _DONE, False
        srv, peer = self.srv, self.peer
        srv._spawn(srv._adopt(self.sock, self.buf, lambda r, w: srv._stream(r, w, peer), peer))


def _parse_head(raw: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, target, headers with lower-case names) of a request head; the Host checks."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "bad request line")
    method, path, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(400, "bad header line")
        headers[name.strip().lower()] = value.strip()
    host = headers.get("host")
    if host is None and version != "HTTP/1.0":  # RFC 7230 §5.4: HTTP/1.1 requires Host
        raise HttpError(400, "no Host header")
    if host is not None and not _HOST.match(host):
        raise HttpError(403, f"Host {host[:64]!r} is not an IP literal")
    return method, path, headers
