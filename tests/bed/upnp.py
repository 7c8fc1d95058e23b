"""UPnP helpers for the namespace tests: SOAP actions from the LAN host, reading their answers,
and an event sink for GENA NOTIFYs."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable

from tests.bed import testbed as tb
from tests.bed.fixtures import soap_call
from tests.bed.stack import Stack

WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
HOOKS = os.path.join(os.path.dirname(__file__), "..", "..", "packaging", "hooks")


def map_args(ext: int, internal: int, proto: str = "TCP", lease: int = 0, desc: str = "iwf") -> dict[str, str]:
    """AddPortMapping's arguments for the LAN host."""
    return {"NewRemoteHost": "", "NewExternalPort": str(ext), "NewProtocol": proto,
            "NewInternalPort": str(internal), "NewInternalClient": tb.LAN_HOST_IP, "NewEnabled": "1",
            "NewPortMappingDescription": desc, "NewLeaseDuration": str(lease)}


def error_code(body: bytes) -> int | None:
    """The UPnP errorCode of a SOAP fault, or None."""
    m = re.search(rb"<errorCode>(\d+)</errorCode>", body)
    return int(m.group(1)) if m else None


def out_value(body: bytes, name: str) -> str | None:
    """An out argument of a SOAP answer, or None."""
    m = re.search(rb"<%s>([^<]*)</%s>" % (name.encode(), name.encode()), body)
    return m.group(1).decode() if m else None


def add(st: Stack, ext: int, internal: int, proto: str = "TCP", lease: int = 0, any_port: bool = False,
        service: str = WANIP1) -> tuple[int, bytes]:
    """AddPortMapping (or AddAnyPortMapping) from the LAN host; (HTTP status, body)."""
    action = "AddAnyPortMapping" if any_port else "AddPortMapping"
    return soap_call(st, action, map_args(ext, internal, proto, lease), service=WANIP2 if any_port else service)


def listing(st: Stack, limit: int = 100) -> list[tuple[int, str, int]]:
    """The mappings a control point lists: (external port, internal client, internal port)
    from GetGenericPortMappingEntry, index 0 up until 713 (at most ``limit``)."""
    out: list[tuple[int, str, int]] = []
    for i in range(limit):  # bounded
        status, body = soap_call(st, "GetGenericPortMappingEntry", {"NewPortMappingIndex": str(i)})
        if status != 200:
            assert error_code(body) == 713, body
            return out
        out.append((int(out_value(body, "NewExternalPort") or 0), out_value(body, "NewInternalClient") or "",
                    int(out_value(body, "NewInternalPort") or 0)))
    return out


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    """Poll ``cond`` until true or ``timeout`` seconds passed (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


EVENT_SINK = r"""
import json, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(16)
print(json.dumps({"ready": True}), flush=True)
while True:
    conn, _ = srv.accept(); conn.settimeout(5)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            data += conn.recv(4096)
        head, _, body = data.partition(b"\r\n\r\n")
        n = int(next((l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")), b"0"))
        while len(body) < n:
            body += conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        lines = head.decode().split("\r\n")
        h = {k.strip().upper(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        print(json.dumps({"line": lines[0], "h": h, "body": body.decode()}), flush=True)
    except Exception as e:
        print(json.dumps({"error": str(e)}), flush=True)
    conn.close()
"""


class Sink:
    """An HTTP listener on the LAN host recording NOTIFY requests (one JSON line each)."""

    def __init__(self, bed: tb.Testbed, port: int) -> None:
        self.proc = bed.popen("lan", [sys.executable, "-c", EVENT_SINK, tb.LAN_HOST_IP, str(port)],
                              stdout=subprocess.PIPE)
        self.buf = b""
        assert json.loads(self.next(5) or "{}").get("ready")

    def next(self, timeout: float) -> str | None:
        """The next line, reading the pipe unbuffered so select() sees what is pending."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def event(self, timeout: float = 5) -> dict | None:
        line = self.next(timeout)
        return json.loads(line) if line else None


def props(body: str) -> dict[str, str]:
    """The evented variables of a GENA NOTIFY body."""
    return dict(re.findall(r"<e:property><(\w+)>(.*?)</\1></e:property>", body))
