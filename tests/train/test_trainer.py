from __future__ import annotations

import json
import math

import pytest
import torch

from tokenmill.models.parcae import get_config
from tokenmill.train.trainer import (
    DivergenceMonitor,
    TrainConfig,
    load_trained_model,
    lr_factor,
    train,
)


def tiny_cfg(data_dir, out_dir, **kw) -> TrainConfig:
    base = {
        "model": get_config("tiny", d_model=32, n_heads=2, mean_recurrence=3, backprop_depth=2),
        "data_dir": str(data_dir),
        "out_dir": str(out_dir),
        "steps": 40,
        "batch_size": 8,
        "seq_len": 32,
        "lr": 3e-3,
        "warmup_steps": 4,
        "log_every": 1,
        "eval_every": 20,
        "eval_batches": 2,
        "progress": False,
        "seed": 1,
    }
    return TrainConfig(**(base | kw))


def rows(out_dir, kind):
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize("arch", ["parcae", "transformer"])
def test_tiny_training_run_lowers_the_loss(tiny_dataset, tmp_path, arch):
    cfg = tiny_cfg(tiny_dataset, tmp_path / arch)
    if arch == "transformer":
        cfg.model = cfg.model.fixed_depth_baseline()
    result = train(cfg)
    assert result.status == "completed" and result.steps == 40 and result.tokens == 40 * 8 * 32
    train_rows = rows(tmp_path / arch, "train")
    first = sum(r["loss"] for r in train_rows[:5]) / 5
    last = sum(r["loss"] for r in train_rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    evals = rows(tmp_path / arch, "eval")
    assert evals[-1]["final"] and evals[-1]["val_loss"] < math.log(320)
    assert result.val_loss == pytest.approx(evals[-1]["val_loss"])
    if arch == "parcae":
        assert all(0 < r["rho"] < 1 and r["state_norm"] > 0 and r["depth_mean"] >= 1 for r in train_rows)
        assert result.max_rho < 1 and result.flops > 0
    else:
        assert "rho" not in train_rows[0]
    summary = json.loads((tmp_path / arch / "summary.json").read_text())
    assert summary["status"] == "completed"
    model = load_trained_model(tmp_path / arch)
    assert model.config.is_looped == (arch == "parcae")


def test_resume_gives_the_identical_continuation(tiny_dataset, tmp_path):
    straight = train(tiny_cfg(tiny_dataset, tmp_path / "straight", steps=12, eval_every=5))
    first_leg = train(tiny_cfg(tiny_dataset, tmp_path / "resumed", steps=12, eval_every=5, stop_at_step=7))
    assert first_leg.status == "stopped" and first_leg.steps == 7
    resumed = train(tiny_cfg(tiny_dataset, tmp_path / "resumed", steps=12, eval_every=5), resume=True)
    assert resumed.status == "completed" and resumed.steps == 12
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]
    assert strip(rows(tmp_path / "straight", "train")) == strip(rows(tmp_path / "resumed", "train"))
    assert [r["step"] for r in rows(tmp_path / "resumed", "eval")] == [5, 10, 12]
    assert resumed.val_loss == straight.val_loss
    with pytest.raises(ValueError, match="lr"):
        train(tiny_cfg(tiny_dataset, tmp_path / "resumed", steps=12, lr=1e-2), resume=True)
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_cfg(tiny_dataset, tmp_path / "straight", steps=12))


def test_divergent_run_is_detected_and_stopped(tiny_dataset, tmp_path):
    cfg = tiny_cfg(
        tiny_dataset,
        tmp_path / "boom",
        steps=40,
        lr=50.0,
        warmup_steps=1,
        grad_clip=1e9,
        model=get_config("tiny", d_model=32, n_heads=2, injection="linear", mean_recurrence=3),
    )
    result = train(cfg)
    assert result.status == "diverged" and result.reason in ("nan", "loss_diverged")
    assert result.steps < 40
    events = rows(tmp_path / "boom", "event")
    assert events and events[-1]["event"] == result.reason


def test_divergence_monitor():
    m = DivergenceMonitor(spike_delta=1.0, diverge_delta=2.0, warmup=3, momentum=0.5)
    assert [m.update(x, 1.0) for x in (5.0, 4.0, 3.5, 3.0, 2.9)] == [None] * 5
    assert m.update(6.0, 1.0) == "spike" and m.spikes == 1
    assert m.update(float("nan"), 1.0) == "nan"
    assert m.update(3.0, float("inf")) == "nan"
    events = [m.update(9.0, 1.0) for _ in range(5)]
    assert events[-1] == "loss_diverged"


def test_lr_schedules():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(cfg, 0) == pytest.approx(0.1) and lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 10) == pytest.approx(1.0) and lr_factor(cfg, 99) == pytest.approx(0.1, abs=1e-3)
    wsd = TrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(wsd, 79) == 1.0 and lr_factor(wsd, 90) == pytest.approx(0.5) and lr_factor(wsd, 100) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_muon_optimizer_trains(tiny_dataset, tmp_path):
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon is not in this torch")
    result = train(tiny_cfg(tiny_dataset, tmp_path / "muon", steps=10, optimizer="muon", eval_every=0))
    assert result.status == "completed" and result.val_loss < math.log(320)
