"""The engine end to end on CPU: batch invariance, prefix cache on/off, chunking, preemption, aborts, NaN logits."""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.outputs import NullObserver
from tokenmill.llm import make_engine_config
from tokenmill.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_engine(model, **kw) -> LLMEngine:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    return LLMEngine(make_engine_config(str(model), **kw))


def prompts(n: int, seed: int = 0, shared_prefix: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 500) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def assert_no_leaks(engine: LLMEngine) -> None:
    kv = engine.kv
    assert not engine.has_unfinished_requests()
    assert kv.num_free_blocks + kv.num_evictable_blocks == kv.num_usable_blocks


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Each prompt alone, no prefix cache: the answer every configuration must reproduce."""
    engine = make_engine(tiny_model_dir, enable_prefix_caching=False, max_num_seqs=1)
    ps = prompts(8)
    return ps, [tokens(engine.generate_blocking([p], GREEDY))[0] for p in ps]


@pytest.mark.parametrize(
    "config",
    [
        dict(enable_prefix_caching=False),
        dict(enable_prefix_caching=True),
        dict(enable_prefix_caching=True, max_num_batched_tokens=24),  # prefill in chunks, mixed with decodes
        dict(enable_prefix_caching=True, max_num_seqs=3),
        dict(enable_prefix_caching=True, num_blocks=20, block_size=4),  # forces preemption by recompute
        dict(enable_prefix_caching=False, num_blocks=20, block_size=4),
    ],
    ids=["batched", "prefix-cache", "chunked", "few-seqs", "preempt-cached", "preempt"],
)
def test_greedy_is_batch_and_cache_invariant(tiny_model_dir, reference, config):
    ps, expected = reference
    engine = make_engine(tiny_model_dir, **config)
    # twice: the second pass hits the prefix cache (when on)
    for _ in range(2):
        assert tokens(engine.generate_blocking(ps, GREEDY)) == expected
    assert_no_leaks(engine)


class Recorder(NullObserver):
    def __init__(self) -> None:
        super().__init__()
        self.preemptions = 0
        self.finished: list = []

    def on_step(self, stats) -> None:
        self.preemptions += stats.num_preemptions

    def on_finished(self, stats) -> None:
        self.finished.append(stats)


def test_preemption_happens_and_is_counted(tiny_model_dir):
    recorder = Recorder()
    config = make_engine_config(str(tiny_model_dir), max_model_len=256, dtype="float32", device="cpu",
                                num_blocks=20, block_size=4)
    engine = LLMEngine(config, observer=recorder)
    engine.generate_blocking(prompts(8), GREEDY)
    # 8 requests of 21..72 tokens cannot all fit in 80 slots at once
    assert recorder.preemptions > 0
    assert len(recorder.finished) == 8


def test_prefix_cache_reports_cached_tokens(tiny_model_dir):
    engine = make_engine(tiny_model_dir, block_size=4)
    p = prompts(1, shared_prefix=32)[0]
    (first,) = engine.generate_blocking([p], GREEDY)
    (second,) = engine.generate_blocking([p], GREEDY)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 28 and second.num_cached_tokens % 4 == 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_abort_mid_generation_frees_blocks(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)) for p in prompts(4)]
    for _ in range(3):
        engine.step()
    outs = engine.abort_request(ids[1])
    assert outs and outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)


def test_abort_of_the_last_request_updates_the_gauges(tiny_model_dir):
    """No step follows an abort that empties the engine, so /metrics must not keep showing the aborted request."""
    engine = make_engine(tiny_model_dir)
    steps = []
    engine.observer.on_step = steps.append
    rid = engine.add_request(prompts(1)[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    assert steps[-1].num_running == 1 and steps[-1].kv_cache_usage > 0
    engine.abort_request(rid)
    assert (steps[-1].num_running, steps[-1].num_waiting, steps[-1].kv_cache_usage) == (0, 0, 0.0)


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_random_mix_never_leaks(tiny_model_dir, async_scheduling):
    engine = make_engine(tiny_model_dir, num_blocks=24, block_size=4, max_num_batched_tokens=32,
                         async_scheduling=async_scheduling)
    rng = random.Random(7)
    live: list[str] = []
    for step in range(120):
        if rng.random() < 0.3 and len(live) < 10:
            p = prompts(1, seed=rng.randrange(10**6), shared_prefix=rng.choice([0, 8, 16]))[0]
            live.append(engine.add_request(p, SamplingParams(temperature=0.8, seed=step,
                                                             max_tokens=rng.randrange(1, 20))))
        if live and rng.random() < 0.1:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)


def test_seeded_sampling_is_batch_invariant(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    ps = prompts(5)
    alone = tokens(engine.generate_blocking([ps[2]], params))[0]
    together = tokens(engine.generate_blocking(ps, [GREEDY, params, params, GREEDY, params]))
    assert together[2] == alone


def test_requests_without_progress_report_just_their_final_outputs(tiny_model_dir):
    streaming, quiet = make_engine(tiny_model_dir), make_engine(tiny_model_dir)
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 4 * i, ignore_eos=True) for i in range(3)]
    ids = [[engine.add_request(p, sp, report_progress=engine is streaming) for p, sp in zip(prompts(3), params)]
           for engine in (streaming, quiet)]
    every, finals = [], []
    while streaming.has_unfinished_requests() or quiet.has_unfinished_requests():
        every += streaming.step()
        finals += quiet.step()
    assert all(out.finished for out in finals) and len(finals) == 3
    assert len(every) > len(finals)  # streaming steps report unfinished requests too
    streamed = {out.request_id: out.outputs[0].token_ids for out in every if out.finished}
    final = {out.request_id: out.outputs[0].token_ids for out in finals}
    assert [final[i] for i in ids[1]] == [streamed[i] for i in ids[0]]
    assert_no_leaks(quiet)


def test_requests_without_progress_are_reported_once_finished(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(2)]
    quiet = engine.add_request(prompts(1)[0], params[0], report_progress=False)
    loud = engine.add_request(prompts(2)[1], params[1])
    seen: dict[str, list] = {quiet: [], loud: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert [o.finished for o in seen[quiet]] == [True] and len(seen[quiet][0].outputs[0].token_ids) == 4
    assert len(seen[loud]) == 7 and seen[loud][-1].finished  # one per sampled token
    assert_no_leaks(engine)


def test_n_returns_n_completions(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    (out,) = engine.generate_blocking(prompts(1), SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_no_leaks(engine)


def test_nan_logits_fail_only_that_request(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    compute_logits = engine.model.compute_logits
    state = {"calls": 0}

    def poisoned(hidden):
        logits = compute_logits(hidden)
        state["calls"] += 1
        if state["calls"] == 3:
            logits[0] = float("nan")
        return logits

    engine.model.compute_logits = poisoned
    outs = engine.generate_blocking(prompts(3), GREEDY)
    errors = [o for o in outs if o.outputs[0].finish_reason == "error"]
    assert len(errors) == 1 and "NaN" in errors[0].error
    assert sum(o.outputs[0].finish_reason == "length" for o in outs) == 2
    assert_no_leaks(engine)


def test_rejects_impossible_requests(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request(list(range(3, 70)), GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request([5, 10**6], GREEDY)


def test_stop_strings_and_tokens(smollm2_path):
    engine = make_engine(smollm2_path, max_model_len=512)
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Count from 1 to 20, separated by commas."}]),
                        add_special_tokens=False)
    (free,) = engine.generate_blocking([prompt], SamplingParams(temperature=0, max_tokens=60))
    text = free.outputs[0].text
    assert "5" in text
    stop_at = text[text.index("5"):text.index("5") + 1]
    (stopped,) = engine.generate_blocking([prompt], SamplingParams(temperature=0, max_tokens=60, stop=[stop_at]))
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].text == text[: text.index(stop_at)]
    assert stopped.outputs[0].stop_reason == stop_at
    eos_free = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[free.outputs[0].token_ids[2]])
    (by_id,) = engine.generate_blocking([prompt], eos_free)
    assert by_id.outputs[0].token_ids == free.outputs[0].token_ids[:3]
    assert by_id.outputs[0].finish_reason == "stop"


def test_python_api_batch_limits_follow_the_device():
    """LLM(...) / make_engine_config: on a GPU, unset batch limits are the CLI's GPU defaults; what the caller sets,
    and everything on the CPU, stays as given (nothing here needs a GPU: the device is only named)."""
    from tokenmill.config import GPU_MAX_NUM_BATCHED_TOKENS, GPU_MAX_NUM_SEQS, SchedulerConfig

    cpu = make_engine_config(None, device="cpu").scheduler
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (SchedulerConfig.max_num_seqs,
                                                              SchedulerConfig.max_num_batched_tokens)
    gpu = make_engine_config(None, device="cuda").scheduler
    assert (gpu.max_num_seqs, gpu.max_num_batched_tokens) == (GPU_MAX_NUM_SEQS, GPU_MAX_NUM_BATCHED_TOKENS)
    mine = make_engine_config(None, device="cuda", max_num_seqs=32, max_num_batched_tokens=1024).scheduler
    assert (mine.max_num_seqs, mine.max_num_batched_tokens) == (32, 1024)


def test_batch_limits_shared_by_the_cli_and_the_python_api():
    from tokenmill.config import GPU_MAX_NUM_BATCHED_TOKENS, GPU_MAX_NUM_SEQS, batch_limits

    assert batch_limits(True, None, None, cpu_defaults=(64, 512)) == (GPU_MAX_NUM_SEQS, GPU_MAX_NUM_BATCHED_TOKENS)
    assert batch_limits(False, None, None, cpu_defaults=(64, 512)) == (64, 512)
    assert batch_limits(False, 1000, None, cpu_defaults=(64, 512)) == (1000, 1000)  # a defaulted budget holds them
    assert batch_limits(False, 1000, 300, cpu_defaults=(64, 512)) == (1000, 300)  # a given one is kept


def test_unknown_or_missing_device_is_a_value_error():
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        make_engine_config(None, device="bogus").resolved_device()
    with pytest.raises(ValueError, match="'cuda:99' is not available"):
        LLMEngine(make_engine_config(None, device="cuda:99"))


def test_unknown_cudagraph_mode_is_refused():
    with pytest.raises(ValueError, match="cudagraph_mode must be one of"):
        make_engine_config(None, cudagraph_mode="sometimes")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads resident memory from /proc")
def test_cpu_kv_cache_is_zero_and_takes_memory_only_when_used():
    from tokenmill.engine.runner import _zeros_on_first_touch

    def resident_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    before = resident_mib()
    cache = _zeros_on_first_touch((2, 256, 1024, 512), torch.bfloat16)  # 512 MiB
    assert cache.shape == (2, 256, 1024, 512) and cache.dtype == torch.bfloat16 and cache.is_contiguous()
    assert resident_mib() - before < 64
    assert not cache[1, 255].any()
    cache[1, 255] = 2.0
    assert float(cache[1, 255].sum()) == 2.0 * 1024 * 512 and not cache[0].any()
