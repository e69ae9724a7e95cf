"""`tokenmill bench offline` end to end on the CPU with a random tiny model: the table's JSON, and the engine settings
it passes through (async scheduling forced on, where the CPU default is off)."""

from __future__ import annotations

import json

from tokenmill.cli import main


def test_bench_offline_on_a_random_tiny_model_with_async_scheduling(tmp_path):
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--random-shape", "tiny", "--device", "cpu", "--no-hf", "--concurrency", "3",
            "--output-len", "6", "--repeats", "1", "--async-scheduling", "on", "--output", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    [engine] = [r for r in report["results"] if r["name"].startswith("tokenmill")]
    assert engine["name"] == "tokenmill (auto, async)"
    assert engine["single"]["ms_per_token"] > 0 and engine["aggregate_tok_s"] > 0
    assert report["concurrency"] == 3 and report["output_tokens"] == 6
