"""What serving costs on top of the engine: `tokenmill bench offline` and `tokenmill serve` + `tokenmill bench serve`
on the same model and machine, at the same concurrency and output length, one after the other.

Offline gives the engine's time per token (batch 1) and aggregate tok/s (batch C); the server is driven with the
`random` workload (one turn, fixed sizes, nothing shared, ignore_eos) at C in flight. Prints a table of the ratios
and writes JSON.

    python scripts/served_vs_offline.py MODEL --tokenizer TOKENIZER --concurrency 1,16 --output-len 256 \\
        --out served_vs_offline.json

TOKENIZER (what `bench serve` sizes prompts with) defaults to MODEL; a random-weight model directory needs a real
BPE tokenizer next to it (its own word-level one cannot synthesise prompts).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenmill.serve.testing import ServerProcess


def run_json(cmd: list[str], out: Path) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def offline(model: str, concurrency: int, output_len: int, extra: list[str], tmp: Path) -> dict:
    out = tmp / f"offline_{concurrency}.json"
    report = run_json([sys.executable, "-m", "tokenmill", "bench", "offline", model, "--no-hf", "--no-compile",
                       "--concurrency", str(concurrency), "--output-len", str(output_len), "--output", str(out),
                       *extra], out)
    result = report["results"][0]
    return {"ms_per_token": result["single"]["ms_per_token"], "tok_s": result["aggregate_tok_s"]}


def served(url: str, tokenizer: str, concurrency: int, prompt_len: int, output_len: int, tmp: Path,
           client_processes: int = 1) -> dict:
    out = tmp / f"served_{concurrency}.json"
    workload = (f"random,sessions={max(8, 4 * concurrency)},rate=1000,random.first_message_tokens={prompt_len},"
                f"random.output_tokens={output_len}")
    report = run_json([sys.executable, "-m", "tokenmill", "bench", "serve", "--base-url", url, "--api", "completions",
                       "--tokenizer", tokenizer, "--workload", workload, "--max-concurrency", str(concurrency),
                       "--time-scale", "0", "--client-processes", str(client_processes), "--no-progress",
                       "--output", str(out)], out)
    summary = report["runs"][0]["summary"]
    if summary["num_failed"]:
        sys.exit(f"{summary['num_failed']} served requests failed: {summary.get('errors')}")
    return {"tpot_p50_ms": 1e3 * summary["tpot"]["p50"], "tok_s": summary["output_token_throughput"],
            "ttft_p50_ms": 1e3 * summary["ttft"]["p50"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokenizer", help="for bench serve's prompts (default: the model)")
    ap.add_argument("--concurrency", default="1,16", help="comma-separated")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128, help="served prompts' length")
    ap.add_argument("--serve-arg", action="append", default=[], help="passed to tokenmill serve (repeatable)")
    ap.add_argument("--offline-arg", action="append", default=[], help="passed to bench offline (repeatable)")
    ap.add_argument("--client-processes", type=int, default=1, help="bench serve's client processes")
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    tokenizer = args.tokenizer or args.model
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        engine = {c: offline(args.model, c, args.output_len, args.offline_arg, tmp) for c in levels}
        with ServerProcess(args.model, ["--max-num-seqs", str(max(levels)), *args.serve_arg]) as server:
            # Warm-up. 32 tokens, not fewer: a random model with a smaller tokenizer (the device's case) often samples
            # ids the tokenizer has no text for, and a request with no text at all counts as failed.
            served(server.url, tokenizer, 1, args.prompt_len, 32, tmp)
            for c in levels:
                s = served(server.url, tokenizer, c, args.prompt_len, args.output_len, tmp, args.client_processes)
                # The engine's time per token at this batch: batch 1 from its single stream, else C / aggregate.
                step_ms = engine[c]["ms_per_token"] if c == 1 else 1e3 * c / engine[c]["tok_s"]
                rows.append({"concurrency": c, "engine_step_ms": step_ms, "served_tpot_p50_ms": s["tpot_p50_ms"],
                             "tpot_ratio": s["tpot_p50_ms"] / step_ms, "engine_tok_s": engine[c]["tok_s"],
                             "served_tok_s": s["tok_s"], "served_ttft_p50_ms": s["ttft_p50_ms"]})
    print(f"{'C':>4} {'engine ms/token':>16} {'served TPOT p50':>16} {'ratio':>6} {'engine tok/s':>13} "
          f"{'served tok/s':>13}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['engine_step_ms']:>16.3f} {r['served_tpot_p50_ms']:>16.3f} "
              f"{r['tpot_ratio']:>6.2f} {r['engine_tok_s']:>13.0f} {r['served_tok_s']:>13.0f}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "date": time.strftime("%Y-%m-%d"),
                                        "output_len": args.output_len, "prompt_len": args.prompt_len,
                                        "client_processes": args.client_processes, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
