#!/usr/bin/env python3
"""LAN NAT-PMP and PCP benchmark on the namespace test bed (issue 10): prints figures, asserts nothing.

In nat1-only mode (no NAT2 round trip: the LAN server, the core, the table and natd's
nftables are what is measured), a client on the LAN host sends, for each N, N NAT-PMP
TCP map requests, then N PCP MAP requests (one at a time, each answered before the
next: p50, p99, total), then deletes them all (lifetime 0). The same client does the
same against Debian's miniupnpd (enable_natpmp, which serves NAT-PMP and PCP) run as the
router in the same bed, in the same run, so the columns are comparable.

Run as root on Debian 12 after ./scripts/setup:
    .venv/bin/python bench/lanpcp_bench.py                # N = 100 1000
    .venv/bin/python bench/lanpcp_bench.py -n 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.bed import nat1_miniupnpd  # noqa: E402
from tests.bed import testbed as tb  # noqa: E402
from tests.bed.stack import Stack  # noqa: E402

NATPMP_FIRST, PCP_FIRST = 20000, 30000

# The client on the LAN host: byte layouts as RFC 6886 §3.3 and RFC 6887 §11.1 draw them.
CLIENT = r"""
import json, os, socket, struct, sys, time
gw, n = sys.argv[1], int(sys.argv[2]); nfirst, pfirst = int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((gw, 5351)); s.settimeout(2.0)
me = socket.inet_aton(s.getsockname()[0])
nonce = os.urandom(12)

def ask(payload):
    for _ in range(3):
        s.send(payload)
        try:
            return s.recv(2048)
        except socket.timeout:
            continue
    raise SystemExit("no answer")

def natpmp(port, life):
    return struct.pack("!BBHHHI", 0, 2, 0, port, port, life)

def pcp(port, life):
    return (struct.pack("!BBHI", 2, 1, 0, life) + b"\0" * 10 + b"\xff\xff" + me + nonce
            + struct.pack("!B3xHH", 6, port, port) + b"\0" * 10 + b"\xff\xff" + b"\0" * 4)

def timed(make, first, life):
    lat, bad = [], 0
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        r = ask(make(first + i, life))
        lat.append(time.perf_counter() - t)
        bad += r[3] != 0 if r[0] == 2 else r[2:4] != b"\0\0"
    total = time.perf_counter() - t0
    lat.sort()
    return {"p50": lat[n // 2], "p99": lat[min(n - 1, int(n * 0.99))], "total": total, "errors": bad}

out = {"natpmp": timed(natpmp, nfirst, 3600), "pcp": timed(pcp, pfirst, 3600)}
out["natpmp_del"] = timed(natpmp, nfirst, 0)
out["pcp_del"] = timed(pcp, pfirst, 0)
print(json.dumps(out))
"""


def run_client(bed: tb.Testbed, n: int) -> dict:
    res = bed.run("lan", [sys.executable, "-c", CLIENT, tb.ROUTER_LAN_IP, str(n), str(NATPMP_FIRST), str(PCP_FIRST)],
                  check=False, timeout=4 * 3600)
    if res.returncode != 0:
        raise SystemExit(f"client failed: {res.stderr[-2000:]}{res.stdout[-2000:]}")
    return json.loads(res.stdout)


def igdpcp(bed: tb.Testbed, n: int) -> dict:
    # every limit lifted: the bench maps 2N ports from one host as fast as it answers
    st = Stack(bed, mode="nat1-only", controld_args=["--max-mappings", "0", "--max-mappings-per-host", "0",
                                                     "--pcp-rate", "1000000", "--pcp-burst", "1000000"],
               natd_args=["--max-bindings", "65535", "--max-per-host", "65535"])
    st.start()
    try:
        return run_client(bed, n)
    finally:
        st.close()
        bed.run("cpe", ["nft", "delete", "table", "ip", "igdpcp"], check=False)


def miniupnpd(bed: tb.Testbed, n: int) -> dict:
    """Debian's miniupnpd as the router (NAT1) with NAT-PMP/PCP on (enable_natpmp)."""
    stop = nat1_miniupnpd.start(bed, 5001, upnp=False, natpmp=True, uuid="3f1e3d3c-0000-4000-8000-000000000002")
    try:
        return run_client(bed, n)
    finally:
        stop()


def row(n: int, name: str, r: dict) -> str:
    def cell(k: str) -> str:
        x = r[k]
        err = f" ({x['errors']} errors)" if x["errors"] else ""
        return f"{x['p50'] * 1e3:.2f} / {x['p99'] * 1e3:.2f} ms, {x['total']:.2f} s{err}"
    return (f"| {n} | {name} | {cell('natpmp')} | {cell('pcp')} | {r['natpmp_del']['total']:.2f} s | "
            f"{r['pcp_del']['total']:.2f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, nargs="+", default=[100, 1000], help="mapping counts (per protocol)")
    args = ap.parse_args()
    print("| N | server | NAT-PMP map p50 / p99, all N | PCP MAP p50 / p99, all N | NAT-PMP delete all N "
          "| PCP delete all N |")
    print("|---|---|---|---|---|---|")
    for n in args.n:
        with tb.Testbed() as bed:
            ours = igdpcp(bed, n)
            print(row(n, "igdpcp", ours), flush=True)
            theirs = miniupnpd(bed, n)
            print(row(n, "miniupnpd 2.3.1", theirs), flush=True)
            print(f"<!-- N={n}: NAT-PMP maps {theirs['natpmp']['total'] / ours['natpmp']['total']:.1f}x, "
                  f"PCP maps {theirs['pcp']['total'] / ours['pcp']['total']:.1f}x miniupnpd's speed -->", flush=True)


if __name__ == "__main__":
    main()
