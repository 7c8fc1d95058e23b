"""Results documents as a full ``bench/run`` writes them, for the benchmark's unit tests."""

from __future__ import annotations

from typing import Any

from bench import report


def stat(p50: float, total: float, n: int = 100) -> dict[str, float]:
    return {"n": n, "p50_ms": p50, "p99_ms": p50 * 2, "mean_ms": p50, "max_ms": p50 * 3, "total_s": total}


def row(system: str, n: int, add: float, delete: float, quiet: float, list_total: float,
        del_total: float, pinned: bool = False) -> dict[str, Any]:
    return {"system": system, "n": n, "pinned": pinned, "add": stat(add, add * n / 1e3, n),
            "list": {"total_s": list_total, "entries": n, "per_entry_ms": 1e3 * list_total / n},
            "delete": stat(delete, del_total, n), "delete_quiet": stat(quiet, 0.1, 20),
            "delete_all_total_s": del_total, "conntrack": {"before": 31000, "after": 31000},
            "cpu_s_per_1k": {"add": 1.0, "list": 0.5, "delete": 2.0},
            "memory": {"natd": {"rss_mib": 30.0, "pss_mib": 20.0}}}


def make_doc() -> dict[str, Any]:
    """A complete results document as a full run writes it."""
    doc: dict[str, Any] = {
        "schema": report.SCHEMA_VERSION,
        "meta": {"date": "2026-12-04T16:00:00+00:00", "machine": {"cpu": "test", "arch": "x86_64"},
                 "kernel": "6.1", "python": "3.11.2", "cpus": 2, "quick": False, "argv": [],
                 "packages": {"miniupnpc": "2.3.3", "deb:miniupnpd-nftables": "2.3.1-1"}, "commit": "abc"},
        "control": [row("igdpcp", 1000, 0.8, 0.9, 0.8, 0.2, 1.0), row("miniupnpd", 1000, 10.0, 7.0, 7.0, 0.3, 15.0),
                    row("igdpcp", 3000, 0.9, 1.5, 1.0, 0.9, 5.0), row("miniupnpd", 3000, 30.0, 20.0, 20.0, 1.3, 40.0),
                    row("igdpcp", 10000, 0.95, 1.0, 0.9, 3.0, 10.0),
                    row("igdpcp", 1000, 0.5, 0.5, 0.5, 0.1, 0.5, pinned=True)],
        "memory": {"igdpcp": {"idle": {"natd": {"rss_mib": 30.0, "pss_mib": 20.0},
                                       "controld": {"rss_mib": 25.0, "pss_mib": 15.0}},
                              "loaded": {"n": 10000, "total": {"rss_mib": 59.0, "pss_mib": 40.0}}}},
        "dataplane": [{"system": "igdpcp", "n": 1, "conn_per_s": 12000.0}],
        "cascaded": {"n": 1000, "add": stat(5.0, 5.0), "nat2": stat(4.5, 4.5), "ours": stat(0.5, 0.5)},
        "natpmp": {"available": False, "reason": "no answer"},
        "restart": {"n": 10000, "controld_first_soap_s": 1.5, "natd_restart_s": 1.2, "nft_flush_s": None},
        "goals": [],
    }
    return report.with_goals(doc)
