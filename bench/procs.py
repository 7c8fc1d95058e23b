"""What a daemon costs, read from /proc: RSS and PSS (smaps_rollup), CPU seconds, pinning to a core."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable

_TICK = os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, float] | None:
    """RSS and PSS of ``pid`` in MiB from /proc/PID/smaps_rollup (None if it is gone)."""
    vals: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    vals[f"{key.lower()}_mib"] = int(rest.split()[0]) / 1024
    except OSError:
        return None
    return vals


def _sum(mems: Iterable[dict[str, float] | None]) -> dict[str, float]:
    known = [m for m in mems if m]
    return {k: sum(m.get(k, 0.0) for m in known) for k in ("rss_mib", "pss_mib")}


def memory_of(pids: dict[str, int]) -> dict[str, dict[str, float] | None]:
    """Memory of each named process plus their "total"."""
    out: dict[str, dict[str, float] | None] = {name: memory(pid) for name, pid in pids.items()}
    if len(pids) > 1:
        out["total"] = _sum(out.values())
    return out


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (from each process's stat: /proc/PID/task/*/children needs a
    kernel built with CONFIG_PROC_CHILDREN)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # field 4 of stat
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == pid:
            out.append(int(name))
    return out


def children_memory(pid: int) -> dict[str, float] | None:
    """RSS and PSS of the child processes of ``pid`` together, in MiB (None if it has none)."""
    mems = [memory(c) for c in children(pid)]
    return _sum(mems) if any(mems) else None


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (all their threads)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)
    return total


def pin(pids: Iterable[int], cpu: int = 0) -> None:
    """Pin every thread of ``pids`` to one core (``taskset -a``), as on a single-core router."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], capture_output=True, timeout=10,
                       check=True)
