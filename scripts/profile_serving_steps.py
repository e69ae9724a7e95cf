"""The steps a server runs besides steady decode, timed on a random Llama-3.2-1B (CUDA): a prompt's prefill by
length (first and later calls: compilation shows in the first), a mixed step (running decodes plus a prompt chunk),
and where an async-scheduled decode step's host time goes (launch ahead, wait for the previous tokens, complete).

    python scripts/profile_serving_steps.py [--cudagraph-mode full_and_piecewise] [--out serving_steps.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time

import torch

from tokenmill.engine import engine as engine_module
from tokenmill.engine import sampler as sampler_module
from tokenmill.engine.engine import LLMEngine
from tokenmill.llm import make_engine_config
from tokenmill.models.random_weights import make_random_model_dir
from tokenmill.sampling_params import SamplingParams


def timed_step(engine: LLMEngine) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def drain(engine: LLMEngine, ids: list[str]) -> None:
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cudagraph-mode", default="full_and_piecewise")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    folder = make_random_model_dir(tempfile.mkdtemp(), "llama-3.2-1b", torch.bfloat16, device="cuda")
    engine = LLMEngine(make_engine_config(str(folder), dtype="bfloat16", max_model_len=4096,
                                          enable_prefix_caching=False, cudagraph_mode=args.cudagraph_mode))
    report: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                    "cudagraph_mode": args.cudagraph_mode}
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    prefill = {}
    for length in (16, 64, 256, 1024, 2048, 100, 700):
        times = []
        for rep in range(3):
            engine.add_request([(rep * 7 + i) % 1000 + 10 for i in range(length)], one)
            times.append(timed_step(engine))
            while engine.has_unfinished_requests():
                engine.step()
        prefill[length] = times
        print(f"prefill {length:5d} tokens: " + " / ".join(f"{t:.2f}" for t in times) + " ms (calls 1 / 2 / 3)")
    report["prefill_ms"] = prefill

    mixed = {}
    long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
    for running, chunk in ((1, 512), (8, 512), (8, 64), (32, 256)):
        ids = [engine.add_request(list(range(10, 74)), long) for _ in range(running)]
        for _ in range(4):
            engine.step()
        decode_ms = sorted(timed_step(engine) for _ in range(9))[4]
        times = []
        for rep in range(3):
            ids.append(engine.add_request([(rep + i) % 1000 + 10 for i in range(chunk)], one))
            times.append(timed_step(engine))
            for _ in range(3):
                engine.step()
        mixed[f"{running}x{chunk}"] = {"decode_ms": decode_ms, "mixed_ms": times}
        print(f"{running:3d} decodes + a {chunk}-token prompt: {' / '.join(f'{t:.2f}' for t in times)} ms "
              f"(decode alone {decode_ms:.2f})")
        drain(engine, ids)
    report["mixed"] = mixed

    # where an async decode step's host time goes
    spent: collections.Counter = collections.Counter()

    def wrap(owner, name: str) -> None:
        original = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        setattr(owner, name, timed)

    for name in ("_launch_ahead", "_complete", "step"):
        wrap(engine_module.LLMEngine, name)
    wrap(sampler_module.PendingSample, "result")
    async_parts = {}
    for batch in (1, 16, 64):
        ids = [engine.add_request(list(range(10, 74)), long) for _ in range(batch)]
        engine.async_scheduling = True
        for _ in range(10):
            engine.step()
        spent.clear()
        steps = 100
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        parts = {k: 1000 * v / steps for k, v in spent.items()}
        async_parts[batch] = parts
        print(f"async batch {batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + " ms per step")
        drain(engine, ids)
    report["async_step_parts_ms"] = async_parts
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
