"""The stability study: a learning-rate sweep of parcae vs linear vs additive injection at a small size.

Every (injection, lr) run trains the same model size on the same tokens in the same order; runs that hit NaN or a
runaway loss stop early and are reported as diverged, with the loss spikes counted for every run. Each run writes
log.jsonl (loss, grad norm, lr, ρ(Ā), loop-state norm per logged step) under OUT/<injection>_lr<lr>/, and the sweep
writes OUT/summary.json.

Default size ("sweep" config): d=256, 4 heads, 2/2/2 prelude/core/coda blocks, 8192-token BPE, seq 256, batch 64,
μ=8 (per-sequence Poisson), k=4, 600 steps = 9.8M tokens per run; 21 runs. On an H100 with 4 runs at a time the
whole sweep is expected to take about 4-6 minutes. `--tiny` runs the same grid at toy size on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.models.parcae import INJECTIONS, get_config
from tokenmill.train.data import DEFAULT_DATA_DIR
from tokenmill.train.studies import run_many
from tokenmill.train.trainer import TrainConfig

DEFAULT_LRS = (2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 2e-3, 4e-3)


@dataclass
class SweepSettings:
    out_dir: str = "runs/lr-sweep"
    data_dir: str = str(DEFAULT_DATA_DIR)
    injections: tuple[str, ...] = INJECTIONS
    lrs: tuple[float, ...] = DEFAULT_LRS
    model: str = "sweep"
    steps: int = 600
    batch_size: int = 64
    seq_len: int = 256
    warmup_steps: int = 60
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 5
    jobs: int = 4
    device: str = "auto"
    seed: int = 0
    compile: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def tiny(cls, **kw: Any) -> SweepSettings:
        base = {
            "model": "tiny",
            "steps": 40,
            "batch_size": 8,
            "seq_len": 64,
            "warmup_steps": 5,
            "eval_every": 0,
            "eval_batches": 2,
            "log_every": 2,
            "jobs": 1,
        }
        return cls(**(base | kw))


def run_name(injection: str, lr: float) -> str:
    return f"{injection}_lr{lr:.0e}".replace("e-0", "e-")


def sweep_configs(s: SweepSettings) -> list[TrainConfig]:
    configs = []
    for lr in s.lrs:
        for injection in s.injections:
            if injection not in INJECTIONS:
                raise ValueError(f"unknown injection {injection!r}; choose from {INJECTIONS}")
            name = run_name(injection, lr)
            configs.append(
                TrainConfig(
                    model=get_config(s.model, injection=injection, **s.model_overrides),
                    data_dir=s.data_dir,
                    out_dir=str(Path(s.out_dir) / name),
                    steps=s.steps,
                    batch_size=s.batch_size,
                    seq_len=s.seq_len,
                    lr=lr,
                    warmup_steps=s.warmup_steps,
                    eval_every=s.eval_every,
                    eval_batches=s.eval_batches,
                    log_every=s.log_every,
                    device=s.device,
                    seed=s.seed,
                    save_checkpoint=False,
                    progress=False,
                    compile=s.compile,
                    run_name=name,
                )
            )
    return configs


def run_sweep(s: SweepSettings, progress: bool = True) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    configs = sweep_configs(s)
    started = time.time()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress
    ) as bar:
        task = bar.add_task("lr sweep", total=len(configs))

        def done(result: dict[str, Any]) -> None:
            bar.update(task, advance=1, description=f"lr sweep: {result.get('run_name')} {result.get('status')}")

        results = run_many(configs, jobs=s.jobs, on_result=done)
    by_name = {r.get("run_name"): r for r in results}
    runs = []
    for cfg in configs:
        r = by_name.get(cfg.run_name, {"status": "missing"})
        injection = cfg.model.injection
        runs.append(
            {"run": cfg.run_name, "injection": injection, "lr": cfg.lr, "out_dir": cfg.out_dir}
            | {
                k: r.get(k)
                for k in (
                    "status",
                    "reason",
                    "steps",
                    "tokens",
                    "train_loss",
                    "val_loss",
                    "max_rho",
                    "max_state_norm",
                    "spikes",
                    "params",
                    "wall_s",
                    "epochs_seen",
                )
            }
        )
    summary = {
        "settings": s.__dict__ | {"injections": list(s.injections), "lrs": list(s.lrs)},
        "wall_s": time.time() - started,
        "runs": runs,
        "converged": {
            inj: [r["lr"] for r in runs if r["injection"] == inj and r["status"] == "completed"] for inj in s.injections
        },
    }
    Path(s.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(s.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    runs = summary["runs"]
    injections = list(dict.fromkeys(r["injection"] for r in runs))
    lrs = sorted({r["lr"] for r in runs})
    table = Table(title=f"LR sweep ({summary['wall_s']:.0f} s): final val loss, or why the run stopped")
    table.add_column("lr")
    for inj in injections:
        table.add_column(inj)
    cell = {(r["injection"], r["lr"]): r for r in runs}
    for lr in lrs:
        row = [f"{lr:g}"]
        for inj in injections:
            r = cell.get((inj, lr), {})
            if r.get("status") == "completed":
                text = f"{r['val_loss']:.3f}" if r.get("val_loss") is not None else "?"
                if r.get("spikes"):
                    text += f" ({r['spikes']} spikes)"
            else:
                text = f"[red]{r.get('status')}: {r.get('reason')} @ {r.get('steps')}[/red]"
            row.append(text)
        table.add_row(*row)
    Console().print(table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="sweep folder (default runs/lr-sweep, or runs/lr-sweep-tiny)")
    p.add_argument("--data", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--tiny", action="store_true", help="toy size, runs on a CPU in about a minute")
    p.add_argument("--injections", default=",".join(INJECTIONS))
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in DEFAULT_LRS))
    p.add_argument("--model", default=None, help="config name (default: sweep, or tiny with --tiny)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once (default 4, 1 with --tiny)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    given = {
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "jobs": args.jobs,
    }
    kw: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    kw |= {
        "out_dir": args.out or ("runs/lr-sweep-tiny" if args.tiny else "runs/lr-sweep"),
        "data_dir": args.data,
        "injections": tuple(x for x in args.injections.split(",") if x),
        "lrs": tuple(float(x) for x in args.lrs.split(",") if x),
        "device": args.device,
        "seed": args.seed,
        "compile": args.compile,
    }
    return SweepSettings.tiny(**kw) if args.tiny else SweepSettings(**kw)


def run_from_args(args: argparse.Namespace) -> int:
    summary = run_sweep(settings_from_args(args), progress=not args.no_progress)
    print_summary(summary)
    print(f"wrote {Path(summary['settings']['out_dir']) / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.train.studies.lr_sweep", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
