"""A real `tokenmill` server (SmolLM2 from the GGUF) on loopback, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.llm import make_engine_config
from tokenmill.serve.testing import start_server

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(smollm2_path):
    config = make_engine_config(str(smollm2_path), max_model_len=1024, dtype="float32", device="cpu",
                                max_num_seqs=16, max_num_batched_tokens=256, block_size=16,
                                served_model_name="smollm2")
    engine = AsyncEngine.from_config(config, engine_process=True)  # as `tokenmill serve` runs it
    srv = start_server(engine, api_key=API_KEY)
    yield srv, engine
    srv.stop()
    engine.shutdown()


@pytest.fixture()
def client(server):
    srv, _ = server
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def assert_no_leaks(srv, timeout: float = 10.0) -> None:
    """Through the server's own gauges (the engine is in another process): nothing running or waiting, and every
    KV block free or only cached."""
    wanted = ("tokenmill:num_requests_running", "tokenmill:num_requests_waiting", "tokenmill:kv_cache_usage_perc")
    deadline = time.monotonic() + timeout
    while True:
        gauges = {}
        for line in httpx.get(srv.url + "/metrics").text.splitlines():
            name = line.split("{", 1)[0]
            if name in wanted:
                gauges[name] = float(line.rsplit(" ", 1)[1])
        if len(gauges) == len(wanted) and not any(gauges.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still held after every request ended: {gauges}")
        time.sleep(0.05)


def chat_messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_non_streaming_and_cached_tokens(client, server):
    msgs = [{"role": "system", "content": "You are a terse assistant. " * 8}, *chat_messages("Name a colour.")]
    first = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
    again = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage.completion_tokens <= 12
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert_no_leaks(server[0])


def test_chat_streaming_matches_non_streaming(client):
    kwargs = dict(model="smollm2", messages=chat_messages("Say hello to Paris."), max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])


def test_completions_streaming_and_content_parts(client):
    stream = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=10,
                                       temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream)
    whole = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert text == whole.choices[0].text and len(text) > 0
    parts = client.chat.completions.create(
        model="smollm2", max_completion_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello"}, {"type": "text", "text": "to Paris."}]}])
    # text parts are joined with a newline, as vLLM does
    plain = client.chat.completions.create(model="smollm2", max_completion_tokens=8, temperature=0,
                                           messages=chat_messages("Say hello\nto Paris."))
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_concurrent_requests_get_their_own_tokens(client):
    prompts = [f"List three facts about the number {i}." for i in range(6)]
    alone = [client.completions.create(model="smollm2", prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in prompts]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = client.completions.create(model="smollm2", prompt=prompts[i], max_tokens=12,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == alone


def test_logprobs_and_n(client):
    out = client.chat.completions.create(model="smollm2", messages=chat_messages("Hi"), max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-4)
    many = client.completions.create(model="smollm2", prompt="Colours:", max_tokens=6, n=3, temperature=1.0, seed=3)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]


def test_bad_inputs_get_openai_errors_and_server_survives(server, client):
    srv, _ = server
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url = srv.url + "/v1/chat/completions"
    cases = [
        (b"{not json", 400),
        (json.dumps({"model": "smollm2", "messages": "hi"}).encode(), 400),
        (json.dumps({"model": "smollm2", "messages": []}).encode(), 400),
        (json.dumps({"model": "smollm2", "messages": chat_messages("x"), "max_tokens": -5}).encode(), 400),
        (json.dumps({"model": "smollm2", "messages": chat_messages("x"), "max_tokens": 10**9}).encode(), 400),
        (json.dumps({"model": "smollm2", "messages": chat_messages("word " * 2000)}).encode(), 400),
        (json.dumps({"model": "nope", "messages": chat_messages("x")}).encode(), 404),
        (b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ]
    for body, status in cases:
        r = httpx.post(url, content=body, headers=headers, timeout=30)
        assert r.status_code == status, (body[:60], r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
    r = httpx.post(url, json={"model": "smollm2", "messages": chat_messages("x")},
                   headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", headers=headers, timeout=30,
                   json={"model": "smollm2", "prompt": [1, 2, 10**7], "max_tokens": 2})
    assert r.status_code == 400
    ok = client.chat.completions.create(model="smollm2", messages=chat_messages("Still there?"), max_tokens=4)
    assert ok.choices[0].message.content is not None
    assert_no_leaks(srv)


def test_client_disconnect_aborts_and_frees_blocks(server):
    srv, _ = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "smollm2", "prompt": "Write a very long story about a dragon.", "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break  # leave mid-stream
    assert_no_leaks(srv, timeout=20)


def test_models_metrics_tokenize(server):
    srv, _ = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    models = httpx.get(srv.url + "/v1/models", headers=headers).json()
    assert models["data"][0]["id"] == "smollm2"
    tok = httpx.post(srv.url + "/tokenize", headers=headers, json={"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    detok = httpx.post(srv.url + "/detokenize", headers=headers, json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"] == "Hello world"
    metrics = httpx.get(srv.url + "/metrics").text
    for name in ("tokenmill:time_to_first_token_seconds", "tokenmill:e2e_request_latency_seconds",
                 "tokenmill:num_requests_running", "tokenmill:kv_cache_usage_perc",
                 "tokenmill:prefix_cache_queries_total", "tokenmill:prefix_cache_hits_total",
                 "tokenmill:num_preemptions_total", "tokenmill:corrupted_requests_total"):
        assert name in metrics
    hits = [line for line in metrics.splitlines() if line.startswith("tokenmill:prefix_cache_hits_total")]
    assert hits


def test_bench_serve_replays_a_chat_workload_against_tokenmill(server, tmp_path):
    """Issue 3's smoke run: the replay client against a real tokenmill server on loopback."""
    from tokenmill.bench.serve_client import main as bench_serve_main

    srv, _ = server
    out = tmp_path / "results.json"
    rc = bench_serve_main(["serve", "--base-url", srv.url, "--api-key", API_KEY, "--workload", "chat,scale=0.1",
                           "--num-sessions", "2", "--seed", "1", "--time-scale", "0.01", "--max-context", "1024",
                           "--no-progress", "--output", str(out)])
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    summary = run["summary"]
    assert summary["num_requests"] >= 2 and summary["num_failed"] == 0
    assert summary["output_length_match"] == 1.0  # ignore_eos/min_tokens honoured
    if summary["num_requests"] > 2:  # later turns carry the conversation, so the prefix cache must have hit
        assert summary["cached_tokens"] > 0
    assert all(r["ttft_s"] > 0 for r in run["requests"] if r.get("ok", True))
    assert_no_leaks(srv)
