"""The engine in a process of its own (ProcessCore) behind AsyncEngine: the same outputs as on a thread, aborts,
metrics events, bad requests, a dead engine process, start-up errors, and no process left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.outputs import SchedulerStats
from tokenmill.llm import make_engine_config
from tokenmill.sampling_params import SamplingParams

ENGINE_KW = dict(device="cpu", dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)


class Recorder:
    def __init__(self) -> None:
        self.steps: list[SchedulerStats] = []
        self.first_tokens = self.inter_tokens = 0
        self.finished: list = []

    def on_step(self, stats):
        self.steps.append(stats)

    def on_first_token(self, ttft_s):
        self.first_tokens += 1

    def on_inter_token(self, itl_s):
        self.inter_tokens += 1

    def on_finished(self, stats):
        self.finished.append(stats)


@pytest.fixture(scope="module")
def process_engine(tiny_model_dir):
    engine = AsyncEngine.from_config(make_engine_config(str(tiny_model_dir), **ENGINE_KW), engine_process=True)
    yield engine
    engine.shutdown()


def run(coro):
    return asyncio.run(coro)


async def collect(engine, prompt, params, request_id, progress=True):
    outs = []
    async for out in engine.generate(prompt, params, request_id, progress=progress):
        outs.append(out)
    return outs


REQUESTS = [
    ([5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
    ([9, 10, 11] * 5, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)),
    ([12, 13], SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=9, ignore_eos=True)),
    ([14, 15, 16], SamplingParams(temperature=0.0, max_tokens=30, stop=["<20>"])),
    ([17] * 30, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)),
]


async def every_output(engine, tag):
    return await asyncio.gather(*[collect(engine, p, sp, f"{tag}{i}") for i, (p, sp) in enumerate(REQUESTS)])


def test_same_outputs_as_the_engine_on_a_thread(tiny_model_dir, process_engine):
    threaded = AsyncEngine.from_config(make_engine_config(str(tiny_model_dir), **ENGINE_KW))
    try:
        want = run(every_output(threaded, "t"))
    finally:
        threaded.shutdown()
    got = run(every_output(process_engine, "p"))
    for w, g in zip(want, got):
        final_w, final_g = w[-1], g[-1]
        assert final_g.finished and final_g.prompt_token_ids == final_w.prompt_token_ids
        for cw, cg in zip(final_w.outputs, final_g.outputs, strict=True):
            assert (cg.index, cg.text, cg.token_ids, cg.finish_reason) == (cw.index, cw.text, cw.token_ids,
                                                                           cw.finish_reason)
            # the two engines batch the requests differently, so logprobs agree to float rounding, not bit for bit
            assert (cg.logprobs is None) == (cw.logprobs is None)
            for lg, lw in zip(cg.logprobs or [], cw.logprobs or [], strict=True):
                assert {t: (p.rank, p.decoded_token) for t, p in lg.items()} == \
                    {t: (p.rank, p.decoded_token) for t, p in lw.items()}
                assert all(abs(lg[t].logprob - lw[t].logprob) < 1e-4 for t in lg)
        # streamed: every output cumulative and growing, the text of each a prefix of the next
        for a, b in zip(g, g[1:]):
            assert all(b.outputs[i].text.startswith(a.outputs[i].text) for i in range(len(a.outputs)))
    assert process_engine.max_model_len == 256 and process_engine.tokenizer.decode([5]) == "<5>"


def test_progress_false_gives_only_the_final_output(process_engine):
    outs = run(collect(process_engine, [5, 6], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                       "quiet", progress=False))
    assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == 10


def test_abort_frees_the_request_and_metrics_arrive(process_engine):
    recorder = Recorder()
    process_engine.attach_observer(recorder)

    async def stop_after(n):
        got = 0
        async for out in process_engine.generate([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=200,
                                                                           ignore_eos=True), "to-abort"):
            got += 1
            if got == n:
                return out  # leaving the loop aborts the request

    out = run(stop_after(3))
    assert not out.finished
    deadline = time.monotonic() + 10
    while not (recorder.finished and recorder.steps[-1].num_running == 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert recorder.finished and recorder.finished[-1].finish_reason == "abort"
    last = recorder.steps[-1]
    assert (last.num_running, last.num_waiting, last.kv_cache_usage) == (0, 0, 0.0)
    assert recorder.first_tokens == 1 and recorder.inter_tokens >= 2
    # the same id may be used again once its request is gone
    outs = run(collect(process_engine, [5], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                       "to-abort"))
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3


def test_bad_requests_fail_before_reaching_the_engine(process_engine):
    with pytest.raises(ValueError, match="out of range"):
        run(collect(process_engine, [10**9], SamplingParams(max_tokens=2), "bad-token"))
    with pytest.raises(ValueError, match="maximum context length"):
        run(collect(process_engine, [5] * 300, SamplingParams(max_tokens=2), "too-long"))
    assert process_engine.is_healthy()


def test_start_up_errors_come_back_as_they_were_raised(tmp_path):
    with pytest.raises(FileNotFoundError):
        AsyncEngine.from_config(make_engine_config(str(tmp_path / "missing.gguf"), device="cpu"),
                                engine_process=True)


def test_an_engine_process_that_dies_before_it_is_ready_is_an_error_not_a_hang(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    # A child killed before it can report (the OOM killer, a crash in a native library) sends nothing: the server
    # must raise with the exit code. The spawned interpreter imports sitecustomize first, which exits here.
    (tmp_path / "sitecustomize.py").write_text("import os\nos._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited \(code 3\) before it was ready"):
        AsyncEngine.from_config(make_engine_config(str(tiny_model_dir), **ENGINE_KW), engine_process=True)
    assert time.monotonic() - start < 60


def test_a_dead_engine_process_fails_requests_and_health(tiny_model_dir):
    engine = AsyncEngine.from_config(make_engine_config(str(tiny_model_dir), **ENGINE_KW), engine_process=True)
    try:
        process = engine.core._process

        async def kill_mid_stream():
            async for _ in engine.generate([5, 6], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
                                           "victim"):
                os.kill(process.pid, signal.SIGKILL)

        with pytest.raises(RuntimeError, match="engine"):
            run(asyncio.wait_for(kill_mid_stream(), timeout=30))
        assert not engine.is_healthy()
        with pytest.raises(RuntimeError, match="stopped"):
            run(collect(engine, [5], SamplingParams(max_tokens=2), "after"))
    finally:
        engine.shutdown()


def test_shutdown_stops_the_engine_process(tiny_model_dir):
    engine = AsyncEngine.from_config(make_engine_config(str(tiny_model_dir), **ENGINE_KW), engine_process=True)
    process = engine.core._process
    assert process.is_alive()
    engine.shutdown()
    assert not process.is_alive() and process.exitcode == 0
    assert not engine.is_healthy()
    engine.shutdown()  # twice is fine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_in_a_spawned_process(tiny_model_dir):
    """CUDA initialised only in the spawned engine process; greedy outputs as on a thread of this one."""
    kw = {**ENGINE_KW, "device": "cuda", "num_blocks": 512}  # not a share of free memory: both engines coexist
    greedy = [r for r in REQUESTS if r[1].temperature == 0.0]

    async def outputs(engine, tag):
        outs = await asyncio.gather(*[collect(engine, p, sp, f"{tag}{i}") for i, (p, sp) in enumerate(greedy)])
        return [o[-1].outputs for o in outs]

    engines = [AsyncEngine.from_config(make_engine_config(str(tiny_model_dir), **kw), engine_process=flag)
               for flag in (False, True)]
    try:
        want, got = (run(outputs(e, f"e{i}")) for i, e in enumerate(engines))
    finally:
        for e in engines:
            e.shutdown()
    assert got == want


def test_a_failing_observer_fails_requests_instead_of_hanging_them(tiny_model_dir):
    """The server side replays each step's events into its observers; one that raises must not leave requests
    waiting for outputs that will never be read (as with the engine on a thread, the engine counts as failed)."""

    class Broken(Recorder):
        def on_first_token(self, ttft_s):
            raise RuntimeError("observer bug")

    engine = AsyncEngine.from_config(make_engine_config(str(tiny_model_dir), **ENGINE_KW), engine_process=True)
    try:
        engine.attach_observer(Broken())
        with pytest.raises(RuntimeError, match="observer bug"):
            run(asyncio.wait_for(collect(engine, [5, 6], SamplingParams(max_tokens=50, ignore_eos=True), "r"), 30))
        assert not engine.is_healthy()
    finally:
        engine.shutdown()


def test_one_engine_process_serves_several_front_ends(tiny_model_dir):
    """Each front-end gets the outputs of its own requests and every observer event; one that hangs up has its
    requests aborted while the engine goes on serving the others."""
    from tokenmill.engine.async_engine import ObserverFanout
    from tokenmill.engine.engine_process import PipeCore

    first = AsyncEngine.from_config(make_engine_config(str(tiny_model_dir), **ENGINE_KW), engine_process=True,
                                    front_ends=2)
    try:
        fanout = ObserverFanout()
        second = AsyncEngine(PipeCore.attach(first.core.front_end_conns[0], fanout), fanout)
        seen_first, seen_second = Recorder(), Recorder()
        first.attach_observer(seen_first)
        second.attach_observer(seen_second)
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

        async def both():
            return await asyncio.gather(collect(first, [5, 6, 7], params, "a"), collect(second, [5, 6, 7], params, "b"),
                                        collect(second, [8, 9], params, "c"))

        a, b, c = run(both())
        assert a[-1].finished and b[-1].finished and c[-1].finished
        assert a[-1].outputs[0].token_ids == b[-1].outputs[0].token_ids and len(c[-1].outputs[0].token_ids) == 12
        assert {o.request_id for o in a} == {"a"} and {o.request_id for o in b + c} == {"b", "c"}
        deadline = time.monotonic() + 10
        while len(seen_first.finished) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        for seen in (seen_first, seen_second):  # both saw all three requests' events
            assert len(seen.finished) == 3 and seen.first_tokens == 3 and seen.inter_tokens == 33

        async def hang_up_mid_stream():
            async for out in second.generate([5, 6], SamplingParams(temperature=0.0, max_tokens=200,
                                                                    ignore_eos=True), "long"):
                if len(out.outputs[0].token_ids) >= 3:
                    second.core.shutdown()  # the pipe closes with "long" running (so its abort never gets out)
                    break

        run(hang_up_mid_stream())
        outs = run(collect(first, [5], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), "after"))
        assert outs[-1].finished
        deadline = time.monotonic() + 10
        while len(seen_first.finished) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        # "long" ended as aborted (run on, it would have finished by length), and nothing is left running
        assert sorted(f.finish_reason for f in seen_first.finished) == ["abort"] + ["length"] * 4
        assert seen_first.steps[-1].num_running == 0 and first.is_healthy()
    finally:
        first.shutdown()
