"""Small programs the benchmark runs inside the bed's namespaces: ``python -m bench.agents NAME ARGS``.

- ``client``: the miniupnpc Python binding on the LAN host, driven by JSON lines on stdin
  (one discovery, then add / list / delete commands; one JSON answer line each);
- ``burst``: a bounded burst of UDP flows through the router (unrelated conntrack entries);
- ``accept`` / ``connect``: a TCP accept loop and a new-connection rate loop (data plane);
- ``sniff``: PCP MAP request/response times at an interface (NAT2's own round trip, seen at natd's WAN side);
  ``sniff-soap``: the router's time per SOAP call, from the POST in to the answer out on its LAN side;
- ``soap-probe``: the first moment an IGD answers a SOAP call; ``fwd-count``: the first moment natd's
  DNAT map holds N forwards; ``natpmp``: NAT-PMP mapping round trips (or a probe of UDP 5351);
- ``pinholes``: AddPinhole / DeletePinhole (WANIPv6FirewallControl:1) by raw SOAP POSTs, the same client
  for both systems, driven by JSON lines on stdin like ``client``.

Every loop is bounded by a count or a deadline; results go to stdout as one JSON line.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar
from xml.etree import ElementTree

from bench.progress import Progress
from shared.const import PCP_SERVER_PORT as NATPMP_PORT  # PCP and NAT-PMP share it

SOAP_NS = "urn:schemas-upnp-org:service:WANIPConnection:1"
FC6_NS = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
_DEVICE_NS = "{urn:schemas-upnp-org:device-1-0}"
SNIFF_BATCH_S = 0.25  # the sniffer reads what the kernel stamped this often
SNIFF_BATCH_MAX = 100_000  # packets read per batch (bounded)
SNIFF_BUFFER = 8 << 20  # socket buffer for a batch's packets (SO_RCVBUFFORCE: the agent runs as root)
SO_RCVBUFFORCE = 33
MAX_REFUSALS = 5  # 503 answers one call retries before it counts as an error
T = TypeVar("T")


def _say(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------- UPnP client
def timed_retry(call: Callable[[], T], refusal: Callable[[T], float | None],
                sleep: Callable[[float], None] = time.sleep) -> tuple[float, T, int]:
    """``call()`` timed: (seconds, result, refusals). While ``refusal(result)`` names a wait (an IGD's per-host
    connection rate: a 503 answered before any work), sleep it (at most 5 s) and call again, at most
    MAX_REFUSALS times, as a control point would; only the attempt that was served is timed."""
    refused = 0
    while True:
        t = time.perf_counter()
        res = call()
        took = time.perf_counter() - t
        wait = refusal(res)
        if wait is None or refused == MAX_REFUSALS:
            return took, res, refused
        refused += 1
        sleep(min(5.0, max(0.0, wait)))


def _attempt(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised (the binding raises on every refusal)."""
    try:
        return fn(*args)
    except Exception as exc:  # a refusal is counted, the run goes on
        return exc


def _binding_refusal(res: Any) -> float | None:
    # the binding says only this for an answer that is not SOAP (a 503 included) and hides Retry-After,
    # which controld sets to 1 s
    return 1.0 if isinstance(res, Exception) and str(res) == "Miniupnpc HTTP error" else None


def _list_refusal(below_count: bool, res: Any) -> float | None:
    # the binding answers None for a 713 and for an HTTP error alike: below the count of mappings the
    # bench made, None is a refusal
    return 1.0 if res is None and below_count else _binding_refusal(res)


def client() -> None:
    """Discover the IGD, then serve commands: add/list/delete (one TCP connection per call, as miniupnpc does).
    Each answer carries the latencies, the errors and the 503 refusals retried (timed_retry)."""
    import miniupnpc  # the client both systems are measured with

    u = miniupnpc.UPnP()
    u.discoverdelay = 1000
    u.discover()
    url = u.selectigd()
    me = u.lanaddr
    _say({"url": url, "lanaddr": me})
    for line in sys.stdin:
        cmd = json.loads(line)
        op, first, count = cmd["op"], int(cmd.get("first", 0)), int(cmd.get("count", 0))
        lat: list[float] = []
        errors = refusals = 0
        with Progress(f"{cmd.get('label', op)}", count if op != "list" else int(cmd.get("max", 2)) - 1) as bar:
            if op in ("add", "delete"):
                for i in range(count):
                    args = (first + i, "TCP", me, first + i, "bench", "", 0) if op == "add" else (first + i, "TCP")
                    fn = u.addportmapping if op == "add" else u.deleteportmapping
                    took, res, refused = timed_retry(functools.partial(_attempt, fn, *args), _binding_refusal)
                    lat.append(took)
                    errors += isinstance(res, Exception)
                    refusals += refused
                    bar.step()
                _say({"lat": lat, "errors": errors, "refused": refusals})
            elif op == "list":  # index 0, 1, ... until the IGD says 713 (SpecifiedArrayIndexInvalid)
                limit, expect = int(cmd["max"]), int(cmd.get("expect", 0))
                total = 0.0
                i = 0
                while i <= limit:
                    took, res, refused = timed_retry(functools.partial(_attempt, u.getgenericportmapping, i),
                                                     functools.partial(_list_refusal, i < expect))
                    total += took  # the waits after a 503 are not the listing's
                    refusals += refused
                    if res is None or isinstance(res, Exception):
                        break
                    i += 1
                    bar.step()
                _say({"total": total, "entries": i, "refused": refusals})
            else:
                _say({"error": f"unknown op {op}"})


# --------------------------------------------------------------------- conntrack load
def burst(dest: str, flows: int, first_port: int = 1024) -> None:
    """``flows`` UDP flows to ``dest`` (distinct destination ports from 8 sockets), one datagram each."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    sent = 0
    for k in range(flows):
        port = first_port + k // len(socks)
        try:
            socks[k % len(socks)].sendto(b"x", (dest, port))
            sent += 1
        except OSError:  # ICMP errors surface on later sends: ignore, the flow exists
            pass
    _say({"sent": sent})


# --------------------------------------------------------------------- data plane
def accept(ports: list[int], seconds: float) -> None:
    """Accept and close TCP connections on ``ports`` for at most ``seconds``."""
    socks = []
    for p in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", p))
        s.listen(4096)
        socks.append(s)
    _say("ready")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ready, _, _ = select.select(socks, [], [], 0.5)
        for s in ready:
            c, _ = s.accept()
            c.close()


def connect(host: str, port: int, seconds: float) -> None:
    """New TCP connections to ``host:port`` for ``seconds``; prints connections per second and failures."""
    n = fails = 0
    linger = struct.pack("ii", 1, 0)  # RST on close: no TIME_WAIT, no port exhaustion
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = socket.socket()
        s.settimeout(1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            s.connect((host, port))
            n += 1
        except OSError:
            fails += 1
        s.close()
    _say({"rate": n / seconds, "fails": fails})


# --------------------------------------------------------------------- PCP at the WAN side
def _pcp_of(frame: bytes) -> tuple[str, bytes] | None:
    """("req"|"resp", nonce) for a PCP MAP packet in an IPv4 frame, else None."""
    if len(frame) < 28 or frame[0] >> 4 != 4 or frame[9] != 17:
        return None
    ihl = (frame[0] & 0x0F) * 4
    sport, dport = struct.unpack_from("!HH", frame, ihl)
    pcp = frame[ihl + 8:]
    if len(pcp) < 36 or pcp[0] != 2:
        return None
    if dport == NATPMP_PORT and pcp[1] == 1:
        return "req", pcp[24:36]
    if sport == NATPMP_PORT and pcp[1] == 0x81:
        return "resp", pcp[24:36]
    return None


def _stamped(ifname: str, seconds: float) -> Iterator[tuple[float, bytes]]:
    """(kernel timestamp, IPv4 packet) of every packet in or out of ``ifname`` until SIGTERM or ``seconds``.

    Read in batches every SNIFF_BATCH_S: the kernel stamps each packet as it passes, so reading
    late changes no figure, and a sniffer then never wakes beside the daemons as a packet comes
    in (two wake-ups per add would compete for the CPU on the very path being measured)."""
    so_timestampns = 35
    # ETH_P_ALL: a socket bound to ETH_P_IP sees only incoming packets, not the ones sent
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
    s.bind((ifname, 0))
    s.setsockopt(socket.SOL_SOCKET, so_timestampns, 1)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SNIFF_BUFFER)  # a batch's packets wait here
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    _say("ready")
    end = time.monotonic() + seconds
    while True:
        time.sleep(SNIFF_BATCH_S)
        for _ in range(SNIFF_BATCH_MAX):  # bounded: the rest waits for the next batch
            try:
                data, anc, _, addr = s.recvmsg(2048, 64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if addr[1] != 0x0800:  # IPv4 only
                continue
            ts = next((struct.unpack("qq", d[:16]) for lvl, typ, d in anc
                       if lvl == socket.SOL_SOCKET and typ == so_timestampns), None)
            yield (ts[0] + ts[1] / 1e9 if ts else time.time()), data
        if stop or time.monotonic() >= end:
            return


def _write_json(out: str, values: list[float]) -> None:
    with open(out + ".tmp", "w") as f:
        json.dump(values, f)
    os.rename(out + ".tmp", out)


def pcp_rtts(packets: Iterable[tuple[float, bytes]]) -> list[float]:
    """Round trips of the PCP MAP requests among ``packets`` ((time, IPv4 packet)): first request
    to its response, in request order; unanswered ones left out."""
    sent: dict[bytes, float] = {}
    order: list[bytes] = []
    rtt: dict[bytes, float] = {}
    for t, data in packets:
        pkt = _pcp_of(data)
        if pkt is None:
            continue
        kind, nonce = pkt
        if kind == "req" and nonce not in sent:
            sent[nonce] = t
            order.append(nonce)
        elif kind == "resp" and nonce in sent and nonce not in rtt:
            rtt[nonce] = t - sent[nonce]
    return [rtt[n] for n in order if n in rtt]


def sniff(ifname: str, out: str, seconds: float) -> None:
    """PCP MAP round trips on ``ifname`` until SIGTERM or ``seconds``, written to ``out``."""
    _write_json(out, pcp_rtts(_stamped(ifname, seconds)))


def _tcp_of(frame: bytes) -> tuple[int, int, bytes] | None:
    """(source port, destination port, payload) of a TCP segment in an IPv4 frame, else None."""
    if len(frame) < 40 or frame[0] >> 4 != 4 or frame[9] != 6:
        return None
    ihl = (frame[0] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 2)[0]
    sport, dport = struct.unpack_from("!HH", frame, ihl)
    return sport, dport, frame[ihl + (frame[ihl + 12] >> 4) * 4:total]


def soap_times(packets: Iterable[tuple[float, bytes]], port: int) -> list[float]:
    """The server's time per SOAP call among ``packets`` ((time, IPv4 packet)): from a POST's first
    segment to ``port`` until the answer's first segment back on that connection, in answer order."""
    asked: dict[int, float] = {}  # client port -> when its POST came in
    took: list[float] = []
    for t, data in packets:
        seg = _tcp_of(data)
        if seg is None or not seg[2]:
            continue
        sport, dport, payload = seg
        if dport == port and payload.startswith(b"POST ") and len(asked) < SNIFF_BATCH_MAX:
            asked.setdefault(sport, t)
        elif sport == port and dport in asked:
            took.append(t - asked.pop(dport))
    return took


def sniff_soap(ifname: str, port: int, out: str, seconds: float) -> None:
    """The router's time per SOAP call seen on ``ifname`` (its LAN side), written to ``out``."""
    _write_json(out, soap_times(_stamped(ifname, seconds), port))


# --------------------------------------------------------------------- SOAP by hand
def soap_body(service: str, action: str, args: dict[str, Any]) -> bytes:
    """One SOAP request envelope (UPnP Device Architecture 1.1 §3.2.1)."""
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in args.items())
    return ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action} xmlns:u="{service}">{inner}</u:{action}></s:Body></s:Envelope>').encode()


def control_url(description: bytes, location: str, service: str) -> str:
    """The absolute control URL of ``service`` in a device description fetched from ``location``."""
    root = ElementTree.fromstring(description)
    base = root.findtext(f"{_DEVICE_NS}URLBase") or location
    for svc in root.iter(f"{_DEVICE_NS}service"):
        if svc.findtext(f"{_DEVICE_NS}serviceType") == service:
            return urllib.parse.urljoin(base, (svc.findtext(f"{_DEVICE_NS}controlURL") or "").strip())
    raise ValueError(f"{location}: no {service}")


def soap_out(body: bytes, name: str) -> str | None:
    """The text of the output argument ``name`` in a SOAP answer, or None (a fault, or not there)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    return next((el.text or "" for el in root.iter() if el.tag.rpartition("}")[2] == name), None)


def soap_post(url: str, service: str, action: str, args: dict[str, Any],
              timeout: float = 10.0) -> tuple[int, bytes, str | None]:
    """POST one action on a new HTTP/1.1 connection (as miniupnpc does); (status, body, Retry-After)."""
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=timeout)
    try:
        c.request("POST", u.path or "/", body=soap_body(service, action, args),
                  headers={"SOAPACTION": f'"{service}#{action}"', "Content-Type": 'text/xml; charset="utf-8"'})
        r = c.getresponse()
        return r.status, r.read(), r.getheader("Retry-After")
    except OSError as exc:
        return 0, str(exc).encode(), None
    finally:
        c.close()


def _retry_after(res: tuple[int, bytes, str | None]) -> float | None:
    status, _, retry_after = res
    if status != 503:
        return None
    try:
        return float(retry_after or 1)
    except ValueError:
        return 1.0


def timed_call(url: str, service: str, action: str, args: dict[str, Any],
               sleep: Callable[[float], None] = time.sleep) -> tuple[float, int, bytes, int]:
    """One action, timed, a 503 retried after its Retry-After (timed_retry): (seconds, status, body, refusals)."""
    took, (status, body, _), refused = timed_retry(lambda: soap_post(url, service, action, args), _retry_after, sleep)
    return took, status, body, refused


def pinhole_client(location: str) -> None:
    """Fetch the description at ``location``, then serve commands: ``add`` (``count`` TCP pinholes for
    ``client`` from port ``first``, lease ``lease``), ``packets`` (GetPinholePackets of ``count`` of
    them, spread through the ones it added) and ``delete`` (every pinhole it added)."""
    with urllib.request.urlopen(location, timeout=10) as r:
        url = control_url(r.read(), location, FC6_NS)
    _say({"control_url": url})
    uids: list[int] = []
    for line in sys.stdin:
        cmd = json.loads(line)
        lat: list[float] = []
        errors: list[str] = []  # the first few faults, for the log
        failed = refusals = 0
        if cmd["op"] == "delete":
            todo: Sequence[int] = list(uids)
        elif cmd["op"] == "packets":
            k = min(int(cmd["count"]), len(uids))
            todo = [uids[i * len(uids) // k] for i in range(k)]
        else:
            todo = range(int(cmd["count"]))
        with Progress(cmd.get("label", cmd["op"]), len(todo)) as bar:
            for i in todo:
                if cmd["op"] == "add":
                    action, args = "AddPinhole", {"RemoteHost": "", "RemotePort": 0, "InternalClient": cmd["client"],
                                                  "InternalPort": int(cmd["first"]) + i, "Protocol": 6,
                                                  "LeaseTime": int(cmd["lease"])}
                elif cmd["op"] == "packets":
                    action, args = "GetPinholePackets", {"UniqueID": i}
                else:
                    action, args = "DeletePinhole", {"UniqueID": i}
                took, status, body, refused = timed_call(url, FC6_NS, action, args)
                lat.append(took)
                refusals += refused
                uid = soap_out(body, "UniqueID") if action == "AddPinhole" else ""
                if status == 200 and uid is not None:
                    if uid:
                        uids.append(int(uid))
                else:
                    failed += 1
                    if len(errors) < 3:
                        errors.append(f"{action} {status}: {body[-300:].decode(errors='replace')}")
                bar.step()
        if cmd["op"] == "delete":
            uids.clear()
        _say({"lat": lat, "errors": failed, "faults": errors, "refused": refusals})


# --------------------------------------------------------------------- restart probes
def soap_probe(host: str, port: int, path: str, seconds: float) -> None:
    """Call GetGenericPortMappingEntry(0) every 10 ms until an HTTP answer; prints its CLOCK_MONOTONIC time."""
    body = soap_body(SOAP_NS, "GetGenericPortMappingEntry", {"NewPortMappingIndex": 0})
    _say("ready")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            c = http.client.HTTPConnection(host, port, timeout=2)
            c.request("POST", path, body=body, headers={"SOAPACTION": f'"{SOAP_NS}#GetGenericPortMappingEntry"',
                                                         "Content-Type": 'text/xml; charset="utf-8"'})
            status = c.getresponse().status
            c.close()
            _say({"t": time.monotonic(), "status": status})
            return
        except OSError:
            time.sleep(0.01)
    _say({"t": None})


def _fwd_count(nft: Any) -> int:
    rc, out, _ = nft.cmd("list map ip igdpcp fwd4")
    if rc != 0:
        return 0
    return sum(len(o["map"].get("elem", [])) for o in json.loads(out)["nftables"] if "map" in o)


def fwd_count(want: int, seconds: float) -> None:
    """Poll natd's DNAT map until it holds ``want`` elements; prints the CLOCK_MONOTONIC time it did."""
    import nftables  # Debian's libnftables binding (the venv sees system site-packages)

    nft = nftables.Nftables()
    nft.set_json_output(True)
    _say("ready")
    end = time.monotonic() + seconds
    polls = 0
    while time.monotonic() < end:
        polls += 1
        if _fwd_count(nft) >= want:
            _say({"t": time.monotonic(), "polls": polls})
            return
        time.sleep(0.005)
    _say({"t": None, "polls": polls, "have": _fwd_count(nft)})


# --------------------------------------------------------------------- NAT-PMP
def natpmp(gateway: str, count: int, first: int) -> None:
    """``count`` NAT-PMP TCP mappings (RFC 6886 §3.3) one by one; count 0 only probes (public address request)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((gateway, NATPMP_PORT))
    s.settimeout(1.0)
    if count == 0:
        s.send(b"\x00\x00")
        try:
            _say({"available": len(s.recv(64)) >= 8})
        except OSError as exc:
            _say({"available": False, "reason": f"no answer on UDP {NATPMP_PORT} ({exc.__class__.__name__})"})
        return
    lat, errors = [], 0
    with Progress("NAT-PMP maps", count) as bar:
        for i in range(count):
            req = struct.pack("!BBHHHI", 0, 2, 0, first + i, first + i, 3600)
            t = time.perf_counter()
            s.send(req)
            try:
                resp = s.recv(64)
                errors += int(len(resp) < 16 or struct.unpack_from("!H", resp, 2)[0] != 0)
            except OSError:
                errors += 1
            lat.append(time.perf_counter() - t)
            bar.step()
    _say({"lat": lat, "errors": errors})


def pcp_maps(gateway: str, count: int, first: int) -> None:
    """``count`` PCP MAP requests for TCP (RFC 6887 §11.1 figure 9) one by one, one nonce, no suggestion."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((gateway, NATPMP_PORT))
    s.settimeout(1.0)
    me = socket.inet_aton(s.getsockname()[0])
    nonce = os.urandom(12)
    lat, errors = [], 0
    with Progress("PCP maps", count) as bar:
        for i in range(count):
            req = (struct.pack("!BBHI", 2, 1, 0, 3600) + b"\0" * 10 + b"\xff\xff" + me + nonce
                   + struct.pack("!B3xHH", 6, first + i, first + i) + b"\0" * 10 + b"\xff\xff" + b"\0" * 4)
            t = time.perf_counter()
            s.send(req)
            try:
                resp = s.recv(1100)
                errors += int(len(resp) < 60 or resp[3] != 0)
            except OSError:
                errors += 1
            lat.append(time.perf_counter() - t)
            bar.step()
    _say({"lat": lat, "errors": errors})


def main(argv: list[str]) -> None:
    """Dispatch ``argv[0]`` to the agent of that name."""
    name, args = argv[0], argv[1:]
    if name == "client":
        client()
    elif name == "burst":
        burst(args[0], int(args[1]))
    elif name == "accept":
        accept([int(p) for p in args[1:]], float(args[0]))
    elif name == "connect":
        connect(args[0], int(args[1]), float(args[2]))
    elif name == "sniff":
        sniff(args[0], args[1], float(args[2]))
    elif name == "sniff-soap":
        sniff_soap(args[0], int(args[1]), args[2], float(args[3]))
    elif name == "soap-probe":
        soap_probe(args[0], int(args[1]), args[2], float(args[3]))
    elif name == "fwd-count":
        fwd_count(int(args[0]), float(args[1]))
    elif name == "natpmp":
        natpmp(args[0], int(args[1]), int(args[2]) if len(args) > 2 else 0)
    elif name == "pcp":
        pcp_maps(args[0], int(args[1]), int(args[2]))
    elif name == "pinholes":
        pinhole_client(args[0])
    else:
        raise SystemExit(f"unknown agent {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
