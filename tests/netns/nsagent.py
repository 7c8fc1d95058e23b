"""Workloads run inside one bed namespace for the fault, flood and fuzz tests (stdlib only).

Run as ``python nsagent.py`` in a namespace with the workload as JSON on stdin; prints one
JSON line with the result. Every workload is bounded in count and time (the JSON names both),
so a daemon that hangs makes a workload end with its error recorded, never a test that waits
forever.

Workloads (``op``):
- ``probe``: one HTTP request every ``interval`` s for ``duration`` s, each on a new
  connection; per request the status (0 = closed without an answer) and seconds taken.
- ``slowloris``: hold ``n`` connections open, each sending one byte of a never-ending
  header every ``drip`` s, for ``duration`` s; reports how many were accepted and how many
  the server closed.
- ``burst``: ``n`` complete requests at once, each on its own connection; per request the status.
- ``udp_flood``: ``payloads`` (hex) in turn to ``host:port`` at ``rate`` per second for
  ``duration`` s (or ``count`` datagrams), from ``bind``; counts answers.
- ``spray``: one datagram from a fresh source port to each port, ``per`` times (flows).
- ``sink``/``source``: one long TCP flow, its bytes and largest gap between arrivals.
- ``fuzz_tcp``/``fuzz_udp``: fuzz cases, each judged by its answer (TCP) or counted (UDP).
- ``raw_udp``: datagrams with a forged source address and port (raw socket, IP_HDRINCL).
- ``requests``: raw TCP requests (hex) in turn, one connection each; per request the answer's
  status line (or the error) and seconds taken; used by the fuzz targets.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import socket
import struct
import sys
import time
from typing import Any

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


async def _one_request(host: str, port: int, data: bytes, timeout: float,
                       source: str | None = None) -> tuple[int, float, bytes]:
    """(status or 0, seconds, first bytes of the answer) for one request on its own connection."""
    t0 = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)
            writer.write(data)
            await writer.drain()
            got = await reader.read(65536)
        m = _STATUS.match(got)
        return (int(m[1]) if m else 0), time.monotonic() - t0, got[:200]
    except (OSError, TimeoutError):
        return 0, time.monotonic() - t0, b""
    finally:
        if writer is not None:
            writer.close()


async def probe(q: dict[str, Any]) -> dict[str, Any]:
    data = bytes.fromhex(q["data"])
    out: list[list[float]] = []
    end = time.monotonic() + q["duration"]
    while time.monotonic() < end and len(out) < 10000:
        t0 = time.monotonic()
        status, took, _ = await _one_request(q["host"], q["port"], data, q.get("timeout", 5.0), q.get("source"))
        out.append([status, round(took, 4)])
        await asyncio.sleep(max(0.0, q["interval"] - (time.monotonic() - t0)))
    return {"results": out}


async def slowloris(q: dict[str, Any]) -> dict[str, Any]:
    head = f"GET /rootDesc.xml HTTP/1.1\r\nHost: {q['host']}:{q['port']}\r\nX-Slow: ".encode()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = closed = 0
    end = time.monotonic() + q["duration"]
    for _ in range(q["n"]):
        if time.monotonic() > end:
            break
        try:
            async with asyncio.timeout(2.0):
                r, w = await asyncio.open_connection(q["host"], q["port"], local_addr=(q["source"], 0)
                                                     if q.get("source") else None)
            w.write(head)
            conns.append((r, w))
            opened += 1
        except (OSError, TimeoutError):
            pass
    print(json.dumps({"ready": opened}), flush=True)  # the test starts its normal client now
    while time.monotonic() < end:
        for r, w in conns:
            if w.is_closing():
                continue
            if r.at_eof():  # closed by the server
                closed += 1
                w.close()
                continue
            try:
                w.write(b"a")
            except (OSError, RuntimeError):
                closed += 1
                w.close()
        await asyncio.sleep(q["drip"])
    for _, w in conns:
        w.close()
    return {"opened": opened, "closed": closed}


async def burst(q: dict[str, Any]) -> dict[str, Any]:
    data = bytes.fromhex(q["data"])
    res = await asyncio.gather(*(_one_request(q["host"], q["port"], data, q.get("timeout", 10.0), q.get("source"))
                                 for _ in range(q["n"])))
    return {"results": [[s, round(t, 4)] for s, t, _ in res]}


async def requests(q: dict[str, Any]) -> dict[str, Any]:
    out = []
    for hexdata in q["data"]:
        t0 = time.monotonic()
        status, took, head = await _one_request(q["host"], q["port"], bytes.fromhex(hexdata), q.get("timeout", 5.0))
        out.append([status, round(took, 4), head.hex()])
        await asyncio.sleep(max(0.0, q.get("interval", 0.0) - (time.monotonic() - t0)))
    return {"results": out}


async def fuzz_tcp(q: dict[str, Any]) -> dict[str, Any]:
    """Each case on its own connection, ``concurrency`` at a time, the write side closed after
    the case (so a server never waits for more): per case [status (0: closed without an
    answer, -1: no answer within ``timeout``), seconds]."""
    sem = asyncio.Semaphore(q["concurrency"])

    async def one(data: bytes) -> list[float]:
        async with sem:
            t0 = time.monotonic()
            writer = None
            try:
                async with asyncio.timeout(q["timeout"]):
                    reader, writer = await asyncio.open_connection(q["host"], q["port"])
                    writer.write(data)
                    writer.write_eof()
                    await writer.drain()
                    got = await reader.read(65536)
                m = _STATUS.match(got)
                return [int(m[1]) if m else 0, round(time.monotonic() - t0, 4)]
            except TimeoutError:
                return [-1, round(time.monotonic() - t0, 4)]
            except OSError:
                return [0, round(time.monotonic() - t0, 4)]
            finally:
                if writer is not None:
                    writer.close()

    res = await asyncio.gather(*(one(bytes.fromhex(c)) for c in q["data"]))
    return {"results": res}


def fuzz_udp(q: dict[str, Any]) -> dict[str, Any]:
    """Each case once to ``host:port`` (``interval`` s apart), answers counted until ``linger`` after."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    s.setblocking(False)
    answers = 0
    for c in q["data"]:
        try:
            s.sendto(bytes.fromhex(c), (q["host"], q["port"]))
        except OSError:
            pass
        while select.select([s], [], [], q.get("interval", 0.0))[0]:
            s.recv(4096)
            answers += 1
    deadline = time.monotonic() + q.get("linger", 0.2)
    while (left := deadline - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
        s.recv(4096)
        answers += 1
    return {"sent": len(q["data"]), "answers": answers}


def udp_flood(q: dict[str, Any]) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
    s.bind(tuple(q.get("bind") or ("0.0.0.0", 0)))
    s.setblocking(False)
    payloads = [bytes.fromhex(p) for p in q["payloads"]]
    sent = answers = 0
    t0 = time.monotonic()
    end = t0 + q["duration"]
    limit = q.get("count", 10**7)
    while time.monotonic() < end and sent < limit:
        try:
            s.sendto(payloads[sent % len(payloads)], (q["host"], q["port"]))
        except OSError:
            pass
        sent += 1
        while select.select([s], [], [], 0)[0]:
            s.recv(4096)
            answers += 1
        ahead = sent / q["rate"] - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    deadline = time.monotonic() + q.get("linger", 0.5)
    while (left := deadline - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
        s.recv(4096)
        answers += 1
    return {"sent": sent, "answers": answers, "seconds": round(time.monotonic() - t0, 3)}


def spray(q: dict[str, Any]) -> dict[str, Any]:
    """One datagram from a fresh source port to each of ``ports``, ``per`` times: that many
    distinct flows (conntrack entries) through a NAT."""
    sent = 0
    for _ in range(q["per"]):
        for port in q["ports"]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"flow", (q["host"], port))
                sent += 1
    return {"sent": sent}


def sink(q: dict[str, Any]) -> dict[str, Any]:
    """Accept one TCP connection on ``port`` and read it for ``duration`` s: bytes, largest
    gap between arrivals, how it ended."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", q["port"]))
    srv.listen(1)
    print(json.dumps({"ready": True}), flush=True)
    srv.settimeout(q["duration"])
    out: dict[str, Any] = {"bytes": 0, "gap": 0.0, "end": "timeout"}
    try:
        conn, _ = srv.accept()
    except OSError:
        return {**out, "end": "no connection"}
    end = time.monotonic() + q["duration"]
    last = time.monotonic()
    while (left := end - time.monotonic()) > 0:
        if not select.select([conn], [], [], left)[0]:
            break
        try:
            data = conn.recv(65536)
        except OSError as e:
            out["end"] = type(e).__name__
            break
        now = time.monotonic()
        if not data:
            out["end"] = "eof"
            break
        if out["bytes"]:
            out["gap"] = max(out["gap"], round(now - last, 4))
        out["bytes"] += len(data)
        last = now
    return out


def source(q: dict[str, Any]) -> dict[str, Any]:
    """Connect to ``host:port`` and send ``chunk`` bytes every ``interval`` s for ``duration`` s."""
    sent = 0
    err = ""
    try:
        s = socket.create_connection((q["host"], q["port"]), timeout=3)
        end = time.monotonic() + q["duration"]
        while time.monotonic() < end:
            s.sendall(b"f" * q["chunk"])
            sent += q["chunk"]
            time.sleep(q["interval"])
        s.shutdown(socket.SHUT_WR)
        s.close()
    except OSError as e:
        err = f"{type(e).__name__}: {e}"
    return {"sent": sent, "error": err}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def raw_udp(q: dict[str, Any]) -> dict[str, Any]:
    src, sport = q["src"]
    dst, dport = q["dst"]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    sent = 0
    for i in range(q.get("count", 1)):
        payload = bytes.fromhex(q["payloads"][i % len(q["payloads"])])
        ulen = 8 + len(payload)
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, ulen)
        udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
        csum = _checksum(pseudo + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, (i + 1) & 0xFFFF, 0, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
        s.sendto(ip + udp, (dst, 0))
        sent += 1
        if q.get("interval"):
            time.sleep(q["interval"])
    return {"sent": sent}


def main() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))  # slowloris holds 1,000
    q = json.loads(sys.stdin.readline())
    op = q["op"]
    if op in ("probe", "slowloris", "burst", "requests", "fuzz_tcp"):
        out = asyncio.run(asyncio.wait_for(globals()[op](q), q.get("limit", 120)))
    else:
        out = globals()[op](q)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
