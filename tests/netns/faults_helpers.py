"""Shared pieces (no tests) of the fault, flood, issue-14 regression and fuzz suites.

Everything here works through the daemons' public interfaces only: SOAP/HTTP and SSDP from
LAN hosts, PCP on the wire (forged with raw sockets where a forger would), natd's ZeroMQ
API, signals, the filesystem and the kernel's nft and socket tables. Nothing imports
controld's or natd's internals, so the suites survive a rewrite of either daemon.

The bed is imported here and nowhere else in these suites: when it moves (tests/bed/), the
imports below are the only lines to change.
"""

from __future__ import annotations

import html
import ipaddress
import json
import os
import re
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from natd.client import NatdClient  # natd's public ZeroMQ API client
from shared import pcp, wire
from shared.const import PCP_CLIENT_PORT as CLIENT_PORT
from tests.bed import testbed as tb
from tests.bed.fixtures import NsClient, http_request, soap_envelope
from tests.bed.stack import HTTP_PORT, Stack

__all__ = ["CLIENT_PORT", "HTTP_PORT", "NatdClient", "NsClient", "Stack", "http_request", "soap_envelope", "tb"]

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nsagent.py")
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
HOST = f"{tb.ROUTER_LAN_IP}:{HTTP_PORT}"
LAN = tb.LAN_HOST_IP
OTHER_LAN = tb.CTL_IP  # the ctl namespace is a second LAN host in the router layout
WAN = tb.ROUTER_WAN_IP
SERVER = tb.ISP_INT_IP  # NAT2's PCP server (miniupnpd), the WAN default router
PROBE_COUNTERS = "igdpcp_faults_probe"  # our own table in the provider namespace (counts only)


# ------------------------------------------------------------------ workloads in a namespace
def agent(bed: tb.Testbed, ns: str, q: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Run one nsagent workload in namespace ``ns`` and return its JSON result."""
    res = subprocess.run(["ip", "netns", "exec", bed.ns(ns), sys.executable, AGENT], input=json.dumps(q) + "\n",
                         capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise AssertionError(f"nsagent {q['op']} failed: {res.stderr[-1500:]}")
    return json.loads(lines[-1])


class Background:
    """An nsagent workload running while the test does something else."""

    def __init__(self, bed: tb.Testbed, ns: str, q: dict[str, Any]) -> None:
        self.proc = bed.popen(ns, [sys.executable, AGENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(q) + "\n")
        self.proc.stdin.close()
        self.proc.stdin = None  # communicate() must not touch it again

    def first_line(self, timeout: float = 30.0) -> dict[str, Any]:
        """The workload's first JSON line (e.g. slowloris' "ready"), bounded."""
        import select

        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise AssertionError("workload said nothing")
        return json.loads(self.proc.stdout.readline())

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)  # reads while waiting: results can exceed a pipe
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise AssertionError(f"workload gave no result: {err[-1500:]}")
        return json.loads(lines[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank) of ``values``; inf when there are none."""
    if not values:
        return float("inf")
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def get_root() -> bytes:
    """A normal client's request: the device description."""
    return http_request("GET", "/rootDesc.xml", HOST)


def probe(bed: tb.Testbed, ns: str, duration: float, interval: float = 0.1, data: bytes | None = None,
          timeout: float = 5.0) -> Background:
    """A normal client in ``ns`` asking for the description every ``interval`` s (started now)."""
    return Background(bed, ns, {"op": "probe", "host": tb.ROUTER_LAN_IP, "port": HTTP_PORT,
                                "data": (data or get_root()).hex(), "duration": duration,
                                "interval": interval, "timeout": timeout, "limit": duration + timeout + 10})


# ------------------------------------------------------------------ UPnP control point
def _code(body: bytes) -> int | None:
    m = re.search(rb"<errorCode>(\d+)</errorCode>", body)
    return int(m[1]) if m else None


def _value(body: bytes, name: str) -> str | None:
    m = re.search(rb"<%s>([^<]*)</%s>" % (name.encode(), name.encode()), body)
    return m[1].decode() if m else None


def status_of(resp: bytes) -> int:
    """The HTTP status of a raw answer; 0 when there was none."""
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", resp)
    return int(m[1]) if m else 0


@dataclass
class ControlPoint:
    """A UPnP control point on a LAN host: raw SOAP over a long-lived namespace helper."""

    bed: tb.Testbed
    ns: str = "lan"
    ip: str = LAN
    client: NsClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = NsClient(self.bed, self.ns)

    def soap(self, action: str, args: dict[str, str] | None = None, service: str = WANIP1,
             timeout: float = 30.0) -> tuple[int, bytes]:
        """(HTTP status, body) of one action; status 0 when the connection gave no answer."""
        headers = {"SOAPACTION": f'"{service}#{action}"', "Content-Type": 'text/xml; charset="utf-8"'}
        req = http_request("POST", "/ctl/WANIPCn", HOST, headers, soap_envelope(action, args, service))
        resp = self.client.tcp(tb.ROUTER_LAN_IP, HTTP_PORT, req, timeout=timeout)[0]
        return status_of(resp), resp.partition(b"\r\n\r\n")[2]

    def add(self, ext: int, internal: int, proto: str = "TCP", lease: int = 0) -> tuple[int, int | None]:
        """AddPortMapping for this host; (HTTP status, UPnP error code or None)."""
        status, body = self.soap("AddPortMapping", {
            "NewRemoteHost": "", "NewExternalPort": str(ext), "NewProtocol": proto,
            "NewInternalPort": str(internal), "NewInternalClient": self.ip, "NewEnabled": "1",
            "NewPortMappingDescription": "faults", "NewLeaseDuration": str(lease)})
        return status, _code(body)

    def delete(self, ext: int, proto: str = "TCP") -> tuple[int, int | None]:
        status, body = self.soap("DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": str(ext),
                                                       "NewProtocol": proto})
        return status, _code(body)

    def listing(self, limit: int = 2000) -> list[tuple[str, int, str, int]]:
        """What a control point lists: (proto, external port, internal client, internal port)."""
        out = []
        for i in range(limit):  # bounded
            status, body = self.soap("GetGenericPortMappingEntry", {"NewPortMappingIndex": str(i)})
            if status != 200:
                assert _code(body) == 713, body[:500]
                break
            out.append(((_value(body, "NewProtocol") or "").lower(), int(_value(body, "NewExternalPort") or 0),
                        _value(body, "NewInternalClient") or "", int(_value(body, "NewInternalPort") or 0)))
        return out

    def list_all(self) -> list[tuple[str, int, str, int]]:
        """The whole listing in two requests (IGD:2 GetListOfPortMappings, TCP then UDP);
        the controld must run with ``--igd-version 2``. Same tuples as :meth:`listing`."""
        out = []
        for proto in ("TCP", "UDP"):
            status, body = self.soap("GetListOfPortMappings", {
                "NewStartPort": "1", "NewEndPort": "65535", "NewProtocol": proto, "NewManage": "0",
                "NewNumberOfPorts": "0"}, service=WANIP2)
            if status != 200:
                assert _code(body) == 730, body[:500]  # nothing in that range
                continue
            text = html.unescape(body.decode())
            for e in re.finditer(r"<p:PortMappingEntry>(.*?)</p:PortMappingEntry>", text, re.S):
                f = dict(re.findall(r"<p:(\w+)>([^<]*)</p:\1>", e[1]))
                out.append((f["NewProtocol"].lower(), int(f["NewExternalPort"]), f["NewInternalClient"],
                            int(f["NewInternalPort"])))
        return out

    def close(self) -> None:
        self.client.close()


def add_request(ext: int, internal: int, client: str = LAN, proto: str = "TCP") -> bytes:
    """The raw HTTP request of one AddPortMapping (for workloads sent from a namespace)."""
    headers = {"SOAPACTION": f'"{WANIP1}#AddPortMapping"', "Content-Type": 'text/xml; charset="utf-8"'}
    return http_request("POST", "/ctl/WANIPCn", HOST, headers, soap_envelope("AddPortMapping", {
        "NewRemoteHost": "", "NewExternalPort": str(ext), "NewProtocol": proto, "NewInternalPort": str(internal),
        "NewInternalClient": client, "NewEnabled": "1", "NewPortMappingDescription": "faults",
        "NewLeaseDuration": "0"}))


def encoded_soap(action: str, encoding: str) -> bytes:
    """A raw SOAP request whose XML declaration names ``encoding`` (issue 14 item 1)."""
    body = soap_envelope(action).replace(b'version="1.0"', f'version="1.0" encoding="{encoding}"'.encode("latin-1"))
    headers = {"SOAPACTION": f'"{WANIP1}#{action}"', "Content-Type": "text/xml"}
    return http_request("POST", "/ctl/WANIPCn", HOST, headers, body)


def adds(bed: tb.Testbed, ports: list[int], offset: int = 1000, ns: str = "lan", interval: float = 0.0) -> Background:
    """AddPortMapping for each external port (internal port + ``offset``), one after another,
    from the LAN host, while the test does something else. ``.result()["results"][i][0]``
    is the i-th answer's HTTP status (200: acknowledged; 0: no answer). ``interval``: at most
    one add started per that many seconds."""
    return Background(bed, ns, {"op": "requests", "host": tb.ROUTER_LAN_IP, "port": HTTP_PORT,
                                "data": [add_request(p, p + offset).hex() for p in ports], "timeout": 15,
                                "interval": interval,
                                "limit": 600})


def acknowledged(ports: list[int], res: dict[str, Any]) -> list[int]:
    """The ports whose AddPortMapping was answered 200."""
    return [p for p, (status, _, _) in zip(ports, res["results"], strict=True) if status == 200]


def flow(bed: tb.Testbed, lan_port: int, ext_port: int, duration: float) -> tuple[Background, Background]:
    """One TCP flow from the Internet host through NAT2 and NAT1 to the LAN host: a chunk
    every 10 ms for ``duration`` s. Returns (sink, source); ``.result()`` each when done."""
    sink = Background(bed, "lan", {"op": "sink", "port": lan_port, "duration": duration + 3})
    sink.first_line(10)
    src = Background(bed, "inet", {"op": "source", "host": tb.NAT2_PUBLIC_IP, "port": ext_port,
                                   "duration": duration, "interval": 0.01, "chunk": 100})
    return sink, src


# ------------------------------------------------------------------ NAT1, NAT2, table
def nat2_map(bed: tb.Testbed) -> dict[tuple[str, int], tuple[str, int]]:
    """NAT2's (miniupnpd's) DNAT rules: {(proto, external port): (internal ip, internal port)}."""
    return {(r.proto, r.ext_port): (r.int_ip, r.int_port) for r in bed.nat2_dnat_rules()}


def table_rows(st: Stack) -> list[dict[str, Any]] | None:
    """controld's SQLite table read-only (None when the file is not there or unreadable)."""
    path = os.path.join(st.bed.path("state"), "mappings.sqlite3")
    if not os.path.exists(path):
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM mappings")]
        finally:
            db.close()
    except sqlite3.Error:
        return None


def agreement(st: Stack, cp: ControlPoint, wan: str = WAN,
              fast: bool = False) -> tuple[list[tuple[str, int, str, int]], list[str]]:
    """(the listing, every disagreement between it, NAT1 and NAT2): a mapping listed for
    (proto, port) -> (host, port) must have NAT2 forward that port to (WAN, p) and NAT1
    forward (proto, p) to (host, port); neither NAT may forward anything unlisted. ``fast``
    lists with IGD:2 GetListOfPortMappings (controld started with ``--igd-version 2``)."""
    listed = cp.list_all() if fast else cp.listing()
    nat1, nat2 = st.nat1_forwards(), nat2_map(st.bed)
    problems = []
    if len(set((p, e) for p, e, _, _ in listed)) != len(listed):
        problems.append(f"a port listed twice: {sorted(listed)}")
    used1 = set()
    for proto, ext, ip, port in listed:
        up = nat2.get((proto, ext))
        if up is None:
            problems.append(f"{proto}/{ext} listed, not in NAT2")
            continue
        if up[0] != wan:
            problems.append(f"{proto}/{ext}: NAT2 forwards to {up}")
            continue
        used1.add((proto, up[1]))
        if nat1.get((proto, up[1])) != (ip, port):
            problems.append(f"{proto}/{ext}: NAT2 -> {up}, NAT1 has {nat1.get((proto, up[1]))}, listed {ip}:{port}")
    extra2 = {k: v for k, v in nat2.items() if v[0] == wan and (k[0], k[1]) not in {(p, e) for p, e, _, _ in listed}}
    if extra2:
        problems.append(f"in NAT2, not listed: {sorted(extra2)}")
    extra1 = {k: v for k, v in nat1.items() if k not in used1}
    if extra1:
        problems.append(f"in NAT1, not listed: {sorted(extra1)}")
    return listed, problems


def wait_for(cond: Callable[[], Any], timeout: float, step: float = 0.2) -> Any:
    """Poll ``cond`` until it is truthy or ``timeout`` s passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


def wait_agree(st: Stack, cp: ControlPoint, timeout: float, wan: str = WAN,
               fast: bool = False) -> tuple[list[tuple[str, int, str, int]], list[str]]:
    """The listing and remaining disagreements, once they agree or ``timeout`` s passed."""
    deadline = time.monotonic() + timeout
    while True:
        listed, problems = agreement(st, cp, wan, fast)
        if not problems or time.monotonic() > deadline:
            return listed, problems
        time.sleep(0.5)


def reaches(bed: tb.Testbed, lan_port: int, ext_port: int) -> bool:
    """Bytes from the Internet host through NAT2 and NAT1 to a listener on the LAN host."""
    return bed.internet_reaches(lan_port, ext_port, b"issue 14: through both NATs")


def natd_client(st: Stack) -> NatdClient:
    """A second client of natd's RPC socket (controld keeps its own); close it when done."""
    return NatdClient(st.rpc, timeout=5)


def natd_hello(c: NatdClient) -> float:
    """Seconds natd took to answer one Hello (raises if it did not within 5 s)."""
    t0 = time.monotonic()
    assert isinstance(c.call(wire.Hello(), timeout=5), wire.HelloReply)
    return time.monotonic() - t0


def daemon_pid(st: Stack, name: str) -> int:
    return st.procs[name].pid


# ------------------------------------------------------------------ PCP on the wire
def count_pcp_at_nat2(bed: tb.Testbed) -> None:
    """Count what reaches NAT2 from the router, per PCP opcode (our own nft table in the
    provider namespace; it only counts, never drops)."""
    bed.nft("isp", f"""
table ip {PROBE_COUNTERS} {{
    counter maps {{ }}
    counter announces {{ }}
    chain in {{
        type filter hook input priority -300; policy accept;
        ip saddr {WAN} udp dport {pcp.SERVER_PORT} @th,72,8 1 counter name "maps"
        ip saddr {WAN} udp dport {pcp.SERVER_PORT} @th,72,8 0 counter name "announces"
    }}
}}
""")


def pcp_seen(bed: tb.Testbed, name: str = "maps") -> int:
    """Packets counted so far by :func:`count_pcp_at_nat2` (``maps`` or ``announces``)."""
    out = bed.run("isp", ["nft", "-j", "list", "counter", "ip", PROBE_COUNTERS, name])
    for item in json.loads(out.stdout)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise AssertionError("probe counter missing")


def natd_wan_port(st: Stack) -> int:
    """The UDP port natd sends PCP requests from (and hears responses on) at the WAN address."""
    pid = daemon_pid(st, "natd")
    out = st.bed.run("cpe", ["ss", "-Hunap", "src", WAN]).stdout
    for line in out.splitlines():
        if f"pid={pid}," in line:
            return int(line.split()[3].rsplit(":", 1)[1])
    raise AssertionError(f"natd has no UDP socket on {WAN}: {out}")


def forge(bed: tb.Testbed, ns: str, src: tuple[str, int], dst: tuple[str, int], payloads: list[bytes],
          count: int = 1, interval: float = 0.0) -> None:
    """Send datagrams with a forged source (raw socket) from namespace ``ns``."""
    agent(bed, ns, {"op": "raw_udp", "src": list(src), "dst": list(dst), "payloads": [p.hex() for p in payloads],
                    "count": count, "interval": interval}, timeout=30 + count * interval)


def forge_background(bed: tb.Testbed, ns: str, src: tuple[str, int], dst: tuple[str, int],
                     payloads: list[bytes], count: int, interval: float) -> Background:
    """:func:`forge`, running while the test does something else."""
    return Background(bed, ns, {"op": "raw_udp", "src": list(src), "dst": list(dst),
                                "payloads": [p.hex() for p in payloads], "count": count, "interval": interval})


def nat2_epoch(bed: tb.Testbed) -> int:
    """NAT2's current Epoch, asked with an ANNOUNCE from inside the provider namespace."""
    req = pcp.encode_request(pcp.Request(pcp.Opcode.ANNOUNCE, 0, ipaddress.IPv4Address(SERVER)))
    raw = bed.udp_exchange("isp", SERVER, pcp.SERVER_PORT, req, bind=(SERVER, 0), timeout=3)
    assert raw is not None, "NAT2 did not answer ANNOUNCE"
    return pcp.decode_response(raw).epoch


def map_response(nonce: bytes, proto: int, internal_port: int, external_port: int, epoch: int,
                 lifetime: int = 600, result: int = pcp.Result.SUCCESS) -> bytes:
    """A MAP response as NAT2 would send it (RFC 6887 §11.2)."""
    return pcp.encode_response(pcp.Response(pcp.Opcode.MAP, result, lifetime, epoch, pcp.MapData(
        nonce, proto, internal_port, external_port, ipaddress.IPv4Address(tb.NAT2_PUBLIC_IP))))


def unsupp_version(epoch: int, version: int = 1) -> bytes:
    """An UNSUPP_VERSION answer (RFC 6887 §9): header only, no nonce to match."""
    return struct.pack("!BBBBII12s", version, 0x80 | pcp.Opcode.MAP, 0, pcp.Result.UNSUPP_VERSION, 1800,
                       epoch, b"\0" * 12)


def announce(epoch: int = 0) -> bytes:
    """An unsolicited ANNOUNCE response (RFC 6887 §14.1.3): the server says it restarted."""
    return pcp.encode_response(pcp.Response(pcp.Opcode.ANNOUNCE, pcp.Result.SUCCESS, 0, epoch))


# ------------------------------------------------------------------ sockets and logs
def udp_listeners(bed: tb.Testbed, ns: str, port: int) -> list[str]:
    """Local addresses of the UDP sockets bound to ``port`` in namespace ``ns``."""
    out = bed.run(ns, ["ss", "-Huan", f"sport = :{port}"]).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def log_lines(st: Stack, name: str, since: int = 0) -> list[str]:
    """The daemon's log lines from byte offset ``since``."""
    return st.log(name)[since:].splitlines()


def log_size(st: Stack, name: str) -> int:
    return len(st.log(name))


@dataclass
class Tmpfs:
    """A small tmpfs as controld's state dir (disk-full tests); filled and freed on demand."""

    path: str
    size_kib: int

    def mount(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_kib}k,mode=0755", "tmpfs", self.path],
                       check=True, timeout=10)

    def fill(self, leave_kib: int = 0) -> None:
        """Use every free block but ``leave_kib`` KiB (a filler file), so writes soon fail."""
        fd = os.open(os.path.join(self.path, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for _ in range(self.size_kib * 4):  # bounded: 256 bytes at a time until ENOSPC
                try:
                    os.write(fd, b"\0" * 256)
                except OSError:
                    break
            if leave_kib:
                os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave_kib * 1024))
        finally:
            os.close(fd)

    def free(self) -> None:
        try:
            os.unlink(os.path.join(self.path, "filler"))
        except FileNotFoundError:
            pass

    def umount(self) -> None:
        subprocess.run(["umount", "-l", self.path], check=False, timeout=10)


def iter_ports(first: int, n: int) -> Iterator[int]:
    """``n`` distinct external ports from ``first`` (never PCP's own)."""
    return iter(range(first, first + n))
