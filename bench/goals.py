"""Issue 12's goals as one data table, and their evaluation against a results document.

Each goal says met or short with the ratio measured / target (for "<=" goals at most 1 is met,
for ">=" goals at least 1). Goals that need a figure this run did not measure say "n/a".
The benchmark prints these; tests never assert timings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

REFERENCE_N = 1000  # growth goals compare the largest N with this one (or the smallest measured)


@dataclass(frozen=True)
class Goal:
    """One goal. ``kind`` picks the evaluation:

    - ``each_n``: ``metric`` of igdpcp's control-plane row at every measured N (or only ``at``) vs ``target``;
    - ``growth``: ``metric`` at the largest N divided by the same at the reference N, vs ``target``;
    - ``each_n_ratio``: ``metric`` / ``base`` in the same row (e.g. deletes with and without conntrack load);
    - ``vs_miniupnpd``: miniupnpd's ``metric`` divided by ours at each N both measured (or only ``at``);
    - ``scalar``: the value at the dotted ``path`` in the results.
    """

    gid: str
    text: str
    kind: str
    target: float
    cmp: str  # "le" or "ge"
    unit: str = ""
    metric: str = ""
    base: str = ""
    path: str = ""
    at: tuple[int, ...] = ()


GOALS: tuple[Goal, ...] = (
    Goal("delete-p50", "DeletePortMapping p50 <= 1 ms (>= 30k conntrack entries)", "each_n", 1.0, "le", "ms",
         metric="delete.p50_ms"),
    # "no growth" on the mean: a batched delete's p50 can hide a tail that grows (the mean carries it)
    Goal("delete-flat-n", "delete mean flat in N (largest N / 1k <= 1.2)", "growth", 1.2, "le", "x",
         metric="delete.mean_ms"),
    Goal("delete-flat-ct", "delete mean flat in conntrack load (loaded / quiet <= 1.2)", "each_n_ratio", 1.2, "le",
         "x", metric="delete.mean_ms", base="delete_quiet.mean_ms"),
    Goal("delete-vs-miniupnpd", "delete totals >= 10x faster than miniupnpd's", "vs_miniupnpd", 10.0, "ge", "x",
         metric="delete_all_total_s", at=(1000, 3000)),
    Goal("list-vs-miniupnpd", "GetGeneric listing total at least as fast as miniupnpd's", "vs_miniupnpd", 1.0, "ge",
         "x", metric="list.total_s"),
    Goal("list-flat-n", "listing per-entry cost flat (largest N / 1k <= 1.2)", "growth", 1.2, "le", "x",
         metric="list.per_entry_ms"),
    Goal("add-p50", "AddPortMapping p50 <= 1 ms", "each_n", 1.0, "le", "ms", metric="add.p50_ms"),
    Goal("cascaded-ours", "cascaded add: our share p50 <= 0.7 ms", "scalar", 0.7, "le", "ms",
         path="cascaded.ours.p50_ms"),
    Goal("natpmp-p50", "LAN NAT-PMP map p50 <= 1 ms (nat1-only)", "scalar", 1.0, "le", "ms",
         path="natpmp.igdpcp.natpmp.1000.p50_ms"),
    Goal("pcp-p50", "LAN PCP MAP p50 <= 1 ms (nat1-only)", "scalar", 1.0, "le", "ms",
         path="natpmp.igdpcp.pcp.1000.p50_ms"),
    Goal("natpmp-vs-miniupnpd", "LAN NAT-PMP map totals >= 10x miniupnpd's", "scalar", 10.0, "ge", "x",
         path="natpmp.speedup.natpmp_1000"),
    Goal("pcp-vs-miniupnpd", "LAN PCP MAP totals >= 10x miniupnpd's", "scalar", 10.0, "ge", "x",
         path="natpmp.speedup.pcp_1000"),
    Goal("mem-controld-idle", "controld RSS idle <= 20 MiB", "scalar", 20.0, "le", "MiB",
         path="memory.igdpcp.idle.controld.rss_mib"),
    Goal("mem-natd-idle", "natd RSS idle <= 35 MiB", "scalar", 35.0, "le", "MiB",
         path="memory.igdpcp.idle.natd.rss_mib"),
    Goal("mem-loaded", "natd + controld RSS at the largest N (10k) <= 60 MiB", "scalar", 60.0, "le", "MiB",
         path="memory.igdpcp.loaded.total.rss_mib"),
    Goal("mem-restarted", "the same after both restarted with their 10k (a router after a reboot) <= 60 MiB",
         "scalar", 60.0, "le", "MiB", path="memory.igdpcp.restarted.total.rss_mib"),
    Goal("start-controld", "controld's first SOAP answer after start <= 2 s", "scalar", 2.0, "le", "s",
         path="restart.controld_first_soap_s"),
    Goal("start-natd", "forwards back in the kernel after a natd restart <= 1 s", "scalar", 1.0, "le", "s",
         path="restart.natd_restart_s"),
    Goal("start-flush", "forwards back in the kernel after `nft flush ruleset` <= 1 s", "scalar", 1.0, "le", "s",
         path="restart.nft_flush_s"),
)


@dataclass(frozen=True)
class Verdict:
    """One evaluated goal at one place (``where``: e.g. "N=1000")."""

    gid: str
    text: str
    where: str
    value: float | None
    target: float
    cmp: str
    unit: str

    @property
    def ratio(self) -> float | None:
        """measured / target (None when not measured or the target is 0)."""
        if self.value is None or self.target == 0:
            return None
        return self.value / self.target

    @property
    def status(self) -> str:
        """"met", "short" or "n/a"."""
        if self.value is None:
            return "n/a"
        ok = self.value <= self.target if self.cmp == "le" else self.value >= self.target
        return "met" if ok else "short"

    def as_dict(self) -> dict[str, Any]:
        """JSON form, with the derived status and ratio."""
        return {**asdict(self), "status": self.status, "ratio": self.ratio}


def lookup(doc: Any, path: str) -> Any:
    """The value at a dotted ``path`` in nested dicts, or None if any step is missing."""
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def control_rows(results: dict[str, Any], system: str) -> dict[int, dict[str, Any]]:
    """The unpinned control-plane rows of ``system`` by N."""
    return {int(r["n"]): r for r in results.get("control", [])
            if r.get("system") == system and not r.get("pinned")}


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _evaluate(goal: Goal, results: dict[str, Any]) -> Iterator[Verdict]:
    ours = control_rows(results, "igdpcp")

    def verdict(where: str, value: float | None) -> Verdict:
        return Verdict(goal.gid, goal.text, where, value, goal.target, goal.cmp, goal.unit)

    if goal.kind == "scalar":
        parts = goal.path.split(".")
        n = next((lookup(results, ".".join(parts[:k] + ["n"])) for k in range(len(parts) - 1, 0, -1)
                  if lookup(results, ".".join(parts[:k] + ["n"])) is not None), None)
        yield verdict(f"N={n}" if n is not None else "", _num(lookup(results, goal.path)))
    elif goal.kind in ("each_n", "each_n_ratio"):
        ns = [n for n in sorted(ours) if not goal.at or n in goal.at]
        if not ns:
            yield verdict("", None)
        for n in ns:
            v = _num(lookup(ours[n], goal.metric))
            if goal.kind == "each_n_ratio":
                b = _num(lookup(ours[n], goal.base))
                v = v / b if v is not None and b else None
            yield verdict(f"N={n}", v)
    elif goal.kind == "growth":
        if len(ours) < 2:
            yield verdict("", None)
            return
        ref = REFERENCE_N if REFERENCE_N in ours else min(ours)
        top = max(ours)
        a, b = _num(lookup(ours[top], goal.metric)), _num(lookup(ours[ref], goal.metric))
        yield verdict(f"N={top} vs {ref}", a / b if a is not None and b else None)
    elif goal.kind == "vs_miniupnpd":
        theirs = control_rows(results, "miniupnpd")
        ns = [n for n in sorted(ours) if n in theirs and (not goal.at or n in goal.at)]
        if not ns:
            yield verdict("N=" + "/".join(map(str, goal.at)) if goal.at else "", None)
        for n in ns:
            a, b = _num(lookup(theirs[n], goal.metric)), _num(lookup(ours[n], goal.metric))
            yield verdict(f"N={n}", a / b if a is not None and b else None)
    else:
        raise ValueError(f"goal {goal.gid}: unknown kind {goal.kind!r}")


def evaluate(results: dict[str, Any], goals: tuple[Goal, ...] = GOALS) -> list[Verdict]:
    """Every goal against ``results``, one verdict per goal and place."""
    return [v for g in goals for v in _evaluate(g, results)]
