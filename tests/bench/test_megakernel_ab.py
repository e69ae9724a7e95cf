"""`tokenmill bench megakernel-ab` off the GPU: settings, cells, the knob environment, the summary, CLI errors."""

from __future__ import annotations

import os

import pytest
import torch

from tokenmill.bench.megakernel_ab import (
    Setting, knob_environment, parse_cells, parse_setting, parse_settings, summarise,
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
