#!/usr/bin/env python3
"""IPv6 pinhole benchmark at natd level (docs/pinholes.md): prints figures, asserts nothing.

On the namespace bed with IPv6 (tests/bed/testbed.py, LAN6_PREFIX), natd ``--ipv6-firewall own``:
- PinholeAdd / PinholeDelete RPC latency (p50/p99) and rate, one by one, with N pinholes live at
  the end of the adds (each RPC: ZeroMQ ipc + validation + one nft transaction of one element);
- a PinholeSync of N (one transaction) and the restore of N after ``nft flush ruleset``;
- with those N live, PinholeCounters of one pinhole (what GetPinholePackets asks) and of all N,
  and natd's RSS around them.
The comparison with miniupnpd's AddPinhole (one rule per pinhole) through UPnP, in the same bed
with the same client, is the ``pinholes`` phase of bench/run (bench/harness.py).

Run as root on Debian 12 after ./scripts/setup:  .venv/bin/python bench/pinhole_bench.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import procs  # noqa: E402
from bench._bed import Stack, tb  # noqa: E402
from bench.systems import natd_pinholes as count  # noqa: E402
from natd.client import NatdClient  # noqa: E402
from shared import wire  # noqa: E402
from shared.const import TCP, UDP  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def pinhole(i: int, lease: int = 3600) -> wire.Pinhole:
    """The i-th pinhole: 200 LAN addresses, TCP and UDP alternating, distinct ports."""
    return wire.Pinhole(i + 1, TCP if i % 2 == 0 else UDP, f"2001:db8:1::{1000 + i % 200:x}",
                        1024 + i // 2 % 60000, lease)


def add_delete(c: NatdClient, n: int) -> dict:
    c.call(wire.PinholeSync([]), timeout=60)
    add, rm = [], []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        c.call(wire.PinholeAdd(pinhole(i)))
        add.append(time.perf_counter() - t)
    add_total = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        c.call(wire.PinholeDelete(i + 1))
        rm.append(time.perf_counter() - t)
    rm_total = time.perf_counter() - t0
    return {"add_p50": pct(add, .5), "add_p99": pct(add, .99), "add_rate": n / add_total,
            "del_p50": pct(rm, .5), "del_p99": pct(rm, .99), "del_rate": n / rm_total}


def counters(c: NatdClient, n: int, natd_pid: int, calls: int = 200) -> None:
    """PinholeCounters with ``n`` pinholes live: of one pinhole (GetPinholePackets), ``calls`` times over
    pinholes spread through the set, then of all ``n`` once; natd's RSS before and after."""
    before = procs.memory(natd_pid)
    one = []
    for k in range(calls):
        t = time.perf_counter()
        c.call(wire.PinholeCounters([1 + k * n // calls]))
        one.append(time.perf_counter() - t)
    t = time.perf_counter()
    reply = c.call(wire.PinholeCounters([]), timeout=120)
    every = time.perf_counter() - t
    after = procs.memory(natd_pid)
    assert isinstance(reply, wire.PinholeCountersReply) and before and after
    print(f"\n## PinholeCounters with {n} live: one pinhole p50 {pct(one, .5)*1e3:.2f} ms"
          f" p99 {pct(one, .99)*1e3:.2f} ms; all {len(reply.pids)} {every*1e3:.0f} ms;"
          f" natd RSS {before['rss_mib']:.1f} -> {after['rss_mib']:.1f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,4000", help="N values for add/delete")
    ap.add_argument("--sync", type=int, default=10000, help="N for the sync and the restore")
    args = ap.parse_args()
    bed = tb.Testbed(ipv6=True)
    bed.setup()
    most = max(args.sync, *(int(x) for x in args.sizes.split(",")))
    st = Stack(bed, natd_args=["--ipv6-firewall", "own", "--max-pinholes", str(most),
                               "--max-pinholes-per-host", str(most)])
    try:
        st.start_natd()
        c = NatdClient(st.rpc, st.events, timeout=120)
        print(f"natd pinhole benchmark on {os.cpu_count()} cores; bed {bed.prefix}")
        print("\n## PinholeAdd / PinholeDelete RPCs, one by one (ipc + validation + one nft transaction each)")
        print(f"{'N':>6} | {'add p50':>8} {'add p99':>8} {'adds/s':>8} | {'del p50':>8} {'del p99':>8} {'dels/s':>8}")
        for n in (int(x) for x in args.sizes.split(",")):
            r = add_delete(c, n)
            print(f"{n:>6} | {r['add_p50']*1e3:7.2f}ms {r['add_p99']*1e3:7.2f}ms {r['add_rate']:8.0f} | "
                  f"{r['del_p50']*1e3:7.2f}ms {r['del_p99']*1e3:7.2f}ms {r['del_rate']:8.0f}")
        print("miniupnpd AddPinhole/DeletePinhole beside igdpcp's, through UPnP: bench/run's pinholes phase")

        n = args.sync
        natd = st.procs["natd"].pid
        rss = procs.memory(natd)
        t = time.perf_counter()
        c.call(wire.PinholeSync([pinhole(i) for i in range(n)]), timeout=120)
        took = time.perf_counter() - t
        time.sleep(1.0)  # natd gives the heap back at the first quiet moment after a bulk write
        after = procs.memory(natd)
        assert rss and after
        print(f"\n## PinholeSync of {n}: {took*1e3:.0f} ms;"
              f" natd RSS {rss['rss_mib']:.1f} -> {after['rss_mib']:.1f} MiB")
        t = time.perf_counter()
        bed.run("cpe", ["nft", "flush", "ruleset"])
        deadline = time.monotonic() + 30
        while count(bed) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        print(f"## restore of {n} after nft flush ruleset: {(time.perf_counter() - t)*1e3:.0f} ms "
              f"({count(bed)} back; includes natd's up-to-1 s generation check)")
        counters(c, n, natd)
        c.close()
    finally:
        st.close()
        bed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
