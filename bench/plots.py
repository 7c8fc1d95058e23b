"""PNG plots of one results document: latency and memory vs N for both systems (needs matplotlib)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

_STYLE = {"igdpcp": "-o", "miniupnpd": "--s"}
_COLOR = {"igdpcp": "C0", "miniupnpd": "C1"}


def _rows(doc: dict[str, Any], system: str) -> list[dict[str, Any]]:
    return sorted((r for r in doc["control"] if r["system"] == system and not r["pinned"]), key=lambda r: r["n"])


def draw(doc: dict[str, Any], base: str) -> list[str]:
    """Write ``base``-latency.png and ``base``-memory.png; returns their paths."""
    title = f"{doc['meta']['date'][:10]}, {doc['meta']['cpus']} CPUs{' (quick)' if doc['meta']['quick'] else ''}"
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, label) in zip(axes, (("add.p50_ms", "AddPortMapping p50 (ms)"),
                                       ("list.per_entry_ms", "GetGeneric per entry (ms)"),
                                       ("delete.p50_ms", "DeletePortMapping p50 and mean (ms), conntrack loaded")),
                                strict=True):
        sec, field = key.split(".")
        for system in ("igdpcp", "miniupnpd"):
            rows = _rows(doc, system)
            if rows:
                ax.plot([r["n"] for r in rows], [r[sec][field] for r in rows], _STYLE[system], color=_COLOR[system],
                        label=system)
                if sec == "delete":  # batched deletes: the mean shows the tail the p50 hides
                    ax.plot([r["n"] for r in rows], [r[sec]["mean_ms"] for r in rows], _STYLE[system][:-1] + "^",
                            color=_COLOR[system], alpha=0.5, label=f"{system} mean")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("mappings N")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"igdpcp vs miniupnpd: latency vs N ({title})")
    fig.tight_layout()
    lat = base + "-latency.png"
    fig.savefig(lat, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for system in ("igdpcp", "miniupnpd"):
        rows = _rows(doc, system)
        procs = sorted({p for r in rows for p, m in r["memory"].items() if isinstance(m, dict)})
        for proc in procs:
            for key, style in (("rss_mib", _STYLE[system]), ("pss_mib", ":")):
                pts = [(r["n"], r["memory"][proc][key]) for r in rows if r["memory"].get(proc)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                        label=f"{system}: {proc} {key[:3].upper()}")
    ax.set_xscale("log")
    ax.set_xlabel("mappings N")
    ax.set_ylabel("MiB")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"memory vs N ({title})", fontsize=10)
    fig.tight_layout()
    mem = base + "-memory.png"
    fig.savefig(mem, dpi=100)
    plt.close(fig)
    return [lat, mem]
