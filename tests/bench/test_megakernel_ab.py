"""`tokenmill bench megakernel-ab` off the GPU: settings, cells, the knob environment, the summary, CLI errors."""

from __future__ import annotations

import os

import pytest
import torch

from tokenmill.bench.megakernel_ab import (
    Setting, knob_environment, parse_cells, parse_setting, parse_settings, summarise, time_in_workers,
    worker_command, worker_environment,
)
from tokenmill.cli import main


def test_settings_parse_labels_and_knobs():
    assert parse_setting("base") == Setting("base", {})
    assert parse_setting(" pause0 : TOKENMILL_MEGAKERNEL_PAUSE_RELEASE=0 ") == Setting(
        "pause0", {"TOKENMILL_MEGAKERNEL_PAUSE_RELEASE": "0"})
    assert parse_setting("x:TOKENMILL_MEGAKERNEL_INFLIGHT=3,TOKENMILL_MEGAKERNEL_NVCC_FLAGS=-DA -DB=2").env == {
        "TOKENMILL_MEGAKERNEL_INFLIGHT": "3", "TOKENMILL_MEGAKERNEL_NVCC_FLAGS": "-DA -DB=2"}
    for bad in (":TOKENMILL_MEGAKERNEL_INFLIGHT=1", "x:INFLIGHT=1", "x:TOKENMILL_MEGAKERNEL_INFLIGHT"):
        with pytest.raises(ValueError):
            parse_setting(bad)
    with pytest.raises(ValueError, match="at least two"):
        parse_settings(["base"])
    with pytest.raises(ValueError, match="duplicate"):
        parse_settings(["a", "a:TOKENMILL_MEGAKERNEL_INFLIGHT=1"])


def test_cells_parse():
    assert parse_cells("1x1024, 16x4096") == [(1, 1024), (16, 4096)]
    for bad in ("", "1024", "0x16", "1x", "ax2"):
        with pytest.raises(ValueError):
            parse_cells(bad)


def test_knob_environment_sets_only_the_settings_knobs_and_restores(monkeypatch):
    monkeypatch.setenv("TOKENMILL_MEGAKERNEL_INFLIGHT", "4")
    monkeypatch.setenv("TOKENMILL_OTHER", "kept")
    with knob_environment({"TOKENMILL_MEGAKERNEL_PAUSE_RELEASE": "0"}):
        assert os.environ["TOKENMILL_MEGAKERNEL_PAUSE_RELEASE"] == "0"
        assert "TOKENMILL_MEGAKERNEL_INFLIGHT" not in os.environ  # every setting starts from the defaults
        assert os.environ["TOKENMILL_OTHER"] == "kept"
    assert os.environ["TOKENMILL_MEGAKERNEL_INFLIGHT"] == "4"
    assert "TOKENMILL_MEGAKERNEL_PAUSE_RELEASE" not in os.environ


def test_summary_medians_and_ratios_to_the_first_setting():
    times = {"1x1024": {"base": [1.0, 1.2, 1.1], "new": [0.9, 0.99, 1.2]}}
    rows = summarise(times, ["base", "new"])
    assert [(r["setting"], r["median_ms"], r["min_ms"]) for r in rows] == [("base", 1.1, 1.0), ("new", 0.99, 0.9)]
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] == pytest.approx(0.9)
    assert rows[0]["spread"] == pytest.approx(0.2 / 1.1) and rows[1]["spread"] == pytest.approx(0.3 / 0.99)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_cli_says_what_is_wrong(capsys):
    assert main(["bench", "megakernel-ab", "--setting", "a", "--setting", "b:TOKENMILL_MEGAKERNEL_INFLIGHT=1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "megakernel-ab", "--setting", "a", "--setting", "b:INFLIGHT=1"]) == 2
    assert "is not TOKENMILL_MEGAKERNEL_NAME=VALUE" in capsys.readouterr().err
    assert main(["bench", "megakernel-ab", "--cells", "16", "--setting", "a", "--setting", "b"]) == 2
    assert "BATCHxCONTEXT" in capsys.readouterr().err
    assert main(["bench", "megakernel-ab", "--worker-out", "t.json", "--setting", "a", "--setting", "b"]) == 2
    assert "a worker runs exactly one setting" in capsys.readouterr().err
    assert main(["bench", "megakernel-ab", "--long-seqs", "-1", "--setting", "a", "--setting", "b"]) == 2
    assert "--long-seqs must be >= 0" in capsys.readouterr().err


def test_mixed_lengths_default_as_bench_decode():
    from tokenmill.bench import decode, megakernel_ab

    assert megakernel_ab.SHORT_CONTEXT == decode.SHORT_CONTEXT


def source_tree(path):
    (path / "tokenmill").mkdir(parents=True)
    (path / "tokenmill" / "__init__.py").write_text("")
    return path


def test_a_setting_may_name_a_source_tree(tmp_path):
    tree = source_tree(tmp_path / "branch")
    assert parse_setting(f"new@{tree}") == Setting("new", {}, str(tree))
    setting = parse_setting(f"new @ {tree} : TOKENMILL_MEGAKERNEL_INFLIGHT=1")
    assert setting == Setting("new", {"TOKENMILL_MEGAKERNEL_INFLIGHT": "1"}, str(tree))
    assert setting.spec() == "new:TOKENMILL_MEGAKERNEL_INFLIGHT=1" and parse_setting(setting.spec()).tree is None
    with pytest.raises(ValueError, match="not a source tree"):
        parse_setting(f"new@{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="not a source tree"):
        parse_setting("new@")


def test_workers_run_each_setting_in_its_tree_with_rounds_interleaved(tmp_path):
    import argparse
    import json
    import subprocess
    from pathlib import Path

    trees = [source_tree(tmp_path / "a"), source_tree(tmp_path / "b")]
    settings = [Setting("a", {}, str(trees[0])), Setting("b", {"TOKENMILL_MEGAKERNEL_INFLIGHT": "1"}, str(trees[1]))]
    args = argparse.Namespace(cells="1x128,2x128", trials=3, replays=5, seed=0, rounds=2, long_seqs=0,
                              short_context=256)
    calls = []

    def fake_worker(cmd, cwd, env, **kwargs):
        calls.append((Path(cwd), cmd[cmd.index("--setting") + 1]))
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(cwd).resolve())
        assert cmd[cmd.index("--cells") + 1] == "1x128,2x128"
        ms = 1.0 + len(calls) / 10
        Path(cmd[cmd.index("--worker-out") + 1]).write_text(json.dumps({"1x128": ms, "2x128": 2 * ms}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    times = time_in_workers(args, settings, run_process=fake_worker)
    assert calls == [(trees[0], "a"), (trees[1], "b:TOKENMILL_MEGAKERNEL_INFLIGHT=1")] * 2
    assert times == {"1x128": {"a": [1.1, 1.3], "b": [1.2, 1.4]}, "2x128": {"a": [2.2, 2.6], "b": [2.4, 2.8]}}

    def failing_worker(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 2, "", "error: unrecognized arguments: --worker-out")

    with pytest.raises(ValueError, match="its worker in .* failed:\n.*--worker-out"):
        time_in_workers(args, settings, run_process=failing_worker)
    assert worker_command(args, settings[1], "t.json")[-2:] == ["--worker-out", "t.json"]
    # mixed lengths reach the workers (and only then: older trees do not take the flags)
    mixed = argparse.Namespace(**{**vars(args), "long_seqs": 1, "short_context": 512})
    assert worker_command(mixed, settings[1], "t.json")[-4:] == ["--long-seqs", "1", "--short-context", "512"]
    assert worker_environment(trees[0])["PYTHONPATH"].startswith(str(trees[0].resolve()))

