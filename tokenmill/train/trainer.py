"""The training loop for Parcae and fixed-depth transformer models.

AdamW (or Muon for hidden matrices), warmup + cosine/WSD schedule, bf16 autocast on CUDA, gradient clipping,
per-step divergence detection (NaN/inf, loss spikes, runaway loss), JSONL logs, checkpoints that resume into exactly
the run that would have happened without the interruption (model, optimizer, data position, RNG; loop depths and
initial states are drawn from generators seeded by (seed, step)).

Files in `out_dir`: config.json, log.jsonl (one row per logged step/eval/event), checkpoint.pt, summary.json, and the
corpus tokenizer (tokenizer.json, tokenizer_config.json), so the engine serves the folder as it is
(`tokenmill serve OUT_DIR`; `tokenmill train export` writes a standalone model folder).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokenmill.models.parcae import (
    ParcaeConfig,
    ParcaeModel,
    get_config,
    training_flops_per_token,
)
from tokenmill.train.data import DEFAULT_DATA_DIR, TokenData, TokenStream, eval_batches
from tokenmill.train.export import copy_tokenizer

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    model: ParcaeConfig = field(default_factory=lambda: get_config("sweep"))
    data_dir: str = str(DEFAULT_DATA_DIR)
    out_dir: str = "runs/train"
    steps: int = 600
    batch_size: int = 64
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    optimizer: str = "adamw"  # adamw | muon (Muon for block matrices, AdamW for the rest)
    muon_lr: float = 0.02
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    autocast: str = "auto"  # auto: bf16 on CUDA, none on CPU | bf16 | none
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    eval_T: int | None = None  # loops at evaluation (default μ)
    ckpt_every: int = 0  # 0: only at the end
    save_checkpoint: bool = True
    stop_at_step: int | None = None  # stop (and checkpoint) early, e.g. to test resume; schedule still uses `steps`
    spike_delta: float = 1.0  # a step whose loss exceeds the running mean by this many nats is a spike
    diverge_delta: float = 2.5  # the running mean rising this far above its minimum is divergence
    stop_on_divergence: bool = True
    progress: bool = True
    compile: bool = False
    run_name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ParcaeConfig.from_dict(self.model)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0 and min_lr_ratio in [0, 1]")
        if self.autocast not in ("auto", "bf16", "none"):
            raise ValueError("autocast must be auto, bf16 or none")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return cls(**values)


@dataclass
class TrainResult:
    status: str  # completed | diverged | stopped
    reason: str | None
    steps: int
    tokens: int
    flops: float
    train_loss: float | None  # running mean at the end
    val_loss: float | None
    max_rho: float | None
    max_state_norm: float | None
    spikes: int
    params: int
    wall_s: float
    epochs_seen: float
    out_dir: str
    run_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the peak learning rate at `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * (step - decay_start) / max(1, cfg.steps - decay_start)


class DivergenceMonitor:
    """Watches the training loss: NaN/inf loss or gradient -> "nan"; a loss more than `spike_delta` above the running
    mean -> "spike" (recorded, training goes on); the running mean climbing `diverge_delta` above its best ->
    "loss_diverged"."""

    def __init__(self, spike_delta: float, diverge_delta: float, warmup: int = 20, momentum: float = 0.9) -> None:
        self.spike_delta, self.diverge_delta, self.warmup, self.momentum = spike_delta, diverge_delta, warmup, momentum
        self.mean: float | None = None
        self.best: float = math.inf
        self.seen = 0
        self.spikes = 0

    def update(self, loss: float, grad_norm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nan"
        self.seen += 1
        if self.mean is None:
            self.mean = loss
            return None
        warm = self.seen > self.warmup
        spike = warm and loss > self.mean + self.spike_delta
        self.mean = self.momentum * self.mean + (1 - self.momentum) * loss
        if warm:
            self.best = min(self.best, self.mean)
            if self.mean > self.best + self.diverge_delta:
                return "loss_diverged"
        if spike:
            self.spikes += 1
            return "spike"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "best": self.best, "seen": self.seen, "spikes": self.spikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.best, self.seen, self.spikes = state["mean"], state["best"], state["seen"], state["spikes"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but is not available")
    return device


def _autocast(cfg: TrainConfig, device: torch.device):
    use = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def build_optimizer(model: ParcaeModel, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    no_decay = model.no_weight_decay_parameters()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_names: set[str] = set()
    if cfg.optimizer == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise ValueError("this torch has no torch.optim.Muon; use --optimizer adamw")
        block_prefixes = ("prelude.", "core.", "coda.")
        muon_names = {n for n, p in named if p.dim() == 2 and n.startswith(block_prefixes) and "ve_gate" not in n}
    decay = [p for n, p in named if n not in no_decay and n not in muon_names]
    plain = [p for n, p in named if n in no_decay and n not in muon_names]
    fused = device.type == "cuda"
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": plain, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    ]
    if muon_names:
        muon_params = [p for n, p in named if n in muon_names]
        muon = torch.optim.Muon(muon_params, lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
        for group in muon.param_groups:
            group["base_lr"] = cfg.muon_lr
        optimizers.append(muon)
    return optimizers


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for a step's loop depths and initial-state seeds: a function of (seed, step) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


@torch.no_grad()
def evaluate(
    model: ParcaeModel,
    data: TokenData,
    cfg: TrainConfig,
    device: torch.device,
    T: int | None = None,
    num_batches: int | None = None,
) -> float:
    """Mean validation loss at T loops (default μ); the initial state is seeded per sequence, so this is
    deterministic."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(eval_batches(data.val, cfg.batch_size, cfg.seq_len, num_batches or cfg.eval_batches)):
        x, y = x.to(device), y.to(device)
        seeds = torch.arange(i * len(x), (i + 1) * len(x)) + 7919 * (cfg.seed + 1)
        with _autocast(cfg, device):
            logits = model(x, T=T, state_seed=seeds) if model.config.is_looped else model(x)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / count


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class _Log:
    def __init__(self, path: Path, offset: int | None) -> None:
        self.path = path
        if offset is not None and path.exists():
            with open(path, "r+b") as f:
                f.truncate(offset)
        self.file = open(path, "a")  # noqa: SIM115 - open for the whole run, closed by close()

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    @property
    def offset(self) -> int:
        self.file.flush()
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Trains cfg.model on cfg.data_dir; resumes from out_dir/checkpoint.pt when `resume` and it exists."""
    started = time.time()
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    checkpoint = None
    if resume and ckpt_path.exists():
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    elif log_path.exists() and not resume:
        raise FileExistsError(f"{out} already holds a run; pass resume=True (--resume) or choose another out_dir")
    out.mkdir(parents=True, exist_ok=True)

    data = TokenData.open(cfg.data_dir)
    model_cfg = replace(cfg.model, vocab_size=data.vocab_size, max_seq_len=max(cfg.model.max_seq_len, cfg.seq_len))
    torch.manual_seed(cfg.seed)
    model = ParcaeModel(model_cfg).to(device)
    optimizers = build_optimizer(model, cfg, device)
    stream = TokenStream(data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    monitor = DivergenceMonitor(cfg.spike_delta, cfg.diverge_delta)
    step, tokens, flops = 0, 0, 0.0
    max_rho, max_state = -math.inf, -math.inf
    log_offset = None
    if checkpoint is not None:
        _check_resumable(checkpoint["config"], json.loads(json.dumps(cfg.to_dict())))
        model.load_state_dict(checkpoint["model"])
        for opt, state in zip(optimizers, checkpoint["optimizers"], strict=True):
            opt.load_state_dict(state)
        stream.load_state_dict(checkpoint["data"])
        monitor.load_state_dict(checkpoint["monitor"])
        step, tokens, flops = checkpoint["step"], checkpoint["tokens"], checkpoint["flops"]
        max_rho, max_state = checkpoint["max_rho"], checkpoint["max_state_norm"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        log_offset = checkpoint["log_offset"]
    if cfg.compile:
        for blocks in model._stages().values():
            for block in blocks:
                block.compile()
    (out / "config.json").write_text(
        json.dumps(cfg.to_dict() | {"resolved_model": model_cfg.to_dict(), "params": model.num_parameters()}, indent=2)
    )
    if (Path(cfg.data_dir) / "tokenizer.json").is_file():
        copy_tokenizer(cfg.data_dir, out)
    log = _Log(log_path, log_offset)
    if checkpoint is None:
        log.write(
            {
                "kind": "start",
                "params": model.num_parameters(),
                "tokens_per_epoch": stream.tokens_per_epoch,
                "model": model_cfg.to_dict(),
                "device": str(device),
            }
        )

    def save(status: str) -> None:
        if not cfg.save_checkpoint:
            return
        _save_checkpoint(
            ckpt_path,
            {
                "config": json.loads(json.dumps(cfg.to_dict())),
                "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in optimizers],
                "data": stream.state_dict(),
                "monitor": monitor.state_dict(),
                "step": step,
                "tokens": tokens,
                "flops": flops,
                "max_rho": max_rho,
                "max_state_norm": max_state,
                "status": status,
                "log_offset": log.offset,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                },
            },
        )

    status, reason, val_loss = "completed", None, None
    stop_at = min(cfg.steps, cfg.stop_at_step) if cfg.stop_at_step is not None else cfg.steps
    model.train()
    looped = model_cfg.is_looped
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not cfg.progress) as bar:
        task = bar.add_task(cfg.run_name or out.name, total=cfg.steps, completed=step, info="")
        while step < stop_at:
            factor = lr_factor(cfg, step)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * factor
            x, y = stream.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            gen = step_generator(cfg.seed, step)
            with _autocast(cfg, device):
                if looped:
                    depths = model.sample_depths(cfg.batch_size, gen)
                    seeds = torch.randint(0, 2**62, (cfg.batch_size,), generator=gen)
                    logits = model(x, depths=depths, state_seed=seeds)
                else:
                    logits = model(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            loss_value = float(loss.detach())
            event = monitor.update(loss_value, grad_norm)
            if event != "nan":
                for opt in optimizers:
                    opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            tokens += cfg.tokens_per_step
            if looped:
                no_grad = float(depths.no_grad.float().mean())
                with_grad = float(depths.with_grad.float().mean())
                flops += cfg.tokens_per_step * training_flops_per_token(model_cfg, cfg.seq_len, no_grad, with_grad)
            else:
                flops += cfg.tokens_per_step * training_flops_per_token(model_cfg, cfg.seq_len, 0, 0)
            last = step == stop_at
            if step % cfg.log_every == 0 or event in ("nan", "loss_diverged") or last:
                row: dict[str, Any] = {
                    "kind": "train",
                    "step": step,
                    "tokens": tokens,
                    "flops": flops,
                    "loss": loss_value,
                    "loss_mean": monitor.mean,
                    "grad_norm": grad_norm,
                    "lr": cfg.lr * factor,
                    "elapsed_s": time.time() - started,
                    "epochs": stream.epochs_seen,
                }
                if looped:
                    rho = model.spectral_radius()
                    norms = model.last_stats.state_norms if model.last_stats is not None else torch.zeros(0)
                    state_norm = float(norms[-1]) if len(norms) else float("nan")
                    row.update(
                        rho=rho,
                        state_norm=state_norm,
                        state_norm_max=float(norms.max()) if len(norms) else None,
                        depth_mean=no_grad + with_grad,
                        depth_grad_mean=with_grad,
                    )
                    if math.isfinite(rho):
                        max_rho = max(max_rho, rho)
                    if math.isfinite(state_norm):
                        max_state = max(max_state, float(norms.max()))
                log.write(row)
                bar.update(task, info=f"loss {monitor.mean or loss_value:.3f} lr {cfg.lr * factor:.1e}")
            bar.update(task, completed=step)
            if event is not None:
                log.write({"kind": "event", "event": event, "step": step, "loss": loss_value, "grad_norm": grad_norm})
            if event in ("nan", "loss_diverged") and cfg.stop_on_divergence:
                status, reason = "diverged", event
                break
            if cfg.eval_every and step % cfg.eval_every == 0 and not last:
                val = evaluate(model, data, cfg, device, cfg.eval_T)
                log.write(
                    {
                        "kind": "eval",
                        "step": step,
                        "tokens": tokens,
                        "flops": flops,
                        "val_loss": val,
                        "T": (cfg.eval_T or model_cfg.mean_recurrence) if looped else None,
                    }
                )
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and not last:
                save("running")
    if status == "completed" and step < cfg.steps:
        status, reason = "stopped", f"stop_at_step={cfg.stop_at_step}"
    if status == "completed" or (status == "diverged" and reason != "nan"):
        val_loss = evaluate(model, data, cfg, device, cfg.eval_T)
        if not math.isfinite(val_loss):
            status, reason = "diverged", reason or "nan"
        log.write(
            {
                "kind": "eval",
                "step": step,
                "tokens": tokens,
                "flops": flops,
                "val_loss": val_loss,
                "T": (cfg.eval_T or model_cfg.mean_recurrence) if looped else None,
                "final": True,
            }
        )
    save(status)
    result = TrainResult(
        status=status,
        reason=reason,
        steps=step,
        tokens=tokens,
        flops=flops,
        train_loss=_finite_or_none(monitor.mean),
        val_loss=_finite_or_none(val_loss),
        max_rho=_finite_or_none(max_rho if looped else None),
        max_state_norm=_finite_or_none(max_state if looped else None),
        spikes=monitor.spikes,
        params=model.num_parameters(),
        wall_s=time.time() - started,
        epochs_seen=stream.epochs_seen,
        out_dir=str(out),
        run_name=cfg.run_name,
    )
    log.write({"kind": "end"} | result.to_dict())
    log.close()
    (out / "summary.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


_RESUME_FREE = {"stop_at_step", "progress", "ckpt_every", "eval_every", "log_every", "device", "compile", "out_dir"}


def _check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    changed = sorted(k for k in saved if k not in _RESUME_FREE and saved[k] != current.get(k))
    if changed:
        raise ValueError(f"cannot resume: the run's settings changed ({', '.join(changed)})")


def load_trained_model(out_dir: str | Path, device: str = "cpu") -> ParcaeModel:
    """The model of a finished (or checkpointed) run."""
    out = Path(out_dir)
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    config = json.loads((out / "config.json").read_text())["resolved_model"]
    model = ParcaeModel(ParcaeConfig.from_dict(config))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()
