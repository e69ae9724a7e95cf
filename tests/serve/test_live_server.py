"""A real uvicorn server on loopback: client disconnects abort engine requests; the official openai client works."""

import time

import httpx
import openai
import pytest
from conftest import sse_events
from serve_fakes import FakeEngine

from tokenmill.serve.app import build_app
from tokenmill.serve.testing import ServerThread, start_server


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "hi"}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
def test_disconnect_mid_stream_aborts(live_server, engine, path, body):
    engine.token_delay = 0.05  # 100 tokens would take 5 s
    with httpx.Client(base_url=live_server.url, timeout=10) as c:
        with c.stream("POST", path, json={**body, "max_tokens": 100, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = 0
            for line in lines:
                if line.startswith("data: "):
                    received += 1
                    if received == 3:
                        break
        # leaving the block closes the connection mid-stream
    assert wait_for(lambda: len(engine.aborted) == 1), "the engine never saw abort()"
    [call] = engine.calls
    assert engine.aborted == [call.request_id] and engine.finished == []
    engine.token_delay = 0.0
    ok = httpx.post(live_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "he"


def test_disconnect_while_waiting_non_streaming_aborts(live_server, engine):
    engine.token_delay = 0.05
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 100}, timeout=0.5)
    assert wait_for(lambda: len(engine.aborted) == 2), "the engine never saw abort()"
    assert sorted(engine.aborted) == sorted(c.request_id for c in engine.calls) and engine.finished == []


def test_stream_over_real_http(live_server):
    r = httpx.post(live_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True})
    events = sse_events(r.text)
    assert "".join(ev["choices"][0]["text"] for ev in events[:-1]) == "hell" and events[-1] == "[DONE]"


def test_openai_client():
    engine = FakeEngine()
    with start_server(engine, api_key="sesame") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0, timeout=10)
        assert [m.id for m in client.models.list()] == ["fake-model"]

        comp = client.completions.create(model="fake-model", prompt="hi", max_tokens=5, logprobs=1)
        assert comp.choices[0].text == "hello" and comp.choices[0].finish_reason == "length"
        assert comp.usage.completion_tokens == 5 and comp.choices[0].logprobs.tokens == list("hello")

        chat = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                              max_completion_tokens=4, n=2)
        assert [c.message.content for c in chat.choices] == ["hell", "lo w"]
        assert chat.usage.prompt_tokens_details.cached_tokens == 0

        stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, stream=True, stream_options={"include_usage": True},
                                                logprobs=True, top_logprobs=1)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello "
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 6

        text = "".join(c.choices[0].text for c in client.completions.create(
            model="fake-model", prompt="hi", max_tokens=3, stream=True))
        assert text == "hel"

        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="fake-model", prompt="hi", max_tokens=10_000)
        assert "maximum context length" in e.value.message
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_server_thread_stops_and_frees_its_port():
    server = ServerThread(build_app(FakeEngine())).start()
    url = server.url
    assert httpx.get(url + "/health").status_code == 200
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=1)


def test_concurrent_mix_of_finished_and_abandoned_requests_leaks_nothing():
    import asyncio

    engine = FakeEngine(token_delay=0.01, max_model_len=1024)

    async def one(c: httpx.AsyncClient, i: int):
        body = {"prompt": ["a", "b"] if i % 3 == 0 else "hi", "n": 1 + i % 2, "stream": i % 2 == 0,
                "max_tokens": 1000 if i % 4 == 0 else 20}
        # Abandoned: the client gives up long before 1000 tokens (10 s), so that a loaded machine's late disconnect
        # still finds them running (with 300 tokens, 3 s, all had finished once, under a parallel test run).
        if i % 4 == 0:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.post("/v1/completions", json=body), 0.5)
            return "abandoned"
        r = await c.post("/v1/completions", json=body)
        return r.status_code

    async def run_all(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            return await asyncio.gather(*(one(c, i) for i in range(24)))

    with start_server(engine) as server:
        results = asyncio.run(run_all(server.url))
        assert results.count("abandoned") == 6 and results.count(200) == 18
        ids = [call.request_id for call in engine.calls]
        assert wait_for(lambda: all(r in engine.finished or r in engine.aborted for r in ids), timeout=15.0)
        assert len(engine.aborted) == 8  # 6 abandoned requests, 2 of them with two prompts
