"""`tokenmill bench decode` end to end on the CPU (smoke: tiny shape, meaningless times): the table, the JSON, the
floor arithmetic, and that a variant which cannot run is reported in its cells instead of stopping the run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from tokenmill.bench import decode
from tokenmill.kernels.backends import triton_interpreted


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    decode.register(sub)
    return parser.parse_args(["decode", *argv])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; on a GPU run the real benchmark")
@pytest.mark.skipif(triton_interpreted(), reason="the fused variant must be unavailable for this test")
def test_bench_decode_smoke_on_cpu(tmp_path, capsys):
    out = tmp_path / "decode.json"
    args = parse(["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--quick", "--batches", "1,2",
                  "--contexts", "16,40", "--variants", "torch-eager,torch-graph,fused,hf-static",
                  "--hf-cells", "2x40", "--no-breakdown", "--out", str(out)])
    assert decode.run(args) == 0
    report = json.loads(out.read_text())
    cells = {(c["batch"], c["context"]): c for c in report["cells"]}
    assert set(cells) == {(1, 16), (1, 40), (2, 16), (2, 40)}
    bandwidth = report["copy_bandwidth_TBps"] * 1e12
    for (batch, context), cell in cells.items():
        floor = 1000 * (report["weight_bytes"] + batch * context * report["kv_bytes_per_token"]) / bandwidth
        assert cell["floor_ms"] == pytest.approx(floor)
        assert cell["results"]["torch-eager"]["ms"] > 0 and cell["results"]["torch-graph"]["ms"] > 0
        assert cell["results"]["fused"]["ms"] is None and cell["results"]["fused"]["error"]  # CPU: not available
    assert cells[(2, 40)]["results"]["hf-static"]["ms"] > 0
    assert any("fused" in note for note in report["notes"])
    assert "floor ms" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 0  # the plot, beside the JSON


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; on a GPU run the real benchmark")
def test_bench_decode_mixed_lengths_on_cpu(tmp_path, capsys):
    assert decode.cell_lengths(3, 40, long_seqs=1, short_context=8) == [40, 8, 8]
    assert decode.cell_lengths(2, 4, long_seqs=1, short_context=8) == [4, 4]  # never longer than the context
    assert decode.cell_lengths(2, 40) == [40, 40]
    inputs = decode.step_inputs(3, 40, 64, 100, torch.device("cpu"), 0, [40, 8, 8])
    assert inputs.positions.tolist() == [39, 7, 7]
    out = tmp_path / "mixed.json"
    args = parse(["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--quick", "--batches", "3",
                  "--contexts", "40", "--variants", "torch-eager", "--no-breakdown", "--long-seqs", "1",
                  "--short-context", "8", "--out", str(out)])
    assert decode.run(args) == 0
    report = json.loads(out.read_text())
    (cell,) = report["cells"]
    assert cell["kv_bytes"] == (40 + 8 + 8) * report["kv_bytes_per_token"]
    assert cell["results"]["torch-eager"]["ms"] > 0
    assert "the others at 8 tokens" in capsys.readouterr().out.replace("\n", " ")
    with pytest.raises(ValueError, match="--long-seqs must be >= 0"):
        decode.make_settings(parse(["--long-seqs", "-1"]))


def saved_cell(batch: int, context: int, ms: float) -> dict:
    return dict(batch=batch, context=context, floor_ms=0.8 + 0.01 * batch, kv_bytes=0,
                results={"fused-pdl": dict(ms=ms, error=None, note=None),
                         "megakernel": dict(ms=None, error="no GPU", note=None)})  # a failed variant: not drawn


def test_replot_draws_a_saved_run_and_rejects_other_files(tmp_path):
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(dict(device="H100", copy_bandwidth_TBps=3.0,
                                     cells=[saved_cell(b, c, 1.0 + b / 100) for b in (1, 2) for c in (128, 1024)])))
    assert decode.run(parse(["--replot", str(saved)])) == 0
    assert saved.with_suffix(".png").stat().st_size > 0
    assert decode.run(parse(["--replot", str(saved), "--out", str(tmp_path / "fig" / "x.png")])) == 0
    assert (tmp_path / "fig" / "x.png").stat().st_size > 0
    (tmp_path / "other.json").write_text(json.dumps({"cells": [{"batch": 1}]}))
    with pytest.raises(ValueError, match="lacks"):
        decode.run(parse(["--replot", str(tmp_path / "other.json")]))
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        decode.run(parse(["--replot", str(tmp_path / "text.json")]))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a bench decode report"):
        decode.run(parse(["--replot", str(tmp_path / "list.json")]))


def test_bench_decode_rejects_the_full_model_off_the_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ValueError, match="smoke test"):
        decode.run(parse(["--device", "cpu", "--quick"]))


def test_bench_decode_validates_its_lists():
    with pytest.raises(ValueError, match="unknown variants"):
        decode.make_settings(parse(["--variants", "fused,warp-drive"]))
    with pytest.raises(ValueError, match="positive integers"):
        decode.make_settings(parse(["--batches", "0,2"]))
    settings = decode.make_settings(parse(["--quick"]))
    assert settings.hf_cells == [(1, 128)] and settings.breakdown_batches == [1, 16]
    assert settings.sweep_batches == [1, 4, 16]
    assert decode.make_settings(parse(["--sweep-batches", "2,8"])).sweep_batches == [2, 8]


def llama_1b_config():
    from tokenmill.config import ModelConfig
    from tokenmill.models.random_weights import SHAPES

    return ModelConfig.from_hf_dict(dict(SHAPES["llama-3.2-1b"], architectures=["LlamaForCausalLM"]))


def test_sweep_candidates_try_both_paths_at_small_batches():
    config = llama_1b_config()
    for op in decode.GEMV_OPS:
        at1, at4, at16 = (decode.sweep_candidates(op, b, config) for b in (1, 4, 16))
        assert at1 and not any(c.use_dot for c in at1)
        assert {(c.use_dot, c.block_m) for c in at4} == {(True, 16), (False, 4)}
        assert at16 and all(c.use_dot and c.block_m == 16 for c in at16)
        assert len(set(at4)) == len(at4)
    # The heuristic's batch-16 picks are among the candidates, so the sweep re-measures them next to the others.
    from tokenmill.kernels.triton.fused_config import choose_gemv_config

    for op in decode.GEMV_OPS:
        n, k, pair_half = decode.gemm_shape(config, op)
        assert choose_gemv_config(16, n, k, sm_count=132, pair_half=pair_half) in decode.sweep_candidates(op, 16, config)


def cell(batch: int, context: int, fused: float | None, torch_graph: float | None) -> decode.Cell:
    c = decode.Cell(batch, context, 1.0, 0)
    c.results = {"fused": decode.VariantResult(ms=fused), "torch-graph": decode.VariantResult(ms=torch_graph)}
    return c


def test_fused_max_batch_is_where_fused_stops_winning():
    cells = [cell(1, 128, 1.1, 1.6), cell(1, 1024, 1.2, 1.7), cell(2, 128, 1.3, 1.7), cell(2, 1024, 1.4, 1.8),
             cell(4, 128, 1.5, 1.7), cell(4, 1024, 1.9, 1.8), cell(8, 128, 1.5, 1.9)]
    assert decode.fused_max_batch(cells) == 2  # batch 4 loses at 1k context; batch 8 winning does not count
    assert decode.fused_max_batch([cell(1, 128, 2.0, 1.6)]) == 0
    assert decode.fused_max_batch([cell(1, 128, 1.0, 1.6), cell(2, 128, None, 1.7)]) == 1  # batch 2 failed
    assert decode.fused_max_batch([cell(1, 128, None, 1.6)]) is None


def test_sweep_summary_counts_layers_and_the_lm_head_once():
    def row(op, us, heuristic, bn):
        return dict(batch=16, op=op, us=us, heuristic=heuristic, config=dict(block_n=bn))

    rows = [row("down", 16.0, True, 16), row("down", 15.0, False, 32), row("lm_head", 190.0, True, 64),
            row("lm_head", 200.0, False, 32), dict(batch=16, op="o", heuristic=True, error="boom", config={})]
    summary = {s["op"]: s for s in decode.sweep_summary(rows, num_layers=16)}
    assert set(summary) == {"down", "lm_head"}  # o has no timed heuristic row
    assert summary["down"]["us_per_step_left"] == pytest.approx(16.0)
    assert summary["down"]["best"] == dict(block_n=32)
    assert summary["lm_head"]["us_per_step_left"] == 0.0
