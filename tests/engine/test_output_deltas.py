"""LLMEngine.step_deltas carries only each step's news, and DeltaDecoder rebuilds exactly what step() reports."""

from __future__ import annotations

import pytest

from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.output_deltas import DeltaDecoder
from tokenmill.llm import make_engine_config
from tokenmill.sampling_params import SamplingParams

ENGINE_KW = dict(device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8, seed=5)

# Greedy, logprobs, seeded and unseeded sampling with n = 2, a stop string (its text held back, then cut) and a
# request aborted half-way.
REQUESTS = [
    ([5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
    ([9, 10, 11] * 5, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)),
    ([12, 13], SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=9, ignore_eos=True)),
    ([12, 14], SamplingParams(temperature=1.0, n=2, max_tokens=11, ignore_eos=True, logprobs=1)),
    ([14, 15, 16], SamplingParams(temperature=0.0, max_tokens=30, stop=["<20>"])),
    ([17] * 30, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)),
]
ABORT_AT_STEP = 6


@pytest.fixture(scope="module")
def twin_engines(tiny_model_dir):
    return [LLMEngine(make_engine_config(str(tiny_model_dir), **ENGINE_KW)) for _ in range(2)]


def test_decoded_deltas_equal_the_cumulative_outputs_at_every_step(twin_engines):
    cumulative, by_delta = twin_engines
    for engine in twin_engines:
        for i, (prompt, params) in enumerate(REQUESTS):
            engine.add_request(prompt, params, f"r{i}")
    decoder = DeltaDecoder()
    step = 0
    while cumulative.has_unfinished_requests():
        step += 1
        if step == ABORT_AT_STEP:
            want, deltas = cumulative.abort_request("r5"), by_delta.abort_request_deltas("r5")
            assert len(want) == len(deltas) == 1 and want[0].finished
            assert [decoder.decode(d) for d in deltas] == want
        want, deltas = cumulative.step(), by_delta.step_deltas()
        assert [d.request_id for d in deltas] == [w.request_id for w in want]
        assert [decoder.decode(d) for d in deltas] == want, f"step {step}"
    assert not by_delta.has_unfinished_requests() and len(decoder) == 0  # finished requests forgotten
    assert step > ABORT_AT_STEP


def test_a_delta_carries_the_prompt_once_and_then_only_new_tokens_and_text(twin_engines):
    engine = twin_engines[1]
    engine.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), "news")
    deltas = [d for _ in range(20) if engine.has_unfinished_requests() for d in engine.step_deltas()]
    assert deltas[0].prompt_token_ids == [5, 6, 7] and all(d.prompt_token_ids is None for d in deltas[1:])
    tokens = [t for d in deltas for t in d.outputs[0].token_ids]
    assert len(tokens) == 6 and all(len(d.outputs[0].token_ids) <= 1 for d in deltas)
    assert "".join(d.outputs[0].text for d in deltas).split() == [f"<{t}>" for t in tokens]  # word-level tokens
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"
