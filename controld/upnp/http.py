"""The UPnP HTTP server: descriptions (GET) and SOAP control (POST), LAN only, bounded.

One request per connection (Connection: close), as miniupnpc and most control
points use it. Limits: connections per host and in total (controld.upnp.fairness: one
over them is closed at once), header bytes, body bytes, header and body deadlines and a
deadline per request; anything malformed or over a limit gets a 4xx and the
connection is closed; any other exception is answered 400 (shared/guard.py). Requests
from outside the LAN subnets are dropped, and the Host header must be an IP literal (DNS
rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
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
WEB_MAX_BODY = 8192  # the LAN page's form posts (controld/web)

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


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                headers: dict[str, str], body: bytes, deadline: float) -> None:
    """Write the answer (Connection: close) within ``deadline``, linger, close."""
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"SERVER: {SERVER}",
            "Connection: close", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
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
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0: any); returns the port."""
        self.server = await asyncio.start_server(self._client, host, port, limit=MAX_HEADER, backlog=BACKLOG)
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def _in_lan(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        subnets = self.lan_subnets()
        if subnets != self._subnets:  # parsed once per change, not per connection
            self._subnets, self._nets = list(subnets), [ipaddress.ip_network(n) for n in subnets]
        return any(addr in n for n in self._nets)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        if not self._in_lan(peer):
            writer.close()
            return
        if not self.fair.admit(peer, time.monotonic()):
            await self._refuse(reader, writer)
            return
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
        lines = (await _read_head(reader)).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(400, "bad request line")
        method, path, _ = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(400, "bad header line")
            headers[name.strip().lower()] = value.strip()
        host = headers.get("host")
        if host is None and parts[2] != "HTTP/1.0":  # RFC 7230 §5.4: HTTP/1.1 requires Host
            raise HttpError(400, "no Host header")
        if host is not None and not _HOST.match(host):
            raise HttpError(403, f"Host {host[:64]!r} is not an IP literal")
        if self.web is not None and _normalise(path).split("/")[1] == self.web[0].strip("/"):
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
        service = self.device.services.get(path)
        if service is None:
            raise HttpError(404, f"no control URL {path[:64]}")
        async with asyncio.timeout(READ_DEADLINE):
            body = await _read_body(reader, headers)
        xml_headers = {"Content-Type": 'text/xml; charset="utf-8"', "EXT": ""}
        try:
            action = soap.parse_request(body, headers.get("soapaction", ""))
            if action.service_type == soap.CONTROL_URN:
                return self._query_state_variable(service, action, peer, xml_headers)
            if action.service_type.rsplit(":", 1)[0] != service.type.rsplit(":", 1)[0]:
                raise soap.SoapError(f"{action.service_type} is not served at {path}")
        except soap.SoapActionError as exc:
            log.info("soap %s: %s", peer, exc)
            return 500, xml_headers, soap.fault(401, "Invalid Action")
        except soap.SoapError as exc:
            log.info("soap %s: invalid request: %s", peer, exc)
            return 500, xml_headers, soap.fault(402, "Invalid Args")
        if action.version > service.version:  # a :2 action on an IGD:1 router
            return 500, xml_headers, soap.fault(401, "Invalid Action")
        try:
            out = await self.actions.handle(service, action, peer)
        except UPnPError as exc:
            log.info("soap %s %s: %s", peer, action.name, exc)
            return 500, xml_headers, soap.fault(exc.code, exc.description)
        except Exception:
            log.exception("soap %s %s failed", peer, action.name)
            return 500, xml_headers, soap.fault(501, "Action Failed")
        return 200, xml_headers, soap.response(action.service_type, action.name, out)
