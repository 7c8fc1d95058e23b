"""SOAP 1.1 for UPnP control, sans-I/O: request bytes in, a parsed action out; replies out.

The parser is expat with every way to expand or fetch anything refused: a DOCTYPE,
an entity declaration or an external entity reference aborts parsing (billion laughs,
XXE). Depth, element count and text size are bounded. Anything malformed is a
:class:`SoapError` which the HTTP layer answers with a 4xx or a UPnP 402 fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.parsers import expat

from controld.upnp.xmltext import escape

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENC = "http://schemas.xmlsoap.org/soap/encoding/"
MAX_DEPTH = 16
MAX_ELEMENTS = 256
MAX_TEXT = 8192

# Quotes (double, or single as some stacks send), blanks inside them; the UDA 1.0 control URN
# (QueryStateVariable) as well as service types. miniupnpd is as lenient (as miniupnpd does).
_SOAPACTION = re.compile(r"^[\"']?\s*(urn:[A-Za-z0-9.-]+:(?:service:[A-Za-z0-9]+:(\d+)|control-1-0))"
                         r"#([A-Za-z0-9_]+)\s*[\"']?$")
CONTROL_URN = "urn:schemas-upnp-org:control-1-0"


class SoapError(ValueError):
    """A request that is not a well-formed UPnP SOAP action."""


class SoapActionError(SoapError):
    """The SOAPACTION header names no action this server could serve (401 Invalid Action)."""


@dataclass(frozen=True)
class SoapAction:
    service_type: str  # e.g. urn:schemas-upnp-org:service:WANIPConnection:1
    version: int  # the service version the control point invoked (1 or 2)
    name: str
    args: dict[str, str]


def parse_soapaction(header: str) -> tuple[str, int, str]:
    """Split a SOAPACTION header into (service type, version, action name)."""
    m = _SOAPACTION.match(header.strip())
    if not m:
        raise SoapActionError(f"bad SOAPACTION header {header[:80]!r}")
    return m.group(1), int(m.group(2) or 1), m.group(3)


def parse_request(body: bytes, soapaction: str) -> SoapAction:
    """Parse a SOAP envelope whose Body holds exactly one action element."""
    service, version, name = parse_soapaction(soapaction)
    p = expat.ParserCreate(namespace_separator=" ")
    stack: list[str] = []
    count = 0
    action: str | None = None
    args: dict[str, str] = {}
    text: list[str] = []
    text_len = 0

    def refuse(*_: object) -> None:
        raise SoapError("DTDs and entities are not accepted")

    def start(tag: str, attrs: dict[str, str]) -> None:
        nonlocal count, action, text, text_len
        count += 1
        if count > MAX_ELEMENTS or len(stack) >= MAX_DEPTH:
            raise SoapError("document too deep or too large")
        depth = len(stack)
        if depth == 0 and tag != f"{SOAP_ENV} Envelope":
            raise SoapError("root element is not a SOAP Envelope")
        if depth == 2 and stack[1] == f"{SOAP_ENV} Body":
            if action is not None:
                raise SoapError("more than one action in Body")
            ns, _, local = tag.rpartition(" ")
            # The service version may differ between header and body (a :1 header with a :2
            # body, as some stacks write it); the service and the action must not.
            if local != name or ns.rsplit(":", 1)[0] != service.rsplit(":", 1)[0]:
                raise SoapError(f"Body element {ns} {local!r} does not match SOAPACTION {service}#{name}")
            action = local
        stack.append(tag)
        text, text_len = [], 0

    def end(tag: str) -> None:
        nonlocal text, text_len
        stack.pop()
        if len(stack) == 3 and action is not None:
            local = tag.rpartition(" ")[2]
            if local in args:
                raise SoapError(f"argument {local} given twice")
            args[local] = "".join(text).strip()
        text, text_len = [], 0

    def chars(data: str) -> None:
        nonlocal text_len
        text_len += len(data)
        if text_len > MAX_TEXT:
            raise SoapError("argument value too long")
        text.append(data)

    p.StartDoctypeDeclHandler = refuse
    p.EntityDeclHandler = refuse
    p.ExternalEntityRefHandler = refuse  # type: ignore[assignment]  # raises, never returns a status
    p.StartElementHandler = start
    p.EndElementHandler = end
    p.CharacterDataHandler = chars
    try:
        p.Parse(body, True)
    except (expat.ExpatError, LookupError, UnicodeError) as exc:  # LookupError: an unknown encoding
        raise SoapError(f"malformed XML: {type(exc).__name__}: {exc}") from None
    if action is None:
        raise SoapError("no action element in the SOAP Body")
    return SoapAction(service, version, name, args)


def envelope(inner: str) -> bytes:
    return ('<?xml version="1.0" encoding="utf-8"?>\r\n'
            f'<s:Envelope xmlns:s="{SOAP_ENV}" s:encodingStyle="{SOAP_ENC}"><s:Body>'
            f"{inner}</s:Body></s:Envelope>\r\n").encode()


class Cdata(str):
    """An out argument sent as CDATA (GetListOfPortMappings: miniupnpc does not decode entities)."""


def _value(v: str | int) -> str:
    if isinstance(v, Cdata):
        # a "]]>" inside is split across two sections, so the document stays well-formed
        return "<![CDATA[" + v.replace("]]>", "]]]]><![CDATA[>") + "]]>"
    return escape(str(v))


def response(service_type: str, action: str, out: dict[str, str | int]) -> bytes:
    """The action's response envelope with its out arguments, in order."""
    args = "".join(f"<{k}>{_value(v)}</{k}>" for k, v in out.items())
    return envelope(f'<u:{action}Response xmlns:u="{service_type}">{args}</u:{action}Response>')


def fault(code: int, description: str) -> bytes:
    """A UPnPError fault (sent with HTTP 500)."""
    return envelope(
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{escape(description)}</errorDescription>"
        "</UPnPError></detail></s:Fault>")
