"""Charts for docs/bench from results.json (runs in .bench/plot, which has matplotlib).

.bench/plot/bin/python bench/plot.py docs/bench/results.json docs/bench
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def throughput(results: dict, out: Path) -> None:
    layouts = list(results["layouts"])
    fig, axes = plt.subplots(1, len(layouts), figsize=(6.5 * len(layouts), 5), squeeze=False)
    for ax, layout in zip(axes[0], layouts, strict=True):
        runs = results["layouts"][layout]["runs"]
        names = list(runs)
        vals = [runs[n]["tx_s"] for n in names]
        colors = ["#1f77b4" if n.startswith("gapfill") else "#999999" for n in names]
        labels = [n + (" *" if runs[n].get("extrapolated") else "") for n in names]
        bars = ax.barh(labels, vals, color=colors)
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:,.0f}", va="center", fontsize=8)
        ch = results["layouts"][layout]["chain"]
        ax.set_title(f"{layout}: {ch['txs']:,} txs, {ch['blocks']:,} blocks, {ch['tracked']:,} tracked")
        ax.set_xlabel("tracked transactions per second (wall clock)")
        ax.invert_yaxis()
        ax.set_xlim(0, max(vals) * 1.2 if vals else 1)
    fig.suptitle(
        f"gapfill vs peers ({results['date'][:10]}, {results['machine']['nproc']} cores; "
        "* = subset, extrapolated)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)


def scaling(results: dict, out: Path) -> None:
    e2e = results["layouts"].get("dense", {}).get("scaling_e2e", [])
    store = results.get("scaling_store", [])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for backend in sorted({s["backend"] for s in e2e}):
        pts = sorted((s["refs"], s["wall_s"], s["maxrss_mb"]) for s in e2e if s["backend"] == backend)
        a1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"enrich end-to-end, {backend}")
        a2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"enrich end-to-end, {backend}")
    for s in store:
        for step, marker in (("plan", "s"), ("iter", "^"), ("lease", "D")):
            a1.plot([s["refs"]], [s[step]["wall_s"]], marker, label=f"{step} 1M, {s['backend']}")
            a2.plot([s["refs"]], [s[step]["maxrss_mb"]], marker, label=f"{step} 1M, {s['backend']}")
    for ax, title, unit in ((a1, "seconds vs gap size", "seconds"), (a2, "peak RSS vs gap size", "MB")):
        ax.set_xscale("log")
        ax.set_xlabel("refs in the gap")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a2.axhline(300, color="red", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)


def main() -> int:
    results = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    throughput(results, out)
    scaling(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
