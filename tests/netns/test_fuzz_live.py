"""Fuzz the running daemons through their public interfaces (issue 14): SOAP/HTTP, GENA and SSDP
from a LAN host, PCP forged at natd's WAN side, PCP and NAT-PMP at the LAN server (when one
listens), and hostile messages at natd's ZeroMQ RPC socket.

Hypothesis generates the cases (structured requests, byte mutations of valid ones, raw
bytes); they go out in batches from a namespace helper, each judged by what comes back:
an HTTP answer for every TCP case (a connection closed without one is a crash of that
handler; no answer in time is a hang), a reply for every RPC message, and throughout a
normal client served (its p99 reported). A daemon that dies is a crash.

CI runs a slice of a few hundred cases per target (seconds). The long run,
``IGDPCP_FUZZ=long ./scripts/test tests/netns/test_fuzz_live.py -s`` (or ``scripts/fuzz``),
runs 100,000 cases per target (``IGDPCP_FUZZ_CASES`` overrides) and prints one line per
target: cases, crashes, hangs, p99 of the normal request. Inputs that crashed a daemon are
printed and kept below as ``SEEDS`` (explicit regression cases, always sent first).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from shared import pcp
from tests.netns import faults_helpers as h

pytestmark = pytest.mark.netns

LONG = os.environ.get("IGDPCP_FUZZ") == "long"
CASES = int(os.environ.get("IGDPCP_FUZZ_CASES", 100_000 if LONG else 300))
BATCH = 400
TCP_TIMEOUT = 8.0  # over controld's 5 s read deadline: a case answered later is a hang

# Crash seeds found by this fuzzer (and issue 14's): sent first, every run.
SEEDS: dict[str, list[bytes]] = {
    "http": [h.encoded_soap("GetStatusInfo", e) for e in ("x-unknown", "rot13")],  # issue 14 item 1
}


@dataclass
class Report:
    """What one target's run saw."""

    target: str
    cases: int = 0
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    normal: list[float] = field(default_factory=list)  # seconds taken by the normal request
    normal_failed: int = 0

    def line(self) -> str:
        p99 = h.p99(self.normal)
        return (f"fuzz {self.target}: cases={self.cases} crashes={len(self.crashes)} hangs={len(self.hangs)} "
                f"normal-request p99={p99 * 1000:.1f} ms (n={len(self.normal)}, failed={self.normal_failed})")

    def finish(self) -> None:
        """Print the figures (and keep them in $IGDPCP_FUZZ_REPORT), then assert none broke."""
        print(self.line())
        out = os.environ.get("IGDPCP_FUZZ_REPORT")
        if out:
            with open(out, "a") as f:
                f.write(json.dumps({"target": self.target, "cases": self.cases, "crashes": self.crashes[:50],
                                    "hangs": self.hangs[:50], "p99": h.p99(self.normal)}) + "\n")
        assert not self.crashes and not self.hangs and not self.normal_failed, (
            self.line(), self.crashes[:5], self.hangs[:5])


def generate(strategy: st.SearchStrategy[bytes], n: int) -> list[bytes]:
    """``n`` cases drawn by hypothesis (generation only: the daemon's verdict is not known
    per draw, so nothing to shrink)."""
    out: list[bytes] = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(case: bytes) -> None:
        out.append(case)

    draw()
    return out


def batches(cases: list[bytes], size: int = BATCH) -> list[list[bytes]]:
    """``cases`` in slices of ``size``; the normal request is timed between slices."""
    return [cases[i:i + size] for i in range(0, len(cases), size)]


# ------------------------------------------------------------------ strategies
_TEXT = st.text(st.characters(codec="latin-1"), max_size=40)
_TOKEN = st.one_of(st.sampled_from(["", "0", "-1", "99999999999", "1e9", "\t", "%00", "../..", "é", "\n", "\r\n "]),
                   _TEXT)
_ACTIONS = ["GetStatusInfo", "GetExternalIPAddress", "AddPortMapping", "DeletePortMapping",
            "GetGenericPortMappingEntry", "GetSpecificPortMappingEntry", "AddAnyPortMapping",
            "GetListOfPortMappings", "DeletePortMappingRange", "SetConnectionType", "QueryStateVariable"]
_ARGS = ["NewRemoteHost", "NewExternalPort", "NewProtocol", "NewInternalPort", "NewInternalClient", "NewEnabled",
         "NewPortMappingDescription", "NewLeaseDuration", "NewPortMappingIndex", "NewStartPort", "NewEndPort",
         "NewManage", "NewNumberOfPorts", "varName"]


@st.composite
def _soap_body(draw: Callable[..., Any]) -> bytes:
    action = draw(st.sampled_from(_ACTIONS))
    args = draw(st.dictionaries(st.sampled_from(_ARGS), _TOKEN, max_size=8))
    service = draw(st.sampled_from([h.WANIP1, h.WANIP2, "urn:schemas-upnp-org:control-1-0",
                                    "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1", "x"]))
    body = h.soap_envelope(action, args, service)
    enc = draw(st.one_of(st.none(), st.sampled_from(["utf-8", "UTF-16", "latin-1", "ascii", "utf-32"]), _TEXT))
    if enc is not None:
        body = body.replace(b'version="1.0"', f'version="1.0" encoding="{enc}"'.encode("latin-1"))
    return body


@st.composite
def _mutated(draw: Callable[..., Any], samples: list[bytes]) -> bytes:
    buf = bytearray(draw(st.sampled_from(samples)))
    for pos, byte in draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)):
        buf[pos % len(buf)] = byte
    if draw(st.booleans()):
        del buf[draw(st.integers(1, len(buf))):]
    return bytes(buf)


def _request(method: str, target: str, headers: list[tuple[str, str]], body: bytes, version: str) -> bytes:
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + body


@st.composite
def _http(draw: Callable[..., Any], paths: list[str], methods: list[str], names: list[str]) -> bytes:
    method = draw(st.one_of(st.sampled_from(methods), _TEXT))
    target = draw(st.one_of(st.sampled_from(paths), _TEXT.map(lambda t: "/" + t)))
    body = draw(st.one_of(_soap_body(), st.binary(max_size=300), st.just(b"")))
    headers = [("Host", draw(st.sampled_from([h.HOST, h.HOST, "", "x.example", h.tb.ROUTER_LAN_IP])))]
    headers += draw(st.lists(st.tuples(st.sampled_from(names), _TOKEN), max_size=6))
    if draw(st.integers(0, 3)):
        headers.append(("Content-Length", str(len(body))))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1", ""]))
    return _request(method, target, headers, body, version)


_HTTP_NAMES = ["SOAPACTION", "Content-Type", "Content-Length", "Transfer-Encoding", "Expect", "User-Agent",
               "Connection", "X"]
_GENA_NAMES = ["CALLBACK", "NT", "TIMEOUT", "SID", "Content-Length", "Host", "STATEVAR"]
_HTTP_VALID = [h.get_root(),
               h.encoded_soap("GetStatusInfo", "utf-8"),
               h.add_request(8080, 80)]
HTTP = st.one_of(_http(["/rootDesc.xml", "/ctl/WANIPCn", "/ctl/WANCommonIFC1", "/WANIPCn.xml", "*", "http://x/"],
                       ["GET", "POST", "HEAD", "PUT", "M-POST"], _HTTP_NAMES),
                 _mutated(_HTTP_VALID), st.binary(min_size=1, max_size=400))

_GENA_VALID = [_request("SUBSCRIBE", "/evt/WANIPCn", [("Host", h.HOST), ("CALLBACK", f"<http://{h.LAN}:9/>"),
                                                     ("NT", "upnp:event"), ("TIMEOUT", "Second-1800")], b"",
                        "HTTP/1.1"),
               _request("UNSUBSCRIBE", "/evt/WANIPCn", [("Host", h.HOST), ("SID", "uuid:0")], b"", "HTTP/1.1")]
GENA = st.one_of(_http(["/evt/IPConn", "/evt/WANIPCn", "/evt/CmnIfCfg", "/evt/L3F"], ["SUBSCRIBE", "UNSUBSCRIBE"],
                       _GENA_NAMES), _mutated(_GENA_VALID))

_MSEARCH = (b'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\nMX: 1\r\n'
            b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n")


@st.composite
def _ssdp(draw: Callable[..., Any]) -> bytes:
    fields = [("HOST", draw(st.sampled_from(["239.255.255.250:1900", "", "x"]))),
              ("MAN", draw(st.sampled_from(['"ssdp:discover"', "ssdp:discover", "", '"x"']))),
              ("MX", draw(_TOKEN)), ("ST", draw(st.one_of(st.sampled_from(
                  ["ssdp:all", "upnp:rootdevice", "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
                   "uuid:", "urn:schemas-upnp-org:service:WANIPConnection:9"]), _TEXT)))]
    fields += draw(st.lists(st.tuples(st.sampled_from(["USER-AGENT", "CPFN.UPNP.ORG", "TCPPORT.UPNP.ORG", "X"]),
                                      _TOKEN), max_size=3))
    start = draw(st.sampled_from(["M-SEARCH * HTTP/1.1", "NOTIFY * HTTP/1.1", "M-SEARCH *", "GET / HTTP/1.1"]))
    return (start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n").encode("latin-1")


SSDP = st.one_of(_ssdp(), _mutated([_MSEARCH]), st.binary(min_size=1, max_size=600))


@st.composite
def _pcp_response(draw: Callable[..., Any]) -> bytes:
    version = draw(st.sampled_from([2, 2, 2, 1, 0, 3]))
    opcode = draw(st.sampled_from([0x81, 0x80, 0x82, 0x01, 0x83, draw(st.integers(0, 255))]))
    head = bytes([version, opcode, 0, draw(st.integers(0, 30))])
    head += draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big") + draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    head += bytes(12)
    body = b""
    if opcode & 0x7F in (1, 2):
        body = (draw(st.binary(min_size=12, max_size=12)) + bytes([draw(st.sampled_from([6, 17, 0, 1]))]) + bytes(3)
                + draw(st.integers(0, 65535)).to_bytes(2, "big") + draw(st.integers(0, 65535)).to_bytes(2, "big")
                + bytes(10) + b"\xff\xff" + bytes([198, 20, 0, 1]))
    opts = draw(st.binary(max_size=40))
    return (head + body + opts)[:draw(st.integers(1, 1100))]


PCP = st.one_of(_pcp_response(), st.binary(min_size=1, max_size=1100))
NATPMP = st.one_of(st.builds(lambda op, rest: bytes([0, op]) + rest, st.integers(0, 255), st.binary(max_size=12)),
                   st.binary(min_size=1, max_size=64))

_OPS = ["hello", "bind", "unbind", "pcp.send", "sync", "counters", "ok", "error", "pcp.rx", "wan", "x"]
_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), _TEXT, st.binary(max_size=20)),
                      lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)),
                      max_leaves=10)
ZMQ = st.one_of(
    st.builds(lambda op, rid, fields: msgpack.packb({"v": 1, "op": op, "id": rid, **fields}, use_bin_type=True),
              st.sampled_from(_OPS), st.one_of(st.integers(0, 2**31), st.none(), _TEXT),
              st.dictionaries(st.sampled_from(["mid", "proto", "lan_ip", "lan_port", "want_port", "exact", "server",
                                               "packet", "bindings", "deadline", "v"]), _VALUE, max_size=6)),
    _VALUE.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.binary(min_size=1, max_size=300))


# ------------------------------------------------------------------ runners
def _normal_get(stack: h.Stack, report: Report, cp: h.ControlPoint) -> None:
    t0 = time.monotonic()
    status, _ = cp.soap("GetExternalIPAddress", timeout=5)
    report.normal.append(time.monotonic() - t0)
    report.normal_failed += status != 200


def _natd_hello(c: h.NatdClient, report: Report) -> None:
    """natd's normal request (Hello over its RPC socket), timed; a failure counts as a crash."""
    try:
        report.normal.append(h.natd_hello(c))
    except Exception as exc:  # noqa: BLE001  (any failure to answer is the finding)
        report.normal_failed += 1
        report.crashes.append(f"natd Hello failed: {exc}")


# ------------------------------------------------------------------ targets
def test_fuzz_soap_http(igd, control_point) -> None:
    stack = igd()
    report = Report("soap-http")
    cases = SEEDS["http"] + generate(HTTP, CASES)
    _fuzz_tcp_with_normal(stack, report, cases, control_point(stack.bed, "ctl", h.OTHER_LAN))
    report.finish()


def test_fuzz_gena(igd, control_point) -> None:
    stack = igd()
    report = Report("gena")
    _fuzz_tcp_with_normal(stack, report, generate(GENA, CASES), control_point(stack.bed, "ctl", h.OTHER_LAN))
    report.finish()


def _fuzz_tcp_with_normal(stack: h.Stack, report: Report, cases: list[bytes], cp: h.ControlPoint) -> None:
    """TCP cases in batches; between batches the normal client (another LAN host) is timed."""
    for chunk in batches(cases):
        t0 = time.monotonic()
        res = h.agent(stack.bed, "lan", {"op": "fuzz_tcp", "host": h.tb.ROUTER_LAN_IP, "port": h.HTTP_PORT,
                                         "data": [c.hex() for c in chunk], "concurrency": 16,
                                         "timeout": TCP_TIMEOUT, "limit": 3600}, timeout=3600)["results"]
        report.cases += len(chunk)
        for case, (status, _took) in zip(chunk, res, strict=True):
            if status == 0:
                report.crashes.append(case.hex())
            elif status == -1:
                report.hangs.append(case.hex())
        for _ in range(max(1, int(time.monotonic() - t0))):  # about one normal request per second of fuzzing
            _normal_get(stack, report, cp)
        if stack.procs["controld"].poll() is not None:
            report.crashes.append("controld died")
            return


def test_fuzz_ssdp(igd, control_point) -> None:
    stack = igd()
    report = Report("ssdp")
    cp = control_point(stack.bed, "ctl", h.OTHER_LAN)
    watcher = h.NsClient(stack.bed, "ctl")
    try:
        for chunk in batches(generate(SSDP, CASES), 100):
            for dst in (h.tb.ROUTER_LAN_IP, h.tb.SSDP_GROUP):
                h.agent(stack.bed, "lan", {"op": "fuzz_udp", "host": dst, "port": 1900,
                                           "data": [c.hex() for c in chunk[::2] if dst == h.tb.SSDP_GROUP]
                                           or [c.hex() for c in chunk[1::2]], "interval": 0.0005}, timeout=600)
            report.cases += len(chunk)
            _normal_get(stack, report, cp)
            if stack.procs["controld"].poll() is not None:
                report.crashes.append("controld died")
                break
        # SSDP still answers a well-formed search from another host once the flood is over
        answered = h.wait_for(lambda: watcher.udp(h.tb.ROUTER_LAN_IP, 1900, _MSEARCH, listen=1.0), 10, step=0.5)
        if not answered:
            report.crashes.append("SSDP stopped answering")
    finally:
        watcher.close()
    report.finish()


def test_fuzz_pcp_at_natds_wan_side(igd, control_point) -> None:
    """PCP-shaped and random datagrams, forged from the PCP server's address, at natd's request
    socket and at its ANNOUNCE port; natd's Hello is the normal request."""
    stack = igd()
    report = Report("pcp-wan")
    port = h.natd_wan_port(stack)
    c = h.natd_client(stack)
    try:
        for chunk in batches(generate(PCP, CASES), 100):
            for dst, part in (((h.WAN, port), chunk[::2]), ((h.WAN, h.CLIENT_PORT), chunk[1::2])):
                if part:
                    h.forge(stack.bed, "isp", (h.SERVER, pcp.SERVER_PORT), dst, part, count=len(part))
            report.cases += len(chunk)
            _natd_hello(c, report)
            if stack.procs["natd"].poll() is not None or stack.procs["controld"].poll() is not None:
                report.crashes.append("a daemon died")
                break
    finally:
        c.close()
    report.finish()


@pytest.mark.parametrize("target", ["pcp-lan", "natpmp-lan"])
def test_fuzz_lan_pcp_server(igd, control_point, target: str) -> None:
    """The LAN PCP/NAT-PMP server (UDP 5351 on the router's LAN address), once one listens."""
    stack = igd(controld_args=["--pcp-rate", "100000", "--pcp-burst", "100000"])  # every case parsed, none rate-dropped
    socks = h.udp_listeners(stack.bed, stack.controld_ns, pcp.SERVER_PORT)
    if not any(a.split(":")[0] in (h.tb.ROUTER_LAN_IP, "0.0.0.0", "*") for a in socks):
        pytest.skip("no PCP/NAT-PMP server listens on the LAN yet")
    report = Report(target)
    cp = control_point(stack.bed, "ctl", h.OTHER_LAN)
    for chunk in batches(generate(PCP if target == "pcp-lan" else NATPMP, CASES), 100):
        h.agent(stack.bed, "lan", {"op": "fuzz_udp", "host": h.tb.ROUTER_LAN_IP, "port": pcp.SERVER_PORT,
                                   "data": [c.hex() for c in chunk], "interval": 0.0005}, timeout=600)
        report.cases += len(chunk)
        _normal_get(stack, report, cp)
        if stack.procs["controld"].poll() is not None:
            report.crashes.append("controld died")
            break
    report.finish()


def test_fuzz_natd_rpc(igd) -> None:
    """Hostile single-frame messages at natd's RPC socket: each gets a reply, natd keeps answering Hello."""
    stack = igd()
    report = Report("zmq-rpc")
    c = h.natd_client(stack)
    try:
        for chunk in batches(generate(ZMQ, CASES), 100):
            for case in chunk:
                c.send_raw(case)
                if c.recv_raw(2.0) is None:
                    report.hangs.append(case.hex())
            report.cases += len(chunk)
            _natd_hello(c, report)
            if stack.procs["natd"].poll() is not None:
                report.crashes.append("natd died")
                break
    finally:
        c.close()
    report.finish()
