"""`tokenmill bench megakernel-ab`: megakernel settings against each other on one GPU, rounds interleaved.

The model is Llama-3.2-1B's shape with random bf16 weights (as in `bench decode`). A setting is a label and a few
TOKENMILL_MEGAKERNEL_* environment variables (tuning knobs, read when a decoder is built;
TOKENMILL_MEGAKERNEL_NVCC_FLAGS, preprocessor defines read when its kernel is compiled); every setting starts from
the defaults, whatever TOKENMILL_MEGAKERNEL_* variables the calling shell has. Each round rebuilds the
decoder for every setting in turn and times every cell (CUDA-graph replays, median of trials), so the drift of a
noisy machine spreads over all settings alike. Prints each cell's median per setting and its ratio to the first
setting, and writes every round's times as JSON.

A setting may name a source tree (LABEL@TREE: a directory holding another version of the `tokenmill` package, e.g.
a `git archive` of a branch). Then every setting runs in worker processes of its own tree (this package's where it
names none), one per setting and round, the rounds still interleaved: that compares code no knob switches. (A
tree's own megakernel-ab runs its worker: any tree from the commit that added trees on.)

    tokenmill bench megakernel-ab --cells 1x1024,16x1024 --setting base \\
        --setting no-pause:TOKENMILL_MEGAKERNEL_PAUSE_RELEASE=0 --out ab.json
    tokenmill bench megakernel-ab --cells 1x1024 --setting main@snap/main --setting branch@snap/branch
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

KNOB_PREFIX = "TOKENMILL_MEGAKERNEL_"
SHORT_CONTEXT = 256  # = bench.decode.SHORT_CONTEXT (not imported: that module pulls in torch)


@dataclass(frozen=True)
class Setting:
    label: str
    env: dict[str, str] = field(default_factory=dict)
    tree: str | None = None  # another source tree to run this setting from (None: the running package)

    def spec(self) -> str:
        """The setting as --setting takes it, without its tree (what a worker in that tree is given)."""
        return self.label + (":" + ",".join(f"{k}={v}" for k, v in self.env.items()) if self.env else "")


def parse_setting(text: str) -> Setting:
    """LABEL[@TREE] or LABEL[@TREE]:NAME=VALUE[,NAME=VALUE...], every NAME a TOKENMILL_MEGAKERNEL_ variable and
    TREE a directory that holds a `tokenmill` package."""
    head, _, assignments = text.partition(":")
    label, at, tree = (part.strip() for part in head.partition("@"))
    if not label:
        raise ValueError(f"setting {text!r}: empty label (LABEL[@TREE][:NAME=VALUE,...])")
    if at and not (tree and (Path(tree) / "tokenmill" / "__init__.py").is_file()):
        raise ValueError(f"setting {text!r}: {tree!r} is not a source tree with a tokenmill package")
    env: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in assignments.split(","))):
        name, eq, value = part.partition("=")
        if not eq or not name.startswith(KNOB_PREFIX):
            raise ValueError(f"setting {text!r}: {part!r} is not {KNOB_PREFIX}NAME=VALUE")
        env[name] = value
    return Setting(label, env, tree if at else None)


def parse_settings(texts: list[str]) -> list[Setting]:
    settings = [parse_setting(t) for t in texts]
    labels = [s.label for s in settings]
    if len(settings) < 2:
        raise ValueError("give at least two --setting (the first is the reference)")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate setting labels in {labels}")
    return settings


def parse_cells(text: str) -> list[tuple[int, int]]:
    """BATCHxCONTEXT[,BATCHxCONTEXT...]"""
    cells = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        batch, x, context = part.partition("x")
        if not x or not batch.isdigit() or not context.isdigit() or int(batch) < 1 or int(context) < 1:
            raise ValueError(f"cell {part!r} is not BATCHxCONTEXT")
        cells.append((int(batch), int(context)))
    if not cells:
        raise ValueError("no cells")
    return cells


@contextlib.contextmanager
def knob_environment(env: dict[str, str]) -> Iterator[None]:
    """Sets `env` and unsets every other TOKENMILL_MEGAKERNEL_ variable for the block; restores all after."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(KNOB_PREFIX)}
    for name in saved:
        del os.environ[name]
    os.environ.update(env)
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.startswith(KNOB_PREFIX)]:
            del os.environ[name]
        os.environ.update(saved)


def summarise(times: dict[str, dict[str, list[float]]], labels: list[str]) -> list[dict]:
    """One row per (cell, setting): median and min ms over the rounds, their spread ((max - min) / median: what
    the machine's drift alone moves), and the median relative to the first setting's."""
    rows = []
    for cell, by_label in times.items():
        reference = statistics.median(by_label[labels[0]])
        for label in labels:
            median = statistics.median(by_label[label])
            values = by_label[label]
            rows.append(dict(cell=cell, setting=label, median_ms=median, min_ms=min(values),
                             spread=(max(values) - min(values)) / median, ratio=median / reference))
    return rows


def print_summary(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in ("cell", "setting", "median ms", "min ms", "spread", "vs first"):
        table.add_column(name, justify="left" if name in ("cell", "setting") else "right")
    for row in rows:
        table.add_row(row["cell"], row["setting"], f"{row['median_ms']:.4f}", f"{row['min_ms']:.4f}",
                      f"{100 * row['spread']:.1f}%", f"{row['ratio']:.3f}")
    Console(width=120).print(table)


def worker_command(args: argparse.Namespace, setting: Setting, out_path: str) -> list[str]:
    """One round of one setting in a process of its own tree, its times written to out_path."""
    return [sys.executable, "-m", "tokenmill", "bench", "megakernel-ab", "--cells", args.cells,
            "--setting", setting.spec(), "--trials", str(args.trials), "--replays", str(args.replays),
            "--seed", str(args.seed), "--worker-out", out_path,
            # (only where asked: trees from before mixed lengths do not take the flags)
            *(["--long-seqs", str(args.long_seqs), "--short-context", str(args.short_context)] if args.long_seqs
              else [])]


def worker_environment(tree: Path) -> dict[str, str]:
    """The environment of a worker: its tree first on PYTHONPATH, so `python -m tokenmill` imports that version."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree.resolve()), env.get("PYTHONPATH", "")]))
    return env


def time_in_workers(args: argparse.Namespace, settings: list[Setting],
                    run_process: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                    ) -> dict[str, dict[str, list[float]]]:
    """Every setting's rounds in worker processes (one per setting and round, in its tree; this package's tree
    where a setting names none), rounds interleaved. Returns cell -> label -> ms per round."""
    here = Path(__file__).resolve().parents[2]
    times: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for setting in settings:
                tree = Path(setting.tree) if setting.tree else here
                out_path = Path(tmp) / "times.json"
                proc = run_process(worker_command(args, setting, str(out_path)), cwd=tree,
                                   env=worker_environment(tree), capture_output=True, text=True, check=False)
                if proc.returncode != 0 or not out_path.is_file():
                    tail = ((proc.stdout or "") + (proc.stderr or ""))[-2000:]
                    raise ValueError(f"setting {setting.label}: its worker in {tree} failed:\n{tail}")
                for cell, ms in json.loads(out_path.read_text()).items():
                    times.setdefault(cell, {}).setdefault(setting.label, []).append(ms)
                out_path.unlink()
            print(f"round {round_index + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return times


def time_here(args: argparse.Namespace, settings: list[Setting], cells: list[tuple[int, int]], device,
              rounds: int) -> dict[str, dict[str, list[float]]]:
    """Every setting's rounds in this process (the decoder rebuilt per setting), rounds interleaved."""
    import torch

    from tokenmill.bench.decode import (
        build_model, capture_graph, cell_lengths, fused_step, make_kv_cache, step_inputs, time_graph,
    )
    from tokenmill.kernels.megakernel.build import MegakernelUnavailable
    from tokenmill.kernels.megakernel.decoder import MegakernelLlamaDecoder

    model, config, _ = build_model("llama-3.2-1b", torch.bfloat16, device, seed=args.seed)
    kv_cache = make_kv_cache(config, max(b for b, _ in cells), max(c for _, c in cells), torch.bfloat16, device, 1)
    inputs = {cell: step_inputs(*cell, kv_cache.shape[2], config.vocab_size, device, seed=cell[0],
                                lengths=cell_lengths(*cell, args.long_seqs, args.short_context)) for cell in cells}
    times: dict[str, dict[str, list[float]]] = {f"{b}x{c}": {} for b, c in cells}
    t0 = time.perf_counter()
    for round_index in range(rounds):
        for setting in settings:
            try:
                with knob_environment(setting.env):
                    decoder = MegakernelLlamaDecoder(model)
            except MegakernelUnavailable as exc:  # (MegakernelUnsupported is a ValueError already)
                raise ValueError(f"setting {setting.label}: {exc}") from None
            for cell in cells:
                graph, _ = capture_graph(fused_step(decoder, kv_cache, inputs[cell]), device)
                ms = time_graph(graph, args.trials, args.replays, device)
                times[f"{cell[0]}x{cell[1]}"].setdefault(setting.label, []).append(ms)
                del graph
            del decoder
        if not args.worker_out:
            print(f"round {round_index + 1}/{rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return times


def run(args: argparse.Namespace) -> int:
    import torch

    cells = parse_cells(args.cells)
    if args.worker_out:  # one round of one setting, for time_in_workers
        settings = [parse_setting(t) for t in args.setting]
        if len(settings) != 1:
            raise ValueError("a worker runs exactly one setting")
    else:
        settings = parse_settings(args.setting)
    if args.rounds < 1:
        raise ValueError("--rounds must be >= 1")
    if args.long_seqs < 0 or args.short_context < 1:
        raise ValueError(f"--long-seqs must be >= 0 and --short-context >= 1, got {args.long_seqs} and "
                         f"{args.short_context}")
    if not torch.cuda.is_available():
        raise ValueError("bench megakernel-ab needs a CUDA GPU (sm_90), and torch sees none")
    device = torch.device("cuda", torch.cuda.current_device())
    if any(s.tree for s in settings) and not args.worker_out:
        times = time_in_workers(args, settings)
    else:
        times = time_here(args, settings, cells, device, 1 if args.worker_out else args.rounds)
    if args.worker_out:
        Path(args.worker_out).write_text(json.dumps({cell: by[settings[0].label][0] for cell, by in times.items()}))
        return 0
    labels = [s.label for s in settings]
    rows = summarise(times, labels)
    device_name = torch.cuda.get_device_name(device)
    mixed = (f" · mixed lengths: {args.long_seqs} sequence(s) at the cell's context, the others at "
             f"{args.short_context}" if args.long_seqs else "")
    print_summary(rows, f"megakernel A/B · {device_name} · {args.rounds} rounds · ms per decode step{mixed}")
    if args.out:
        report = dict(date=time.strftime("%Y-%m-%d %H:%M"), device=device_name, shape="llama-3.2-1b",
                      settings={s.label: s.env for s in settings}, trees={s.label: s.tree for s in settings if s.tree},
                      rounds=args.rounds, long_seqs=args.long_seqs, short_context=args.short_context, times=times,
                      summary=rows)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("megakernel-ab", help="megakernel settings against each other on one GPU (CUDA)")
    p.add_argument("--cells", default="1x1024,8x1024,16x1024", help="comma-separated BATCHxCONTEXT")
    p.add_argument("--setting", action="append", default=[], metavar="LABEL[@TREE][:NAME=VALUE,...]",
                   help="a label, optionally a source tree to run it from, and TOKENMILL_MEGAKERNEL_* variables; "
                        "repeat, the first is the reference")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trials", type=int, default=15, help="timed groups of replays per cell and round")
    p.add_argument("--replays", type=int, default=50, help="graph replays per timed group")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-seqs", type=int, default=0, metavar="N",
                   help="mixed lengths: only the first N sequences of a cell hold its context, the others "
                        "--short-context tokens (as bench decode)")
    p.add_argument("--short-context", type=int, default=SHORT_CONTEXT, metavar="T")
    p.add_argument("--out", default=None, help="write the times and the summary here (JSON)")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)  # a worker's one round (time_in_workers)
    p.set_defaults(func=run)
