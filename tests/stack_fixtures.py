"""Fixtures and helpers that run igdpcp's daemons on the namespace test bed.

Loaded by tests/conftest.py as a plugin; the daemons are stopped and the bed torn
down when the test ends, pass or fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from xml.sax.saxutils import escape

import pytest

from shared.stack import Stack
from shared.testbed import Testbed

WANIP = "urn:schemas-upnp-org:service:WANIPConnection:1"


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
              service: str = WANIP, path: str = "/ctl/WANIPCn", timeout: float = 30) -> tuple[int, bytes]:
    """POST one SOAP action from the LAN host; returns (HTTP status, body)."""
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

    res = subprocess.run(["ip", "netns", "exec", st.bed.ns("lan"), "python3", "-c", code, st.controld_ip, path,
                          f'"{service}#{action}"', str(timeout)], input=raw, capture_output=True,
                         timeout=timeout + 5)
    head, _, body = res.stdout.partition(b"\n")
    if not head.isdigit():
        raise AssertionError(f"no HTTP answer: {res.stderr.decode(errors='replace')[-500:]}")
    return int(head), body
