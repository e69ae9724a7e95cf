from __future__ import annotations

import json

import pytest

from tokenmill.train.cli import main as train_main
from tokenmill.train.studies.lr_sweep import SweepSettings, run_sweep
from tokenmill.train.studies.plots import plot_quality, plot_sweep
from tokenmill.train.studies.quality import QualitySettings, run_quality


def test_lr_sweep_end_to_end_with_plots(tiny_dataset, tmp_path):
    settings = SweepSettings.tiny(
        out_dir=str(tmp_path / "sweep"),
        data_dir=str(tiny_dataset),
        injections=("parcae", "linear"),
        lrs=(2e-3, 30.0),
        steps=12,
        batch_size=4,
        seq_len=32,
        model_overrides={"d_model": 32, "n_heads": 2},
    )
    summary = run_sweep(settings, progress=False)
    runs = {r["run"]: r for r in summary["runs"]}
    assert set(runs) == {"parcae_lr2e-3", "linear_lr2e-3", "parcae_lr3e+01", "linear_lr3e+01"}
    assert runs["parcae_lr2e-3"]["status"] == "completed" and runs["parcae_lr2e-3"]["max_rho"] < 1
    assert all(r["status"] in ("completed", "diverged") for r in runs.values())
    assert summary["converged"]["parcae"][0] == 2e-3
    assert json.loads((tmp_path / "sweep" / "summary.json").read_text())["runs"] == summary["runs"]
    # a second call reuses finished runs
    again = run_sweep(settings, progress=False)
    assert [r["wall_s"] for r in again["runs"]] == [r["wall_s"] for r in summary["runs"]]
    (tmp_path / "sweep").rename(tmp_path / "fetched")  # plots read the runs from wherever the sweep folder is now
    written = plot_sweep(tmp_path / "fetched", tmp_path / "png")
    assert {p.name for p in written} == {
        "sweep_loss.png",
        "sweep_rho.png",
        "sweep_state_norm.png",
        "sweep_final_loss.png",
    }
    assert all(p.stat().st_size > 5_000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    # the curves come from the relocated logs: hiding one run's log makes the loss plot lose a line
    (tmp_path / "fetched" / "parcae_lr2e-3" / "log.jsonl").rename(tmp_path / "hidden.jsonl")
    without = {p.name: p.stat().st_size for p in plot_sweep(tmp_path / "fetched", tmp_path / "png-without")}
    assert without["sweep_loss.png"] < {p.name: p.stat().st_size for p in written}["sweep_loss.png"]


def test_quality_end_to_end_with_plots(tiny_dataset, tmp_path):
    settings = QualitySettings.tiny(
        out_dir=str(tmp_path / "quality"),
        data_dir=str(tiny_dataset),
        steps=10,
        batch_size=4,
        seq_len=32,
        eval_every=5,
        t_values=(1, 3, 6),
        model_overrides={"d_model": 32, "n_heads": 2, "mean_recurrence": 3},
    )
    summary = run_quality(settings, progress=False)
    runs = summary["runs"]
    assert [runs[n]["status"] for n in ("parcae", "transformer-tokens", "transformer-flops")] == ["completed"] * 3
    assert runs["parcae"]["tokens"] == runs["transformer-tokens"]["tokens"]
    ratio = summary["flops"]["ratio"]
    assert 1.2 < ratio < 3 and runs["transformer-flops"]["steps"] == round(10 * ratio)
    assert abs(runs["transformer-flops"]["flops"] / runs["parcae"]["flops"] - 1) < 0.35  # realised depths vary
    assert [r["T"] for r in summary["loss_vs_T"]] == [1, 3, 6]
    assert set(summary["transformer_val_loss_same_batches"]) == {"transformer-tokens", "transformer-flops"}
    (tmp_path / "quality").rename(tmp_path / "fetched")
    written = plot_quality(tmp_path / "fetched", tmp_path / "png")
    assert {p.name for p in written} == {
        "quality_loss_vs_tokens.png",
        "quality_loss_vs_flops.png",
        "quality_loss_vs_T.png",
    }


def test_cli_run_and_resume(tiny_dataset, tmp_path, capsys):
    args = [
        "train",
        "run",
        "--model",
        "tiny",
        "--data",
        str(tiny_dataset),
        "--out",
        str(tmp_path / "r"),
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--warmup-steps",
        "2",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--no-progress",
        "--injection",
        "additive",
    ]
    assert train_main(args + ["--stop-at-step", "3"]) == 0
    assert train_main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert '"status": "completed"' in out and '"steps": 6' in out
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["model"]["injection"] == "additive" and config["resolved_model"]["vocab_size"] == 320
    with pytest.raises(ValueError, match="--sweep"):
        train_main(["train", "plots"])


def test_cli_parser_lists_the_commands():
    import argparse

    from tokenmill.train.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for command in ("prepare-data", "run", "sweep", "quality", "plots"):
        args = parser.parse_args(["train", command] + (["--out", "x"] if command == "run" else []))
        assert callable(args.func)
