#!/usr/bin/env python3
"""UPnP IGD benchmark on the namespace test bed (issue #3): prints figures, asserts nothing.

In nat1-only mode (no NAT2 round trip: the UPnP layer, the IWF, the table and natd's
nftables are what is measured), the miniupnpc Python binding on the LAN host runs, for
each N: N AddPortMapping calls (p50, p99, total), a full GetGenericPortMappingEntry
listing (index 0, 1, ... until 713) and N DeletePortMapping calls. The same client does
the same against Debian's miniupnpd (nftables build) run as NAT1 IGD in the same bed's
router namespace, in the same run, so the two columns are comparable.

Run as root on Debian 12 after ./scripts/setup:
    .venv/bin/python bench/upnp_bench.py                 # N = 100 1000 3000 10000
    .venv/bin/python bench/upnp_bench.py -n 100 1000 --skip-miniupnpd-above 3000
miniupnpd's cost grows with N^2 (each add and delete walks its chains); --skip-miniupnpd-above bounds the run.
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

MINIUPNPD_PORT = 5001
FIRST_PORT = 20000

CLIENT = r"""
import json, statistics, sys, time, miniupnpc
n = int(sys.argv[1]); first = int(sys.argv[2])
u = miniupnpc.UPnP(); u.discoverdelay = 1000
found = u.discover(); url = u.selectigd(); me = u.lanaddr
adds = []
t0 = time.perf_counter()
for i in range(n):
    t = time.perf_counter()
    u.addportmapping(first + i, "TCP", me, first + i, "bench", "", 0)
    adds.append(time.perf_counter() - t)
add_total = time.perf_counter() - t0
t0 = time.perf_counter()
i = 0
while i <= n + 1 and u.getgenericportmapping(i) is not None:
    i += 1
list_total, listed = time.perf_counter() - t0, i
t0 = time.perf_counter()
for k in range(n):
    u.deleteportmapping(first + k, "TCP")
del_total = time.perf_counter() - t0
adds.sort()
print(json.dumps({"url": url, "n": n, "listed": listed, "p50": adds[len(adds) // 2],
                  "p99": adds[min(len(adds) - 1, int(len(adds) * 0.99))], "add_total": add_total,
                  "list_total": list_total, "del_total": del_total}))
"""


def run_client(bed: tb.Testbed, n: int) -> dict:
    """The binding from the LAN host against whichever IGD answers discovery."""
    res = bed.run("lan", [sys.executable, "-c", CLIENT, str(n), str(FIRST_PORT)], check=False, timeout=48 * 3600)
    if res.returncode != 0:
        raise SystemExit(f"client failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout)


def igdpcp(bed: tb.Testbed, n: int) -> dict:
    # every limit lifted: the bench maps N ports from one host
    st = Stack(bed, mode="nat1-only", controld_args=["--max-mappings", "0", "--max-mappings-per-host", "0"],
               natd_args=["--max-bindings", "65535", "--max-per-host", "65535"])
    st.start()
    try:
        return run_client(bed, n)
    finally:
        st.close()
        bed.run("cpe", ["nft", "delete", "table", "ip", "igdpcp"], check=False)
        for name in ("mappings.sqlite3", "mappings.sqlite3-wal", "mappings.sqlite3-shm"):
            try:
                os.unlink(os.path.join(bed.path("state"), name))
            except OSError:
                pass


def miniupnpd(bed: tb.Testbed, n: int) -> dict:
    """Debian's miniupnpd (nftables build) as the router's IGD (NAT1)."""
    stop = nat1_miniupnpd.start(bed, MINIUPNPD_PORT, upnp=True, natpmp=False,
                                  uuid="3f1e3d3c-0000-4000-8000-000000000001")
    try:
        return run_client(bed, n)
    finally:
        stop()


def row(name: str, r: dict | None) -> str:
    if r is None:
        return f"| {name} | skipped | | | |"
    return (f"| {name} | {r['p50'] * 1e3:.2f} / {r['p99'] * 1e3:.2f} ms | {r['add_total']:.2f} s | "
            f"{r['list_total']:.3f} s ({r['listed']}) | {r['del_total']:.2f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, nargs="+", default=[100, 1000, 3000, 10000], help="mapping counts")
    ap.add_argument("--skip-miniupnpd-above", type=int, default=10**9, help="no miniupnpd run for larger N")
    args = ap.parse_args()
    print("| N | IGD | AddPortMapping p50 / p99 | all N adds | list all N (GetGeneric) | delete all N |")
    print("|---|---|---|---|---|---|")
    for n in args.n:
        with tb.Testbed() as bed:
            ours = igdpcp(bed, n)
            print(row(f"{n} | igdpcp", ours), flush=True)
            theirs = miniupnpd(bed, n) if n <= args.skip_miniupnpd_above else None
            print(row(f"{n} | miniupnpd 2.3.1", theirs), flush=True)
            if theirs:
                print(f"<!-- N={n}: adds {theirs['add_total'] / ours['add_total']:.1f}x, "
                      f"list {theirs['list_total'] / max(ours['list_total'], 1e-9):.1f}x, "
                      f"deletes {theirs['del_total'] / ours['del_total']:.1f}x faster -->", flush=True)


if __name__ == "__main__":
    main()
