import json
import socket

import pytest

from tokenmill.bench.metrics import summarize_run
from tokenmill.bench.plan import (
    PlannedSession,
    PlannedTurn,
    ReplayPlan,
    plan_from_sessions,
    plan_from_trace,
)
from tokenmill.bench.serve_client import ClientConfig, main, replay
from tokenmill.bench.slo import evaluate_slo, parse_slo
from tokenmill.workload.sessions import generate_sessions, parse_workload_spec
from tokenmill.workload.text import PromptSynthesizer
from tokenmill.workload.traces import Trace, TraceRequest, write_trace


def cfg(url, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("stall_timeout_s", 5.0)
    kw.setdefault("request_timeout_s", 10.0)
    return ClientConfig(base_url=url, **kw)


def session(sid, texts, outputs=4, gaps=None, arrival=0.0, system="sys prompt words"):
    gaps = gaps or [0.0] * len(texts)
    turns = [PlannedTurn(text=t, output_tokens=outputs, input_tokens=len(t.split()), gap_s=g)
             for t, g in zip(texts, gaps)]
    return PlannedSession(sid, "test", arrival, turns, system_text=system)


def test_metrics_of_one_streamed_request(server):
    server.state.first_token_delay = 0.2
    server.state.token_delay = 0.03
    run = replay(ReplayPlan([session(0, [" hello there friend"], outputs=10)]), cfg(server.url))
    (r,) = run.requests
    assert r.ok, r.error
    assert 0.2 <= r.ttft_s < 0.2 + 1.0  # upper bounds leave room for a stalled CI machine
    assert len(r.itl_s) == 9 and all(x >= 0.02 for x in r.itl_s)
    assert 0.025 <= sum(r.itl_s) / 9 < 0.2
    assert r.output_tokens == 10 and r.output_chunks == 10
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 9)
    assert r.e2e_s >= r.ttft_s + sum(r.itl_s) - 1e-6
    assert r.prompt_tokens == len(["system", "sys", "prompt", "words", "user", "hello", "there", "friend"])
    assert r.cached_tokens == 0
    s = summarize_run(run)
    assert s.num_ok == 1 and s.ttft.p50 == pytest.approx(r.ttft_s) and s.itl.count == 9
    assert s.output_length_match == 1.0
    _, path, body = server.state.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "fake-model" and body["max_tokens"] == 10 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == 10


def test_turns_are_closed_loop_and_carry_the_conversation(server):
    plan = ReplayPlan([session(0, [" first question", " second question", " third"], outputs=3, gaps=[0, 2.0, 2.0])])
    run = replay(plan, cfg(server.url, time_scale=0.1))
    assert [r.ok for r in run.requests] == [True, True, True]
    reqs, fins = server.state.requests, server.state.finished
    assert len(reqs) == 3
    for k in (1, 2):  # sent after the previous answer plus 2.0 s * 0.1
        assert reqs[k][0] >= fins[k - 1][0] + 0.2 - 0.02
    msgs = reqs[2][2]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"] == " first question" and msgs[2]["content"] == " ans0 ans1 ans2"
    assert msgs[5]["content"] == " third"
    # The fake server reports cached tokens for the repeated conversation prefix.
    # Prompts of 7, 14 and 20 words; each shares the previous one whole; blocks of 4 words.
    assert [r.cached_tokens for r in run.requests] == [0, 4, 12]
    assert [r.prompt_tokens for r in run.requests] == [7, 14, 20]
    assert summarize_run(run).cache_hit_ratio == pytest.approx(16 / 41)


def test_session_arrivals_are_open_loop(server):
    # Answers take 1.5 s, sessions arrive 0.15 s apart: an open-loop client sends all four before the first answer
    # ends. The bounds leave room for a stalled machine (CI once saw one 0.8 s pause), not for serialization.
    server.state.first_token_delay = 1.5
    plan = ReplayPlan([session(i, [f" s{i}"], arrival=0.15 * i) for i in range(4)])
    run = replay(plan, cfg(server.url))
    assert all(r.ok for r in run.requests)
    arrivals = sorted(t for t, _, _ in server.state.requests)
    first_answer_done = min(t for t, _ in server.state.finished)
    assert arrivals[-1] < first_answer_done, (arrivals, first_answer_done)
    offsets = [t - arrivals[0] for t in arrivals]
    assert all(off >= 0.15 * i - 0.03 for i, off in enumerate(offsets)), offsets  # none sent before its time
    assert run.duration_s < 0.15 * 3 + 1.5 + 1.0


def test_gaps_are_capped(server):
    plan = ReplayPlan([session(0, [" a", " b"], outputs=2, gaps=[0, 3600.0])])
    run = replay(plan, cfg(server.url, max_gap_s=0.05))
    assert run.clipped_gaps == 1 and run.duration_s < 2


def test_completions_api_with_trace_prompts(server, toy_tokenizer):
    trace = Trace(
        [
            TraceRequest(0.0, 40, 3, [1, 2, 3]),
            TraceRequest(0.1, 48, 3, [1, 2, 4]),
            TraceRequest(0.2, 20, 3, [7, 8]),
        ],
        block_size=16,
    )
    plan = plan_from_trace(trace, PromptSynthesizer(toy_tokenizer), time_factor=1.0)
    assert plan.num_requests == 3 and not plan.sessions[0].carry_history
    run = replay(plan, cfg(server.url, api="completions"))
    assert all(r.ok for r in run.requests)
    bodies = {len(b["prompt"].split()): b for _, _, b in server.state.requests}
    assert set(bodies) == {40, 48, 20}  # one word per token
    assert bodies[48]["prompt"].split()[:32] == bodies[40]["prompt"].split()[:32]
    assert bodies[48]["prompt"].split()[32] != bodies[40]["prompt"].split()[32]
    cached = {r.expected_input_tokens: r.cached_tokens for r in run.requests}
    assert cached[48] == 32 and cached[20] == 0


def test_trace_sessions_wait_for_parents(server, toy_tokenizer):
    server.state.first_token_delay = 0.3
    trace = Trace(
        [
            TraceRequest(0.0, 16, 2, [1], chat_id=0, parent_chat_id=-1, turn=1),
            TraceRequest(0.05, 32, 2, [1, 2], chat_id=1, parent_chat_id=0, turn=2),
        ],
        block_size=16,
    )
    plan = plan_from_trace(trace, PromptSynthesizer(toy_tokenizer))
    assert len(plan.sessions) == 1 and len(plan.sessions[0].turns) == 2
    run = replay(plan, cfg(server.url, api="completions"))
    assert all(r.ok for r in run.requests)
    (_, _, _), (t2, _, _) = server.state.requests
    assert t2 >= server.state.finished[0][0] - 0.01  # closed loop: after the parent's answer, not at 0.05 s


def marker_behaviour(index, body):
    text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
    for word in ("error500", "stall", "disconnect", "error_event", "no_usage", "plain_json"):
        if word in text:
            return word
    return "ok"


def test_server_failures_become_failed_requests(server):
    server.state.behaviour = marker_behaviour
    plan = ReplayPlan(
        [
            session(0, [" error500"]),
            session(1, [" stall"]),
            session(2, [" disconnect"], outputs=6),
            session(3, [" error_event"], outputs=6),
            session(4, [" fine"]),
            session(5, [" no_usage"], outputs=5),
            session(6, [" error500", " never sent", " nor this"]),
            session(7, [" plain_json"]),
        ]
    )
    run = replay(plan, cfg(server.url, stall_timeout_s=0.5))
    by_session = {r.session_id: r for r in run.requests}
    assert len(run.requests) == 8
    assert by_session[7].error.startswith("bad_stream")
    assert by_session[0].error.startswith("http_500") and by_session[0].status_code == 500
    assert by_session[1].error.startswith("stall")
    assert by_session[2].error.startswith("disconnected") and by_session[2].output_chunks == 3
    assert by_session[3].error.startswith("stream_error")
    assert by_session[4].ok and by_session[5].ok
    assert by_session[5].output_tokens == 5 and by_session[5].prompt_tokens is None
    assert not by_session[6].ok and run.abandoned_turns == 2
    s = summarize_run(run)
    assert (s.num_ok, s.num_failed, s.num_abandoned) == (2, 6, 2)
    assert s.errors == {"http_500": 2, "stall": 1, "disconnected": 1, "stream_error": 1, "bad_stream": 1}
    report = evaluate_slo(run, parse_slo("ttft_p50=5s"))
    assert report.attainment == pytest.approx(2 / 8) and not report.all_ok


def test_whole_request_timeout(server):
    server.state.token_delay = 0.2
    run = replay(ReplayPlan([session(0, [" slow"], outputs=20)]), cfg(server.url, request_timeout_s=0.6))
    (r,) = run.requests
    assert not r.ok and r.error.startswith("timeout") and r.ttft_s is not None


def test_unreachable_server_fails_requests_not_the_client():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    run = replay(ReplayPlan([session(0, [" a"]), session(1, [" b"])]), cfg(url, model="m", connect_timeout_s=1))
    assert [r.ok for r in run.requests] == [False, False]
    assert all(r.error.startswith("connection") for r in run.requests)
    with pytest.raises(ValueError, match="pass --model"):
        replay(ReplayPlan([session(0, [" a"])]), cfg(url, connect_timeout_s=1))


def test_generated_workload_replay(server, toy_tokenizer):
    sessions = generate_sessions(parse_workload_spec("mix:chat=1,tool_agent=1,sessions=4,scale=0.02,rate=20,seed=3"))
    plan = plan_from_sessions(sessions, PromptSynthesizer(toy_tokenizer, seed=3))
    run = replay(plan, cfg(server.url, time_scale=0.001, max_gap_s=0.05))
    assert len(run.requests) == plan.num_requests == sum(len(s.turns) for s in sessions)
    assert all(r.ok for r in run.requests)
    for r in run.requests:
        turn = sessions[r.session_id].turns[r.turn]
        assert r.expected_output_tokens == r.output_tokens == turn.output_tokens
        assert r.expected_input_tokens == turn.input_tokens


def test_cli_serve_single_run_and_sweep(server, toy_tokenizer_file, tmp_path):
    out = tmp_path / "results.json"
    rc = main([
        "serve", "--base-url", server.url, "--workload", "chat,scale=0.02", "--num-sessions", "3", "--seed", "1",
        "--tokenizer", str(toy_tokenizer_file), "--time-scale", "0.001", "--max-gap", "0.05", "--slo", "ttft_p90=2s,tpot_p90=500ms",
        "--output", str(out), "--plot-dir", str(tmp_path / "plots"), "--no-progress",
    ])
    assert rc == 0
    data = json.loads(out.read_text())
    run = data["runs"][0]
    assert data["model"] == "fake-model" and data["api"] == "chat"
    assert run["summary"]["num_ok"] == len(run["requests"]) > 0
    assert run["slo"]["all_ok"] is True and run["slo"]["attainment"] == 1.0
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 1000

    out2 = tmp_path / "sweep.json"
    rc = main([
        "serve", "--base-url", server.url, "--workload", "batch_summarization,scale=0.01", "--num-sessions", "3",
        "--tokenizer", str(toy_tokenizer_file), "--sweep-rates", "5,20", "--slo", "ttft_p90=2s",
        "--output", str(out2), "--plot-dir", str(tmp_path / "plots"), "--no-progress",
    ])
    assert rc == 0
    data = json.loads(out2.read_text())
    assert [r["rate"] for r in data["runs"]] == [5, 20] and data["max_sustainable_rate"] == 20
    assert (tmp_path / "plots" / "goodput_vs_rate.png").stat().st_size > 1000


def test_cli_serve_from_several_client_processes(server, toy_tokenizer_file, tmp_path):
    # The same plan (same seed) replayed from one process and from three: the same requests, every one answered,
    # merged into one run; each process plans for itself, so the prompts match too.
    runs = {}
    for procs in (1, 3):
        server.state.reset()
        out = tmp_path / f"p{procs}.json"
        rc = main(["serve", "--base-url", server.url, "--workload", "chat,scale=0.02", "--num-sessions", "5",
                   "--seed", "3", "--tokenizer", str(toy_tokenizer_file), "--time-scale", "0.001", "--max-gap", "0.05",
                   "--max-concurrency", "4", "--client-processes", str(procs), "--output", str(out), "--no-progress"])
        assert rc == 0
        runs[procs] = json.loads(out.read_text())["runs"][0]
        runs[procs]["prompts"] = sorted(json.dumps(b, sort_keys=True) for _, _, b in server.state.requests)
    one, three = runs[1], runs[3]
    assert three["summary"]["num_ok"] == one["summary"]["num_ok"] == len(one["requests"]) > 5
    assert sorted((r["session_id"], r["turn"]) for r in three["requests"]) == \
        sorted((r["session_id"], r["turn"]) for r in one["requests"])
    assert three["prompts"] == one["prompts"]
    with pytest.raises(SystemExit):
        main(["serve", "--base-url", server.url, "--workload", "chat", "--tokenizer", str(toy_tokenizer_file),
              "--client-processes", "0", "--no-progress"])


def test_a_failing_client_process_fails_the_run_instead_of_hanging(server, tmp_path):
    # Every process fails to plan (no tokenizer there): the barrier breaks, each reports, the run raises.
    import argparse

    from tokenmill.bench.serve_client import replay_in_processes

    args = argparse.Namespace(workload="chat,scale=0.02", num_sessions=4, seed=0, rate=None, length_scale=1.0,
                              max_context=None)
    with pytest.raises(ValueError, match="a client process failed: ValueError: no tokenizer from"):
        replay_in_processes(args, str(tmp_path / "missing"), None, cfg(server.url, model="fake-model"), "x", 2)


def test_cli_trace_commands(server, toy_tokenizer_file, tmp_path, capsys):
    trace = Trace([TraceRequest(0.1 * i, 600 + 10 * i, 3, [0, 100 + i]) for i in range(4)], block_size=512)
    path = tmp_path / "t.jsonl"
    write_trace(trace, path, "mooncake")
    out = tmp_path / "r.json"
    rc = main(["serve", "--base-url", server.url, "--trace", str(path), "--tokenizer", str(toy_tokenizer_file),
               "--rate", "40", "--output", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["api"] == "completions" and data["runs"][0]["summary"]["num_ok"] == 4
    prompts = [b["prompt"].split() for _, _, b in server.state.requests]
    assert all(p[:512] == prompts[0][:512] for p in prompts)

    capsys.readouterr()
    assert main(["trace-summary", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_requests"] == 4 and summary["prefix_reuse_ratio"] > 0.5
    qwen = tmp_path / "t.qwen.jsonl"
    assert main(["convert-trace", str(path), str(qwen), "--to", "qwen"]) == 0
    assert json.loads(qwen.read_text().splitlines()[0])["parent_chat_id"] == -1
    gen = tmp_path / "gen.jsonl"
    assert main(["generate-trace", "--workload", "chat", "--num-sessions", "5", "--output", str(gen)]) == 0
    assert len(gen.read_text().splitlines()) >= 5
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["serve", "--base-url", server.url, "--workload", "nonsense", "--tokenizer", str(toy_tokenizer_file)])


def test_sse_lines_break_only_where_server_sent_events_do():
    import asyncio

    from tokenmill.bench.serve_client import sse_lines

    async def chunks():
        for piece in ['data: {"t": "a\u2028b\x85c"}\r', '\ndata: [DO', 'NE]\n\n', "data: x\ry"]:
            yield piece

    async def collect():
        return [line async for line in sse_lines(chunks())]

    lines = [line for line in asyncio.run(collect()) if line]
    assert lines == ['data: {"t": "a\u2028b\x85c"}', "data: [DONE]", "data: x", "y"]
    assert json.loads(lines[0][5:]) == {"t": "a\u2028b\x85c"}
