#!/usr/bin/env python3
"""Deletes with a busy conntrack table, on the namespace test bed (issues #12, #14 item 9): prints figures,
asserts nothing.

For each count of unrelated conntrack entries (default 0 and 30,000, UDP flows put in the
router's table as a busy router's NATed traffic would be): N forwards, one live UDP flow
through each, then N Unbind RPCs one by one while a second client sends a Hello every
5 ms. Printed: Unbind p50/p99/total, the time until the kernel holds none of the N flows
any more (natd's conntrack cleanup done), the Hello round trip p50/p99/max meanwhile, and
the idle RSS of natd and (with --controld) of controld.

``--src DIR`` runs the daemons from another checkout (e.g. the main branch) for a before/after.

Run as root on Debian 12 after ./scripts/setup:  .venv/bin/python bench/ct_bench.py
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from natd.client import NatdClient  # noqa: E402
from shared import wire  # noqa: E402
from tests.bed import testbed as tb  # noqa: E402
from tests.bed.natd import ct_count, ct_fill, python  # noqa: E402
from tests.bed.stack import Stack  # noqa: E402

UDP_SEND = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            "[s.sendto(b'x',(sys.argv[1],p)) for p in range(int(sys.argv[2]),int(sys.argv[3]))]")
WAN_PORT0 = 20000


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except OSError:
        return -1


def hello_loop(st: Stack, stop: threading.Event, out: list[float]) -> None:
    """A Hello every 5 ms until ``stop``; round trips in seconds into ``out``."""
    h = NatdClient(st.rpc, None, curve_dir=st.curve_dir)
    try:
        while not stop.is_set() and len(out) < 100_000:
            t = time.perf_counter()
            h.call(wire.Hello(), timeout=10)
            out.append(time.perf_counter() - t)
            time.sleep(0.005)
    finally:
        h.close()


def deletes(st: Stack, c: NatdClient, n: int, unrelated: int) -> dict:
    bed = st.bed
    bed.run("cpe", ["conntrack", "-F"], check=False)
    c.call(wire.Sync([]), timeout=60)
    ct_fill(bed, unrelated)
    for i in range(n):
        c.call(wire.Bind(i + 1, 17, tb.LAN_HOST_IP, 10000 + i, WAN_PORT0 + i, exact=True))
    bed.run("isp", [python(), "-c", UDP_SEND, tb.ROUTER_WAN_IP, str(WAN_PORT0), str(WAN_PORT0 + n)])
    time.sleep(0.3)
    base = unrelated
    with_flows = ct_count(bed)
    hellos: list[float] = []
    stop = threading.Event()
    th = threading.Thread(target=hello_loop, args=(st, stop, hellos), daemon=True)
    th.start()
    time.sleep(0.3)
    rm = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        c.call(wire.Unbind(i + 1), timeout=30)
        rm.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    clean = None
    while time.perf_counter() - t0 < 60:
        if ct_count(bed) <= base:
            clean = time.perf_counter() - t0
            break
        time.sleep(0.02)
    time.sleep(0.5)
    stop.set()
    th.join(15)
    return {"unrelated": unrelated, "flows": with_flows - base, "del_p50_ms": pct(rm, .5) * 1e3,
            "del_p99_ms": pct(rm, .99) * 1e3, "del_total_s": total,
            "cleanup_done_s": clean, "left": ct_count(bed) - base, "hellos": len(hellos),
            "hello_p50_ms": pct(hellos, .5) * 1e3, "hello_p99_ms": pct(hellos, .99) * 1e3,
            "hello_max_ms": max(hellos, default=float("nan")) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="forwards deleted per run")
    ap.add_argument("--unrelated", default="0,30000", help="unrelated conntrack entries, comma-separated")
    ap.add_argument("--src", help="run the daemons from this checkout instead")
    ap.add_argument("--controld", action="store_true", help="also start controld (NAT2 too) for its idle RSS")
    a = ap.parse_args()
    env = {"PYTHONPATH": os.path.abspath(a.src)} if a.src else {}
    if a.src:
        os.chdir(a.src)  # `python -m` puts the working directory first on the daemons' path
    print(f"daemons from {a.src or 'this checkout'}")
    with tb.Testbed() as bed:
        if a.controld:
            bed.start_nat2()
        st = Stack(bed, env=env)
        try:
            st.start_natd()
            if a.controld:
                st.start_controld()
            time.sleep(3)
            for name in st.procs:
                pid = st.procs[name].pid
                print(f"{name} idle: RSS {rss_kib(pid) / 1024:.1f} MB, PSS {pss_kib(pid) / 1024:.1f} MB")
            c = NatdClient(st.rpc, None, curve_dir=st.curve_dir)
            try:
                for k in (int(x) for x in a.unrelated.split(",")):
                    r = deletes(st, c, a.n, k)
                    print(f"unrelated={r['unrelated']:>6} flows={r['flows']:>4}: Unbind p50 {r['del_p50_ms']:.2f} ms"
                          f" p99 {r['del_p99_ms']:.2f} ms total {r['del_total_s']:.2f} s; conntrack clean after "
                          f"{r['cleanup_done_s'] if r['cleanup_done_s'] is None else round(r['cleanup_done_s'], 2)}"
                          f" s ({r['left']} left); Hello p50 {r['hello_p50_ms']:.2f} p99 {r['hello_p99_ms']:.2f}"
                          f" max {r['hello_max_ms']:.1f} ms ({r['hellos']} sent)")
            finally:
                c.close()
        finally:
            st.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
