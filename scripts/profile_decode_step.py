"""Where does a decode step's time go? Host work vs the captured forward, on a random Llama-3.2-1B: whole engine
steps with and without async scheduling, the graph replayed alone, and the host's pieces timed with syncs.

    python scripts/profile_decode_step.py [--batch 1,16,64,256] [--steps 200] [--out step.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from tokenmill.engine.engine import LLMEngine
from tokenmill.llm import make_engine_config
from tokenmill.models.random_weights import make_random_model_dir
from tokenmill.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1", help="batch sizes, comma-separated (one engine serves them in turn)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--decode-backend", default="auto")
    ap.add_argument("--out", default=None, help="also write the numbers here (JSON)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    folder = make_random_model_dir(tempfile.mkdtemp(), args.shape, torch.bfloat16, device="cuda")
    engine = LLMEngine(make_engine_config(str(folder), dtype="bfloat16", max_model_len=2048,
                                          max_num_seqs=max(64, *batches), enable_prefix_caching=False,
                                          decode_backend=args.decode_backend))
    reports = [profile_batch(engine, batch, args.steps) for batch in batches]
    if args.out:
        report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                  "decode_backend": args.decode_backend, "batches": reports}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def profile_batch(engine: LLMEngine, batch: int, steps: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=3 * steps + 200, ignore_eos=True)
    ids = [engine.add_request(list(range(10, 74)), params) for _ in range(batch)]
    engine.step()  # prefill

    # 1) whole engine steps, back to back (what a user sees), with and without async scheduling
    def engine_step_ms(async_scheduling: bool) -> float:
        engine.async_scheduling = async_scheduling  # the step after a switch drains a step launched ahead
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t0) / steps

    async_ms = engine_step_ms(True)
    step_ms = engine_step_ms(False)

    # 2) the captured forward alone, replayed back to back
    runner = engine.runner
    graph = runner._graph_for(batch, max(r.num_tokens for r in engine.scheduler.running))
    replay_ms = float("nan")
    if graph is not None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.graph.replay()
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / steps

    # 3) host-side pieces, timed with syncs in between
    parts: dict[str, list[float]] = {k: [] for k in ("schedule", "execute", "sample", "update+output")}
    for _ in range(50):
        t = time.perf_counter()
        sched = engine.scheduler.schedule()
        scheduled = [(s.request, s.num_new_tokens) for s in sched.scheduled]
        t1 = time.perf_counter()
        rows, logits, _ = runner.execute(scheduled)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        reqs = [scheduled[r][0] for r in rows]
        out = engine.sampler.sample(logits, reqs)
        t3 = time.perf_counter()
        sampled = {r.request_id: tok for r, tok in zip(reqs, out.token_ids)}
        engine.scheduler.update_from_output(sched, sampled)
        now = time.monotonic()
        for r in reqs:
            engine.outputs.record_tokens(r, out.logprobs[0], False, now)
        t4 = time.perf_counter()
        for k, v in zip(parts, (t1 - t, t2 - t1, t3 - t2, t4 - t3)):
            parts[k].append(1000 * v)
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    print(f"batch {batch}: engine step {step_ms:.3f} ms, with async scheduling {async_ms:.3f} ms, "
          f"graph replay {replay_ms:.3f} ms")
    for k, v in parts.items():
        print(f"  {k:14s} {statistics.median(v):.3f} ms (median, synced)")
    return {"batch": batch, "engine_step_ms": step_ms, "engine_step_async_ms": async_ms, "graph_replay_ms": replay_ms,
            "host_parts_ms": {k: statistics.median(v) for k, v in parts.items()}}


if __name__ == "__main__":
    main()
