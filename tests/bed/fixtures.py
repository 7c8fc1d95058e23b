"""Fixtures (a pytest plugin) and helpers: the namespace test bed and igdpcp's daemons on it.

Loaded by tests/conftest.py as a plugin; the daemons are stopped and the bed torn
down when the test ends, pass or fail.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any
from xml.sax.saxutils import escape

import pytest

from tests.bed.stack import Stack
from tests.bed.testbed import MINIUPNPD, Testbed, netns_available

WANIP = "urn:schemas-upnp-org:service:WANIPConnection:1"


@functools.cache
def netns_skip_reason() -> str | None:
    """Why namespace tests cannot run here (not root, no ``ip netns``), or None; asked once."""
    return netns_available()


@pytest.fixture
def make_testbed() -> Iterator[Callable[..., Testbed]]:
    """Factory: ``make_testbed(start_nat2=True, **Testbed_kwargs)`` returns a set-up bed
    (NAT2's miniupnpd started unless ``start_nat2=False``).  Every bed it made is torn
    down when the test ends, pass or fail."""
    reason = netns_skip_reason()
    if reason:
        pytest.skip(f"netns test bed: {reason}")
    beds: list[Testbed] = []

    def factory(start_nat2: bool = True, **kwargs: Any) -> Testbed:
        if start_nat2 and not os.access(MINIUPNPD, os.X_OK):
            pytest.skip(f"{MINIUPNPD} not installed (miniupnpd-nftables)")
        bed = Testbed(**kwargs)
        beds.append(bed)
        bed.setup()
        if start_nat2:
            bed.start_nat2()
        return bed

    try:
        yield factory
    finally:
        for bed in reversed(beds):
            bed.teardown()


@pytest.fixture
def testbed(make_testbed: Callable[..., Testbed]) -> Testbed:
    """A fresh bed for one test, NAT2 running with default lifetimes (120..86400 s)."""
    return make_testbed()


def ipv6_stack(before: Callable[[Testbed], None] | None = None, nat2: bool = False,
               **stack_kwargs: Any) -> Iterator[Stack]:
    """Body of a module-scoped fixture: natd and controld on one IPv6 bed (``Testbed(ipv6=True)``),
    ``before(bed)`` run between the bed's set-up and the daemons' start, NAT2 started if asked;
    skipped where the bed cannot run, everything torn down at the end."""
    reason = netns_skip_reason()
    if reason:
        pytest.skip(f"netns test bed: {reason}")
    bed = Testbed(ipv6=True)
    stack = Stack(bed, **stack_kwargs)
    try:
        bed.setup()
        if before is not None:
            before(bed)
        if nat2:
            bed.start_nat2()
        stack.start()
        yield stack
    finally:
        stack.close()
        bed.teardown()


@pytest.fixture
def make_stack(make_testbed: Callable[..., Testbed]) -> Iterator[Callable[..., Stack]]:
    """Factory: ``make_stack(layout="router"|"split", mode=..., controld_args=[...],
    bed_kwargs={...})`` builds a bed with NAT2 running and starts natd and controld in it."""
    stacks: list[Stack] = []

    def factory(layout: str = "router", mode: str = "auto", controld_args: list[str] | None = None,
                natd_args: list[str] | None = None, bed_kwargs: dict[str, Any] | None = None) -> Stack:
        bed = make_testbed(**(bed_kwargs or {}))
        st = Stack(bed, layout=layout, mode=mode, controld_args=controld_args or [], natd_args=natd_args or [])
        stacks.append(st)
        st.start()
        return st

    try:
        yield factory
    finally:
        for st in stacks:
            st.close()


def soap_call(st: Stack, action: str, args: dict[str, str] | None = None, raw: bytes | None = None,
              service: str = WANIP, path: str = "/ctl/WANIPCn", timeout: float = 30,
              ns: str = "lan") -> tuple[int, bytes]:
    """POST one SOAP action from namespace ``ns`` (the LAN host); returns (HTTP status, body)."""
    if raw is None:
        inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in (args or {}).items())
        raw = ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
               's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
               f'<u:{action} xmlns:u="{service}">{inner}</u:{action}></s:Body></s:Envelope>').encode()
    code = ("import http.client,sys\n"
            "c=http.client.HTTPConnection(sys.argv[1],5000,timeout=float(sys.argv[4]))\n"
            "body=sys.stdin.buffer.read()\n"
            "c.request('POST',sys.argv[2],body=body,headers={'SOAPACTION':sys.argv[3],"
            "'Content-Type':'text/xml; charset=\"utf-8\"'})\n"
            "r=c.getresponse();sys.stdout.buffer.write(str(r.status).encode()+b'\\n'+r.read())\n")
    import subprocess

    res = subprocess.run(["ip", "netns", "exec", st.bed.ns(ns), "python3", "-c", code, st.controld_ip, path,
                          f'"{service}#{action}"', str(timeout)], input=raw, capture_output=True,
                         timeout=timeout + 5)
    head, _, body = res.stdout.partition(b"\n")
    if not head.isdigit():
        raise AssertionError(f"no HTTP answer: {res.stderr.decode(errors='replace')[-500:]}")
    return int(head), body


# --- raw TCP/UDP from inside a bed namespace (UPnP hardening, SSDP and GENA tests) -------------

_RELAY = r"""
import json, select, socket, sys, time
for line in sys.stdin:
    q = json.loads(line)
    out = {"data": "", "error": "", "datagrams": [], "elapsed": 0.0}
    t0 = time.monotonic()
    try:
        if q["op"] == "tcp":
            s = socket.socket()
            if q.get("source"):
                s.bind((q["source"], 0))
            s.settimeout(q["timeout"])
            s.connect((q["host"], q["port"]))
            data = bytes.fromhex(q["data"])
            for i, chunk in enumerate(q.get("chunks") or [len(data)]):
                s.sendall(data[sum((q.get("chunks") or [])[:i]):][:chunk])
                if q.get("pause"):
                    time.sleep(q["pause"])
            got = b""
            deadline = time.monotonic() + q["timeout"]
            while len(got) < 1 << 20 and time.monotonic() < deadline:
                try:
                    b = s.recv(65536)
                except (socket.timeout, ConnectionResetError) as e:
                    out["error"] = type(e).__name__
                    break
                if not b:
                    break
                got += b
            out["data"] = got.hex()
            s.close()
        elif q["op"] == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
            s.bind((q.get("source") or "0.0.0.0", 0))
            for _ in range(q.get("repeat", 1)):
                s.sendto(bytes.fromhex(q["data"]), (q["host"], q["port"]))
            deadline = time.monotonic() + q["timeout"]
            while len(out["datagrams"]) < 4096:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([s], [], [], left)[0]:
                    break
                d, a = s.recvfrom(4096)
                out["datagrams"].append([a[0], d.hex()])
            s.close()
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["elapsed"] = time.monotonic() - t0
    print(json.dumps(out), flush=True)
"""


class NsClient:
    """A long-lived helper process in a bed namespace that sends raw TCP requests (one per
    connection, reads until close) and UDP datagrams (collecting answers), so tests can throw
    many malformed requests without one process start each. Every call is bounded."""

    def __init__(self, bed: Any, ns: str = "lan") -> None:
        import subprocess
        import sys

        self.proc = bed.popen(ns, [sys.executable, "-c", _RELAY], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def _ask(self, q: dict[str, Any], timeout: float) -> dict[str, Any]:
        import json
        import select

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(q) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 10)
        if not ready:
            raise AssertionError(f"namespace client gave no answer within {timeout + 10} s")
        return json.loads(self.proc.stdout.readline())

    def tcp(self, host: str, port: int, data: bytes, timeout: float = 5.0, source: str | None = None,
            chunks: list[int] | None = None, pause: float = 0.0) -> tuple[bytes, str, float]:
        """Send ``data`` (optionally in ``chunks`` with ``pause`` between them); returns
        (everything received until close or ``timeout``, error name or "", seconds taken)."""
        out = self._ask({"op": "tcp", "host": host, "port": port, "data": data.hex(), "timeout": timeout,
                         "source": source, "chunks": chunks, "pause": pause},
                        timeout + pause * len(chunks or [1]))
        return bytes.fromhex(out["data"]), out["error"], out["elapsed"]

    def udp(self, host: str, port: int, data: bytes, listen: float = 1.5, source: str | None = None,
            repeat: int = 1) -> list[tuple[str, bytes]]:
        """Send one datagram (``repeat`` times) and collect answers for ``listen`` seconds."""
        out = self._ask({"op": "udp", "host": host, "port": port, "data": data.hex(), "timeout": listen,
                         "source": source, "repeat": repeat}, listen)
        return [(a, bytes.fromhex(d)) for a, d in out["datagrams"]]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except Exception:
            self.proc.kill()


def http_request(method: str, path: str, host: str, headers: dict[str, str] | None = None,
                 body: bytes = b"") -> bytes:
    """Raw HTTP/1.1 request bytes (Host first, Content-Length when there is a body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def soap_envelope(action: str, args: dict[str, str] | None = None, service: str = WANIP) -> bytes:
    """A SOAP envelope for ``action`` with ``args`` (values escaped)."""
    inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in (args or {}).items())
    return ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action} xmlns:u="{service}">{inner}</u:{action}></s:Body></s:Envelope>').encode()
