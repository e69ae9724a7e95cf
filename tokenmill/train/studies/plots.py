"""PNG plots of the Parcae studies, from the runs' log.jsonl files.

Sweep (one panel per injection, one line per learning rate; a cross marks where a diverged run stopped):
    sweep_loss.png        training loss vs step
    sweep_rho.png         ρ(Ā) vs step
    sweep_state_norm.png  loop-state norm ||h_T|| vs step (log scale)
    sweep_final_loss.png  final validation loss vs learning rate, diverged runs marked
Quality:
    quality_loss_vs_tokens.png, quality_loss_vs_flops.png   validation loss of Parcae and the transformers
    quality_loss_vs_T.png                                   Parcae's validation loss vs test-time loops
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from tokenmill.plotting import pyplot


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict[str, Any]], kind: str, x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if r.get("kind") == kind and r.get(y) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] if math.isfinite(p[1]) else float("nan") for p in pts]


def _panels(n: int, title: str):
    plt = pyplot()
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), sharey=True, squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def plot_sweep(sweep_dir: str | Path, out_dir: str | Path) -> list[Path]:
    plt = pyplot()
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    summary = json.loads((sweep_dir / "summary.json").read_text())
    runs = summary["runs"]
    injections = list(dict.fromkeys(r["injection"] for r in runs))
    lrs = sorted({r["lr"] for r in runs})
    cmap = plt.get_cmap("viridis")
    color = {lr: cmap(i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
    # run folders sit inside the sweep folder; prefer that over the recorded path (the study may have run elsewhere)
    logs = {r["run"]: read_log(sweep_dir / r["run"] if (sweep_dir / r["run"]).exists() else r["out_dir"]) for r in runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, ylabel, fname, logy in (
        ("loss", "training loss", "sweep_loss.png", False),
        ("rho", "ρ(Ā) (spectral radius)", "sweep_rho.png", False),
        ("state_norm", "loop state norm ||h_T||", "sweep_state_norm.png", True),
    ):
        fig, axes = _panels(len(injections), f"LR sweep: {ylabel}")
        for ax, inj in zip(axes, injections):
            for r in (r for r in runs if r["injection"] == inj):
                xs, ys = _series(logs[r["run"]], "train", "step", metric)
                if not xs:
                    continue
                ax.plot(xs, ys, color=color[r["lr"]], label=f"{r['lr']:g}", lw=1.2)
                if r.get("status") != "completed":
                    finite = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
                    if finite:
                        ax.plot(*finite[-1], marker="x", color=color[r["lr"]], ms=9, mew=2)
            ax.set_title(inj)
            ax.set_xlabel("step")
            if logy:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(ylabel)
        if metric == "loss":
            low = [y for r in runs for y in _series(logs[r["run"]], "train", "step", "loss")[1] if math.isfinite(y)]
            if low:
                axes[0].set_ylim(min(low) - 0.2, min(max(low), min(low) + 6))
        axes[-1].legend(title="lr", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        written.append(out_dir / fname)

    fig, ax = plt.subplots(figsize=(6, 4))
    for inj in injections:
        pts = [(r["lr"], r.get("val_loss")) for r in runs if r["injection"] == inj]
        ok = [(lr, v) for lr, v in pts if v is not None and math.isfinite(v)]
        line = ax.plot([p[0] for p in ok], [p[1] for p in ok], marker="o", label=inj)[0]
        bad = [r["lr"] for r in runs if r["injection"] == inj and r.get("status") != "completed"]
        finite_vals = [r["val_loss"] for r in runs if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
        top = max(finite_vals, default=10.0)
        ax.plot(bad, [top + 0.3] * len(bad), marker="x", ls="none", color=line.get_color(), ms=9, mew=2)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (x: diverged)")
    ax.set_title("LR sweep: which runs converge")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "sweep_final_loss.png", dpi=120)
    plt.close(fig)
    written.append(out_dir / "sweep_final_loss.png")
    return written


def plot_quality(quality_dir: str | Path, out_dir: str | Path) -> list[Path]:
    plt = pyplot()
    quality_dir, out_dir = Path(quality_dir), Path(out_dir)
    summary = json.loads((quality_dir / "quality.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for x, fname, xlabel in (
        ("tokens", "quality_loss_vs_tokens.png", "training tokens"),
        ("flops", "quality_loss_vs_flops.png", "training FLOPs"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, run in summary["runs"].items():
            rows = read_log(quality_dir / name if (quality_dir / name).exists() else run.get("out_dir", ""))
            xs, ys = _series(rows, "eval", x, "val_loss")
            if xs:
                params = run.get("params")
                label = f"{name} ({params / 1e6:.1f}M params)" if params else name
                ax.plot(xs, ys, marker=".", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Parcae vs fixed-depth transformer ({xlabel})")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        written.append(out_dir / fname)
    if summary.get("loss_vs_T"):
        fig, ax = plt.subplots(figsize=(6, 4))
        ts = [r["T"] for r in summary["loss_vs_T"]]
        ax.plot(ts, [r["val_loss"] for r in summary["loss_vs_T"]], marker="o", label="Parcae")
        for name, loss in summary.get("transformer_val_loss_same_batches", {}).items():
            ax.axhline(loss, ls="--", lw=1, color="gray" if name.endswith("tokens") else "black", label=name)
        mu = summary.get("mean_recurrence")
        if mu:
            ax.axvline(mu, color="red", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("test-time loops T")
        ax.set_ylabel("validation loss")
        ax.set_title("Parcae: loss vs test-time recurrence")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "quality_loss_vs_T.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "quality_loss_vs_T.png")
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", default=None, help="a sweep folder (with summary.json)")
    p.add_argument("--quality", default=None, help="a quality folder (with quality.json)")
    p.add_argument("--out", default="docs/parcae", help="where the PNGs go (default: %(default)s)")


def run_from_args(args: argparse.Namespace) -> int:
    if not args.sweep and not args.quality:
        raise ValueError("give --sweep and/or --quality")
    written = []
    if args.sweep:
        written += plot_sweep(args.sweep, args.out)
    if args.quality:
        written += plot_quality(args.quality, args.out)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.train.studies.plots", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
