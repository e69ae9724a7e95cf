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
