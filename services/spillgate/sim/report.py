"""Terminal table, JSON and PNG plots of simulator results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spillgate.sim.harness import RunResult

COLUMNS = (
    ("scenario", 13),
    ("policy", 18),
    ("SLA %", 6),
    ("goodput/s", 9),
    ("TTFT p50", 8),
    ("TTFT p99", 8),
    ("E2E p50", 8),
    ("E2E p99", 8),
    ("ovf %", 5),
    ("shed", 7),
    ("err", 6),
    ("peak nb load", 12),
    ("hit %", 5),
)


def row(r: RunResult) -> list[str]:
    """One table row: totals over all regions."""
    a = r.summary["all"]
    util = r.summary["utilisation"]
    nb = max((u["load_peak_while_receiving_overflow"] for u in util.values()), default=0.0)
    return [
        r.scenario,
        r.policy,
        f"{100 * a['sla_attainment']:.1f}",
        f"{a['goodput_rps']:.0f}",
        f"{a['ttft_ms']['p50']:.0f}",
        f"{a['ttft_ms']['p99']:.0f}",
        f"{a['e2e_ms']['p50']:.0f}",
        f"{a['e2e_ms']['p99']:.0f}",
        f"{100 * a['overflow_share']:.1f}",
        str(a["shed"]),
        str(a["errors"]),
        f"{nb:.2f}",
        f"{100 * a['prefix_hit_rate']:.0f}",
    ]


def table(results: Sequence[RunResult]) -> str:
    """Fixed-width table, best SLA attainment per scenario marked with '*'."""
    best: dict[str, float] = {}
    for r in results:
        best[r.scenario] = max(best.get(r.scenario, 0.0), r.summary["all"]["sla_attainment"])
    lines = ["  ".join(name.rjust(w) for name, w in COLUMNS)]
    for r in results:
        cells = row(r)
        if r.summary["all"]["sla_attainment"] >= best[r.scenario]:
            cells[2] = "*" + cells[2]
        lines.append("  ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    return "\n".join(lines)


def markdown(results: Sequence[RunResult]) -> str:
    """The same table in Markdown (for README)."""
    head = [name for name, _ in COLUMNS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(out)


def to_json(results: Sequence[RunResult], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything but the raw latency lists."""
    return {
        "meta": meta,
        "runs": [
            {
                "scenario": r.scenario,
                "policy": r.policy,
                "scale": r.scale,
                "requests": r.requests,
                "wall_s": round(r.wall_s, 3),
                "requests_per_wall_s": round(r.requests_per_wall_s, 1),
                "summary": r.summary,
                "samples": r.samples,
            }
            for r in results
        ],
    }


def write_json(path: Path, results: Sequence[RunResult], meta: dict[str, Any]) -> None:
    """Write results.json (wall times aside, identical for the same seed)."""
    path.write_text(json.dumps(to_json(results, meta), indent=1, sort_keys=True) + "\n")


def plots(out: Path, results: Sequence[RunResult]) -> list[Path]:
    """Per scenario: latency CDFs, utilisation over time per region, overflow flows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written: list[Path] = []
    scenarios = sorted({r.scenario for r in results})
    for sc in scenarios:
        runs = [r for r in results if r.scenario == sc]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
        for r in runs:
            e2e = np.sort(np.asarray(r.e2e_ok_ms))
            if len(e2e):
                ax.plot(e2e, np.arange(1, len(e2e) + 1) / len(e2e), label=r.policy)
        ax.axvline(1200, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end latency of served requests (ms)")
        ax.set_ylabel("CDF")
        ax.set_title(f"{sc}: latency CDF")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / f"{sc}-latency-cdf.png", plt))

        regions = list(runs[0].summary["regions"])
        fig, axes = plt.subplots(
            1, len(regions), figsize=(4 * len(regions), 3.2), dpi=80, sharey=True
        )
        for ax, region in zip(np.atleast_1d(axes), regions, strict=True):
            for r in runs:
                t = [s["t_s"] for s in r.samples]
                ax.plot(t, [s["load"][region] for s in r.samples], label=r.policy, lw=1)
            ax.axhline(1.0, color="grey", ls="--", lw=0.8)
            ax.set_title(f"{region}: (running + waiting) / slots")
            ax.set_xlabel("simulated s")
        np.atleast_1d(axes)[0].legend(fontsize=6)
        written.append(_save(fig, out / f"{sc}-utilisation.png", plt))

        flows = sorted({f for r in runs for f in r.summary["flows"]})
        fig, ax = plt.subplots(figsize=(7, 3.5), dpi=80)
        width = 0.8 / max(len(runs), 1)
        for k, r in enumerate(runs):
            vals = [r.summary["flows"].get(f, {}).get("requests", 0) for f in flows]
            ax.bar(np.arange(len(flows)) + k * width, vals, width, label=r.policy)
        ax.set_xticks(np.arange(len(flows)) + 0.4 - width / 2, flows, fontsize=7)
        ax.set_ylabel("requests served cross-region")
        ax.set_title(f"{sc}: overflow flows")
        ax.legend(fontsize=6)
        written.append(_save(fig, out / f"{sc}-flows.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
