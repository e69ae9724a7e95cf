"""Tables, JSON results and PNG plots of replay runs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from tokenmill.bench.metrics import RunResult, RunSummary, Stat
from tokenmill.bench.slo import SLOReport
from tokenmill.bench.sweep import SweepPoint
from tokenmill.plotting import pyplot


def jsonable(x: Any) -> Any:
    """Plain JSON values: inf/nan become None, tuples become lists, dataclass dicts pass through."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return jsonable(x.item())
    return x


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=1) + "\n", encoding="utf-8")


def run_payload(run: RunResult, summary: RunSummary, slo: SLOReport | None, rate: float | None = None) -> dict:
    return {
        "label": run.label,
        "rate": rate,
        "duration_s": run.duration_s,
        "abandoned_turns": run.abandoned_turns,
        "clipped_gaps": run.clipped_gaps,
        "info": run.info,
        "summary": summary.as_dict(),
        "slo": slo.as_dict() if slo else None,
        "requests": [r.as_dict() for r in run.requests],
    }


def _ms(stat: Stat | None, field: str) -> str:
    if stat is None:
        return "-"
    return f"{getattr(stat, field) * 1000:.1f}"


def summary_table(summary: RunSummary, title: str = "") -> Table:
    t = Table(title=title or None, show_header=True, header_style="bold")
    t.add_column("metric")
    for col in ("mean", "p50", "p90", "p99", "max"):
        t.add_column(f"{col} (ms)", justify="right")
    for name in ("ttft", "tpot", "itl", "e2e"):
        stat = getattr(summary, name)
        t.add_row(name.upper(), *(_ms(stat, f) for f in ("mean", "p50", "p90", "p99", "max")))
    return t


def totals_table(summary: RunSummary, slo: SLOReport | None = None) -> Table:
    t = Table(show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    t.add_row("requests ok / failed / abandoned", f"{summary.num_ok} / {summary.num_failed} / {summary.num_abandoned}")
    t.add_row("duration", f"{summary.duration_s:.2f} s")
    t.add_row("request throughput", f"{summary.request_throughput:.3f} req/s")
    t.add_row("input tokens/s", f"{summary.input_token_throughput:.1f}")
    t.add_row("output tokens/s", f"{summary.output_token_throughput:.1f}")
    if summary.cache_hit_ratio is not None:
        t.add_row("cached prompt tokens", f"{summary.cached_tokens} ({summary.cache_hit_ratio:.1%})")
    if summary.output_length_match is not None:
        t.add_row("answers of the planned length", f"{summary.output_length_match:.1%}")
    if summary.errors:
        t.add_row("errors", ", ".join(f"{k}: {v}" for k, v in sorted(summary.errors.items())))
    if slo is not None:
        for c in slo.checks:
            obs = f"observed {c.observed_s * 1000:.1f} ms, " if c.observed_s is not None and math.isfinite(c.observed_s) else ""
            t.add_row(f"SLO {c.target}", f"{obs}{c.attainment:.1%} within -> {'met' if c.ok else 'MISSED'}")
        t.add_row("goodput", f"{slo.goodput_rps:.3f} req/s ({slo.attainment:.1%} of requests)")
    return t


def sweep_table(points: Sequence[SweepPoint], best: float | None) -> Table:
    t = Table(title="rate sweep", header_style="bold")
    for col in ("rate", "req/s", "goodput req/s", "attainment", "TTFT p90 ms", "TPOT p90 ms", "failed", "SLOs"):
        t.add_column(col, justify="right")
    for p in sorted(points, key=lambda p: p.rate):
        s = p.summary
        t.add_row(
            f"{p.rate:g}" + (" *" if best is not None and p.rate == best else ""),
            f"{s.request_throughput:.3f}",
            f"{p.slo.goodput_rps:.3f}",
            f"{p.slo.attainment:.1%}",
            _ms(s.ttft, "p90"),
            _ms(s.tpot, "p90"),
            str(s.num_failed),
            "met" if p.ok else "missed",
        )
    return t


def plot_latency_cdfs(runs: Sequence[RunResult], path: str | Path) -> Path:
    """TTFT, TPOT, ITL and E2E empirical CDFs, one line per run."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    metrics = (
        ("TTFT", lambda rs: [r.ttft_s for r in rs]),
        ("TPOT", lambda rs: [r.tpot_s for r in rs]),
        ("ITL", lambda rs: [x for r in rs for x in r.itl_s]),
        ("E2E", lambda rs: [r.e2e_s for r in rs]),
    )
    for ax, (name, get) in zip(axes.flat, metrics):
        for run in runs:
            v = np.sort(np.asarray([x for x in get([r for r in run.requests if r.ok]) if x is not None], dtype=float))
            if v.size:
                ax.step(v * 1000, np.arange(1, v.size + 1) / v.size, where="post", label=run.label or None)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of token gaps")
        ax.grid(alpha=0.3)
        if name in ("TTFT", "E2E") and ax.has_data():
            ax.set_xscale("log")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if any(labels):
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)))
    fig.suptitle("latency CDFs")
    fig.tight_layout(rect=(0, 0.05 if any(labels) else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_goodput_vs_rate(points: Sequence[SweepPoint], path: str | Path, unit: str = "sessions/s") -> Path:
    plt = pyplot()
    pts = sorted(points, key=lambda p: p.rate)
    rates = [p.rate for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(rates, [p.summary.request_throughput for p in pts], "o-", label="throughput (req/s)")
    ax.plot(rates, [p.slo.goodput_rps for p in pts], "s-", label="goodput (req/s)")
    for p in pts:
        ax.annotate("met" if p.ok else "missed", (p.rate, p.slo.goodput_rps), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8, color="green" if p.ok else "red")
    ax2 = ax.twinx()
    ax2.plot(rates, [p.slo.attainment for p in pts], "d--", color="gray", label="SLO attainment")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("fraction of requests meeting SLOs")
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"offered rate ({unit})")
    ax.set_ylabel("requests per second")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
