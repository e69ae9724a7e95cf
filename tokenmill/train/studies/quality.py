"""Quality per parameter: Parcae vs the fixed-depth transformer built from the same blocks, and loss vs test-time T.

Three runs on the same data order:
    parcae             the looped model (μ, k as configured), S steps
    transformer-tokens the transformer with the same parameters (up to Parcae's injection and readout), same S steps
                       = same tokens
    transformer-flops  the same transformer trained for S × (Parcae's training FLOPs per token / the transformer's)
                       steps, i.e. the same training FLOPs spent on more data
Then Parcae's validation loss at T = 1, 2, 4, ... loops (trained at μ), against the transformers' losses.
Writes OUT/quality.json; `tokenmill train plots --quality OUT` draws it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tokenmill.models.parcae import expected_training_flops_per_token, get_config, training_flops_per_token
from tokenmill.train.data import DEFAULT_DATA_DIR, TokenData
from tokenmill.train.studies import run_many
from tokenmill.train.trainer import TrainConfig, evaluate, load_trained_model, resolve_device

DEFAULT_T_VALUES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass
class QualitySettings:
    out_dir: str = "runs/quality"
    data_dir: str = str(DEFAULT_DATA_DIR)
    model: str = "sweep"
    steps: int = 600
    batch_size: int = 64
    seq_len: int = 256
    lr: float = 1e-3
    transformer_lr: float | None = None  # default: the same as Parcae's
    warmup_steps: int = 60
    eval_every: int = 100
    eval_batches: int = 8
    loss_vs_t_batches: int = 16
    t_values: tuple[int, ...] = DEFAULT_T_VALUES
    jobs: int = 3
    device: str = "auto"
    seed: int = 0
    compile: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def tiny(cls, **kw: Any) -> QualitySettings:
        base = {
            "model": "tiny",
            "steps": 60,
            "batch_size": 8,
            "seq_len": 64,
            "lr": 2e-3,
            "warmup_steps": 5,
            "eval_every": 20,
            "eval_batches": 2,
            "loss_vs_t_batches": 2,
            "t_values": (1, 2, 4, 8),
            "jobs": 1,
        }
        return cls(**(base | kw))


def quality_configs(s: QualitySettings) -> tuple[list[TrainConfig], dict[str, float]]:
    data = TokenData.open(s.data_dir)
    parcae = get_config(s.model, injection="parcae", **s.model_overrides)
    parcae = replace(parcae, vocab_size=data.vocab_size, max_seq_len=max(parcae.max_seq_len, s.seq_len))
    transformer = parcae.fixed_depth_baseline()
    parcae_fpt = expected_training_flops_per_token(parcae, s.seq_len)
    transformer_fpt = training_flops_per_token(transformer, s.seq_len, 0, 0)
    ratio = parcae_fpt / transformer_fpt
    common = {
        "data_dir": s.data_dir,
        "batch_size": s.batch_size,
        "seq_len": s.seq_len,
        "warmup_steps": s.warmup_steps,
        "eval_every": s.eval_every,
        "eval_batches": s.eval_batches,
        "device": s.device,
        "seed": s.seed,
        "progress": False,
        "compile": s.compile,
        "log_every": 10,
    }
    t_lr = s.transformer_lr or s.lr
    out = Path(s.out_dir)
    configs = [
        TrainConfig(model=parcae, out_dir=str(out / "parcae"), steps=s.steps, lr=s.lr, run_name="parcae", **common),
        TrainConfig(
            model=transformer,
            out_dir=str(out / "transformer-tokens"),
            steps=s.steps,
            lr=t_lr,
            run_name="transformer-tokens",
            **common,
        ),
        TrainConfig(
            model=transformer,
            out_dir=str(out / "transformer-flops"),
            steps=round(s.steps * ratio),
            lr=t_lr,
            run_name="transformer-flops",
            **common,
        ),
    ]
    flops = {"parcae_flops_per_token": parcae_fpt, "transformer_flops_per_token": transformer_fpt, "ratio": ratio}
    return configs, flops


def run_quality(s: QualitySettings, progress: bool = True) -> dict[str, Any]:
    started = time.time()
    configs, flops = quality_configs(s)
    results = run_many(configs, jobs=s.jobs)
    by_name = {r.get("run_name"): r for r in results}
    data = TokenData.open(s.data_dir)
    device = resolve_device(s.device)
    loss_vs_t: list[dict[str, Any]] = []
    parcae_result = by_name.get("parcae", {})
    if parcae_result.get("status") == "completed":
        model = load_trained_model(configs[0].out_dir, device=str(device))
        eval_cfg = replace(configs[0], eval_batches=s.loss_vs_t_batches)
        for T in s.t_values:
            loss_vs_t.append({"T": T, "val_loss": evaluate(model, data, eval_cfg, device, T=T)})
    transformer_eval = {}
    for name in ("transformer-tokens", "transformer-flops"):
        cfg = next(c for c in configs if c.run_name == name)
        if by_name.get(name, {}).get("status") == "completed":
            model = load_trained_model(cfg.out_dir, device=str(device))
            eval_cfg = replace(cfg, eval_batches=s.loss_vs_t_batches)
            transformer_eval[name] = evaluate(model, data, eval_cfg, device)
    summary = {
        "settings": s.__dict__ | {"t_values": list(s.t_values)},
        "flops": flops,
        "runs": {
            c.run_name: by_name.get(c.run_name, {"status": "missing"})
            | {"steps_planned": c.steps, "tokens_planned": c.steps * c.tokens_per_step}
            for c in configs
        },
        "mean_recurrence": configs[0].model.mean_recurrence,
        "loss_vs_T": loss_vs_t,
        "transformer_val_loss_same_batches": transformer_eval,
        "train_tokens_available": len(data.train),
        "wall_s": time.time() - started,
    }
    Path(s.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(s.out_dir) / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Quality ({summary['wall_s']:.0f} s; Parcae/transformer FLOPs per token {summary['flops']['ratio']:.2f})"
    )
    for col in ("run", "status", "params", "tokens", "train FLOPs", "val loss", "epochs"):
        table.add_column(col)
    for name, r in summary["runs"].items():
        table.add_row(
            name,
            str(r.get("status")),
            f"{r.get('params') or 0:,}",
            f"{r.get('tokens') or 0:,}",
            f"{r.get('flops') or 0:.2e}",
            f"{r['val_loss']:.4f}" if r.get("val_loss") else "-",
            f"{r.get('epochs_seen') or 0:.2f}",
        )
    Console().print(table)
    if summary["loss_vs_T"]:
        t = Table(title="Parcae validation loss vs test-time loops T")
        t.add_column("T")
        t.add_column("val loss")
        for row in summary["loss_vs_T"]:
            t.add_row(str(row["T"]), f"{row['val_loss']:.4f}")
        Console().print(t)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="study folder (default runs/quality, or runs/quality-tiny)")
    p.add_argument("--data", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--tiny", action="store_true", help="toy size, runs on a CPU")
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=None, help="Parcae's steps (the transformers' follow)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--transformer-lr", type=float, default=None)
    p.add_argument("--t-values", default=None, help="comma-separated loop counts for loss vs T")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def settings_from_args(args: argparse.Namespace) -> QualitySettings:
    given = {
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "transformer_lr": args.transformer_lr,
        "jobs": args.jobs,
    }
    kw: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if args.t_values:
        kw["t_values"] = tuple(int(x) for x in args.t_values.split(",") if x)
    kw |= {
        "out_dir": args.out or ("runs/quality-tiny" if args.tiny else "runs/quality"),
        "data_dir": args.data,
        "device": args.device,
        "seed": args.seed,
        "compile": args.compile,
    }
    return QualitySettings.tiny(**kw) if args.tiny else QualitySettings(**kw)


def run_from_args(args: argparse.Namespace) -> int:
    summary = run_quality(settings_from_args(args), progress=not args.no_progress)
    print_summary(summary)
    print(f"wrote {Path(summary['settings']['out_dir']) / 'quality.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.train.studies.quality", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
