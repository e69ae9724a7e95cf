"""Async scheduling: the engine launches decode step N+1 before step N's tokens reach the host (its input ids come
from N's sampled ids on the device). On the CPU nothing overlaps, but the path is the same, so these tests force it
on and hold it to the synchronous engine's outputs exactly: tokens, finish reasons, stop strings, logprobs, aborts,
NaN rows, preemption, and blocks returned."""

from __future__ import annotations

import pytest
import torch

from tokenmill.engine.engine import LLMEngine
from tokenmill.llm import make_engine_config
from tokenmill.sampling_params import SamplingParams

from tests.engine.test_engine import assert_no_leaks, prompts


def make_engine(model, async_scheduling: str, **kw) -> LLMEngine:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    return LLMEngine(make_engine_config(str(model), async_scheduling=async_scheduling, **kw))


def count_steps_ahead(engine: LLMEngine) -> list[int]:
    """Wraps the scheduler so the test sees how many steps were planned ahead: [planned, refused]."""
    counts = [0, 0]
    schedule_ahead = engine.scheduler.schedule_ahead

    def counted(now=None):
        out = schedule_ahead(now)
        counts[out is None] += 1
        return out

    engine.scheduler.schedule_ahead = counted
    return counts


def run(engine: LLMEngine, waves: list[list[tuple[list[int], SamplingParams]]], steps_between: int = 3) -> dict:
    """Adds each wave of requests `steps_between` steps after the previous; returns id -> final output."""
    final = {}
    for k, wave in enumerate(waves):
        for i, (prompt, params) in enumerate(wave):
            engine.add_request(prompt, params, request_id=f"wave{k}-{i}")
        for _ in range(steps_between if k + 1 < len(waves) else 10**6):
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
    assert_no_leaks(engine)
    return final


class Logprobs(list):
    """A completion's logprobs, equal to another's when the same tokens have the same ranks and logprobs within
    1e-4 (a request admitted a step later shares its batches with other requests, which moves float32 sums in the
    last bits; rounding both to 4 decimals flipped on values next to a rounding boundary)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, list) and len(self) == len(other) and all(
            a.keys() == b.keys() and all(a[t][1] == b[t][1] and abs(a[t][0] - b[t][0]) <= 1e-4 for t in a)
            for a, b in zip(self, other))

    def __ne__(self, other: object) -> bool:
        return not self == other


def summary(outs: dict) -> dict:
    """What must match: tokens, finish and stop reasons and text exactly, logprobs as Logprobs compares them."""
    def logprobs(entries):
        return entries and Logprobs([{t: (lp.logprob, lp.rank) for t, lp in entry.items()} for entry in entries])

    return {rid: [(c.token_ids, c.finish_reason, c.stop_reason, c.text, logprobs(c.logprobs)) for c in out.outputs]
            for rid, out in outs.items()}


def mixed_workload(sync_tokens: list[list[int]]) -> list[tuple[list[int], SamplingParams]]:
    """Requests that stop on a token, on a string, by length, with penalties, logprobs, n = 2, min_tokens and
    seeded sampling; the stops are picked from a first synchronous greedy run so that they fire mid-generation."""
    ps = prompts(8, seed=3)
    greedy = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    params = [
        SamplingParams(**greedy),
        SamplingParams(**dict(greedy, max_tokens=24), stop_token_ids=[sync_tokens[1][6]]),
        SamplingParams(**greedy, stop=[f"<{sync_tokens[2][9]}>"]),
        SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=17, n=2),
        SamplingParams(**greedy, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(**greedy, logprobs=3),
        SamplingParams(**dict(greedy, max_tokens=5), min_tokens=3, stop_token_ids=[sync_tokens[6][0]]),
        SamplingParams(temperature=1.0, top_p=0.8, seed=5, max_tokens=30),
    ]
    return list(zip(ps, params))


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(max_num_batched_tokens=24),  # chunked prefills mixed with decodes
        dict(num_blocks=24, block_size=4),  # preemption by recompute
        dict(max_num_seqs=3),
    ],
    ids=["batched", "chunked", "preempt", "few-seqs"],
)
def test_async_scheduling_gives_the_synchronous_outputs(tiny_model_dir, config):
    plain = make_engine(tiny_model_dir, "off", **config)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    first = plain.generate_blocking(prompts(8, seed=3), greedy)
    workload = mixed_workload([o.outputs[0].token_ids for o in first])
    waves = [workload[:5], workload[5:]]
    expected = summary(run(make_engine(tiny_model_dir, "off", **config), waves))
    engine = make_engine(tiny_model_dir, "on", **config)
    planned = count_steps_ahead(engine)
    got = summary(run(engine, waves))
    assert got == expected
    assert {o[1] for outs in got.values() for o in outs} >= {"stop", "length"}
    assert planned[0] > 10, planned  # most decode steps went out before their predecessor's tokens were read


def test_abort_while_a_step_is_in_flight(tiny_model_dir):
    results = {}
    for mode in ("off", "on"):
        engine = make_engine(tiny_model_dir, mode)
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts(4)]
        for _ in range(5):
            engine.step()
        (aborted,) = engine.abort_request(ids[1])
        assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
        finals = {ids[1]: aborted}
        while engine.has_unfinished_requests():
            finals.update({o.request_id: o for o in engine.step() if o.finished})
        assert_no_leaks(engine)
        results[mode] = [(finals[i].outputs[0].token_ids, finals[i].outputs[0].finish_reason) for i in ids]
    assert results["on"] == results["off"]
    assert len(results["on"][1][0]) == 5  # the token of the step in flight at the abort is dropped


def test_aborting_everyone_leaves_no_step_in_flight(tiny_model_dir):
    engine = make_engine(tiny_model_dir, "on")
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)) for p in prompts(2)]
    for _ in range(3):
        engine.step()
    assert engine._ahead is not None
    for i in ids:
        engine.abort_request(i)
    assert engine._ahead is None and not engine.has_unfinished_requests()
    assert_no_leaks(engine)
    (out,) = engine.generate_blocking(prompts(1), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 4


def test_nan_logits_fail_only_that_request(tiny_model_dir):
    engine = make_engine(tiny_model_dir, "on")
    compute_logits = engine.model.compute_logits
    calls = [0]

    def poisoned(hidden):
        logits = compute_logits(hidden)
        calls[0] += 1
        if calls[0] == 4:
            logits[1] = float("nan")
        return logits

    engine.model.compute_logits = poisoned
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = engine.generate_blocking(prompts(3), params)
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert sorted(reasons) == ["error", "length", "length"]
    failed = outs[reasons.index("error")].outputs[0]
    assert len(failed.token_ids) == 3 and -1 not in failed.token_ids  # no placeholder leaks into an output
    assert_no_leaks(engine)


def test_placeholders_are_filled_from_the_earlier_rows_as_the_graph_path_stages_them():
    """The CUDA-graph path stages (targets, sources) as int32 rows behind the block tables and fills its int32 ids
    in place; the eager path passes int64. Both through fill_placeholders, checked here on the CPU."""
    from tokenmill.engine.runner import fill_placeholders

    staged = torch.arange(100, 108, dtype=torch.int32)  # a graph's ids [b = 8], padded rows included
    pairs = torch.tensor([[5, 0, 3, 9, 9], [2, 1, 0, 9, 9]], dtype=torch.int32)[:, :3]  # only the first 3 are live
    earlier = torch.tensor([70, 71, 72], dtype=torch.int64)
    fill_placeholders(staged[:8], pairs, earlier)
    assert staged.tolist() == [71, 101, 102, 70, 104, 72, 106, 107]
    ids = torch.tensor([1, -1, 2, -1], dtype=torch.long)
    fill_placeholders(ids, torch.tensor([[1, 3], [2, 0]]), earlier)
    assert ids.tolist() == [1, 72, 2, 70]


def test_async_scheduling_setting_is_checked_and_defaults_off_on_the_cpu(tiny_model_dir):
    with pytest.raises(ValueError, match="async_scheduling"):
        make_engine_config(str(tiny_model_dir), async_scheduling="sometimes")
    assert not make_engine(tiny_model_dir, "auto").async_scheduling
    assert make_engine(tiny_model_dir, "on").async_scheduling


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA graphs, a device that runs ahead)")
def test_async_scheduling_on_the_gpu_gives_the_synchronous_tokens(tmp_path):
    from tokenmill.models.random_weights import make_random_model_dir

    shape = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5,
                 tie_word_embeddings=True)
    model_dir = make_random_model_dir(tmp_path / "m", shape, dtype=torch.bfloat16, std=0.2)
    config = dict(dtype="bfloat16", device="cuda", max_num_seqs=16, num_blocks=256)
    # One wave, so both engines run the same batches step by step (the decode batch shrinks 12 -> 1 as requests
    # reach their lengths: graphs of 16, 8, 4, 2, 1). A request arriving mid-run would join a step later with async
    # scheduling, and on the GPU a different batch (or a mixed prefill step on the eager model) rounds bf16
    # differently, so free-running greedy tokens may part ways: the CPU tests cover arrivals.
    wave = [(p, SamplingParams(temperature=0.0, max_tokens=20 + 5 * i, ignore_eos=True))
            for i, p in enumerate(prompts(12, seed=1))]
    expected = summary(run(make_engine(model_dir, "off", **config), [wave]))
    engine = make_engine(model_dir, "auto", **config)
    assert engine.async_scheduling and engine.runner.graphs
    planned = count_steps_ahead(engine)
    assert summary(run(engine, [wave])) == expected
    assert planned[0] > 60, planned


def test_a_prefill_chunk_launched_ahead_is_not_run_twice(tiny_model_dir):
    """A step that samples nothing (a prompt's middle chunk) launched ahead is still the step that runs: the engine
    executes as many steps as without async scheduling."""
    counts = {}
    for mode in ("off", "on"):
        engine = make_engine(tiny_model_dir, mode, max_num_batched_tokens=8)
        execute, calls = engine.runner.execute, [0]

        def counted(*args, execute=execute, calls=calls):
            calls[0] += 1
            return execute(*args)

        engine.runner.execute = counted
        (out,) = engine.generate_blocking([list(range(5, 45))], SamplingParams(temperature=0.0, max_tokens=4,
                                                                                ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 4
        counts[mode] = calls[0]
    assert counts["on"] == counts["off"] == 5 + 3  # 40 prompt tokens in chunks of 8, then 3 decode steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (a device that runs ahead of the host)")
def test_launching_a_step_never_waits_for_the_device(tmp_path):
    """With async scheduling the host plans and launches step N+1 while step N runs; a synchronising call in the
    launch (a host list copied to the GPU with torch.tensor(..., device=...), a .item()) would serialise them again.
    Prompt chunks, decodes and every sampling feature, after a warm-up wave: torch's sync debug mode raises on any
    synchronising call inside the runner's forward or the sampler's launch."""
    from tokenmill.models.random_weights import make_random_model_dir

    shape = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5,
                 tie_word_embeddings=True)
    model_dir = make_random_model_dir(tmp_path / "m", shape, dtype=torch.bfloat16, std=0.2)
    engine = make_engine(model_dir, "on", dtype="bfloat16", device="cuda", max_num_seqs=16, num_blocks=256,
                         max_num_batched_tokens=64)
    kinds = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9), dict(temperature=0.7, top_k=5),
             dict(temperature=1.0, min_p=0.1, seed=3), dict(temperature=1.0, presence_penalty=0.5),
             dict(temperature=1.0, min_tokens=4), dict(temperature=1.0, logprobs=2)]

    def wave() -> list[tuple[list[int], SamplingParams]]:
        return [(p, SamplingParams(max_tokens=12, ignore_eos=True, **kinds[i % len(kinds)]))
                for i, p in enumerate(prompts(10, seed=4))]

    run(engine, [wave()])  # warm-up: lazy initialisation and first compiles may synchronise
    checked = [0]

    def strict(fn):
        def call(*args, **kwargs):
            checked[0] += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return call

    engine.runner.execute = strict(engine.runner.execute)
    engine.sampler.launch = strict(engine.sampler.launch)
    outs = run(engine, [wave(), wave()], steps_between=2)
    assert len(outs) == 20 and all(len(o.outputs[0].token_ids) == 12 for o in outs.values())
    assert checked[0] > 40
