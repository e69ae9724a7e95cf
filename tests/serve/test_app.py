"""The HTTP routes over a fake engine, in-process through httpx's ASGI transport."""

import httpx
import pytest
from conftest import assert_openai_error, sse_events
from serve_fakes import BOS, FakeEngine, FakeTokenizer

from tokenmill.serve.app import build_app

CHAT = [{"role": "user", "content": "hi"}]


def choice_texts(events, key="text"):
    """Concatenated streamed text per choice index, and the finish_reason each choice ended with."""
    texts, finishes = {}, {}
    for ev in events:
        if ev == "[DONE]":
            continue
        for c in ev["choices"]:
            piece = c[key] if key == "text" else c["delta"].get("content", "")
            texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
            if c["finish_reason"] is not None:
                assert c["index"] not in finishes, "finish_reason sent twice"
                finishes[c["index"]] = c["finish_reason"]
    return texts, finishes


# ---------------------------------------------------------------------------------------------------- completions


async def test_completion(client, engine):
    r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 5,
                                                   "temperature": 0.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "fake-model" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice == {"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length", "stop_reason": None}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    call = engine.calls[0]
    assert call.prompt_token_ids == [BOS] + FakeTokenizer().encode("hi", add_special_tokens=False)
    assert call.params.max_tokens == 5 and call.params.temperature == 0.0


async def test_only_streaming_responses_ask_the_engine_for_progress(client, engine):
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        for stream in (False, True):
            r = await client.post(path, json={**body, "max_tokens": 3, "stream": stream})
            assert r.status_code == 200, r.text
            assert engine.calls[-1].progress is stream


async def test_completion_default_max_tokens_is_16(client, engine):
    r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.json()["usage"]["completion_tokens"] == 16
    assert engine.calls[0].params.max_tokens == 16


async def test_stop_and_extras_pass_through(client, engine):
    r = await client.post("/v1/completions", json={
        "prompt": "hi", "max_tokens": 20, "stop": ["wor"], "top_k": 3, "min_p": 0.05, "repetition_penalty": 1.1,
        "seed": 7, "ignore_eos": True, "stop_token_ids": [5], "min_tokens": 1})
    choice = r.json()["choices"][0]
    assert choice["text"] == "hello " and choice["finish_reason"] == "stop" and choice["stop_reason"] == "wor"
    p = engine.calls[0].params
    assert (p.stop, p.top_k, p.min_p, p.repetition_penalty, p.seed, p.ignore_eos, p.stop_token_ids, p.min_tokens) \
        == (["wor"], 3, 0.05, 1.1, 7, True, [5], 1)


async def test_null_fields_mean_their_defaults(client, engine):
    nulls = dict.fromkeys(["n", "stream", "presence_penalty", "frequency_penalty", "stop", "seed", "min_tokens",
                           "ignore_eos", "stream_options", "user", "logit_bias"])
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "echo": None, "logprobs": None,
                                                   "suffix": None, **nulls})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "he"
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "logprobs": None,
                                                        "top_logprobs": None, "tools": None, **nulls})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "he"
    assert all((c.params.n, c.params.presence_penalty, c.params.stop) == (1, 0.0, []) for c in engine.calls)
    assert_openai_error(await client.post("/v1/completions", json={"prompt": None}), 400)


async def test_plain_text_response_format_and_optional_tool_choice_are_accepted(client):
    for extra in ({"response_format": {"type": "text"}}, {"tool_choice": "auto"}, {"tool_choice": "none"}):
        r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, **extra})
        assert r.status_code == 200, (extra, r.text)


async def test_cached_tokens_in_usage(client):
    prompt = "a shared system prompt that is long enough"
    first = (await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})).json()
    second = (await client.post("/v1/completions", json={"prompt": prompt + " and more", "max_tokens": 2})).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (len(prompt) + 1) // 4 * 4  # the fake caches whole 4-token blocks of the shared prefix
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    usage = sse_events(r.text)[-2]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


async def test_n_and_multiple_prompts(client, engine):
    engine.token_delay = 0.001
    r = await client.post("/v1/completions", json={"prompt": ["ab", "cde", "f"], "n": 2, "max_tokens": 4})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for c in body["choices"]:
        assert c["text"] == "hello world "[3 * (c["index"] % 2):][:4]
    assert body["usage"]["prompt_tokens"] == 3 + 4 + 2
    assert body["usage"]["completion_tokens"] == 6 * 4
    # The three prompts ran as three engine requests, concurrently (all started before any finished).
    assert len({c.request_id for c in engine.calls}) == 3
    first_finish = next(i for i, (kind, _) in enumerate(engine.events) if kind == "finish")
    assert [kind for kind, _ in engine.events[:first_finish]] == ["start"] * 3
    body = (await client.post("/v1/completions", json={"prompt": [[BOS, 70], [BOS, 71, 72]], "max_tokens": 2})).json()
    assert [c["text"] for c in body["choices"]] == ["he", "he"]
    assert [c.prompt_token_ids for c in engine.calls[3:]] == [[BOS, 70], [BOS, 71, 72]]


async def test_streaming_completion_matches_non_streaming(client):
    req = {"prompt": ["x", "yz"], "n": 2, "max_tokens": 6}
    full = (await client.post("/v1/completions", json=req)).json()
    r = await client.post("/v1/completions", json={**req, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all(ev["usage"] is None for ev in events[:-1])  # no usage chunk unless asked
    texts, finishes = choice_texts(events)
    assert texts == {c["index"]: c["text"] for c in full["choices"]}
    assert finishes == {i: "length" for i in range(4)}
    ids = {ev["id"] for ev in events[:-1]}
    assert len(ids) == 1


async def test_streaming_usage_chunk(client):
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 3 and usage_chunk["usage"]["prompt_tokens"] == 3


async def test_completion_logprobs_shape(client):
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["h", "e", "l", "l"]
    assert lp["token_logprobs"] == [-0.25] * 4
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert all(len(top) == 3 and top[tok] == -0.25 for top, tok in zip(lp["top_logprobs"], lp["tokens"]))
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "logprobs": 2, "stream": True})
    streamed = [ev["choices"][0]["logprobs"] for ev in sse_events(r.text)[:-1]]
    assert [t for chunk in streamed for t in chunk["tokens"]] == lp["tokens"]
    assert [o for chunk in streamed for o in chunk["text_offset"]] == lp["text_offset"]


async def test_echo(client):
    r = await client.post("/v1/completions", json={"prompt": "Say: ", "max_tokens": 2, "echo": True})
    assert r.json()["choices"][0]["text"] == "Say: he"
    r = await client.post("/v1/completions", json={"prompt": "Say: ", "max_tokens": 2, "echo": True, "stream": True})
    assert choice_texts(sse_events(r.text))[0] == {0: "Say: he"}


# ----------------------------------------------------------------------------------------------------------- chat


async def test_chat_completion(client, engine):
    r = await client.post("/v1/chat/completions", json={"model": "fake-model", "messages": [
        {"role": "system", "content": "be nice"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 5})
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["choices"][0]["finish_reason"] == "length"
    prompt = FakeTokenizer().encode("system: be nice\nuser: hi\nassistant: ", add_special_tokens=False)
    assert engine.calls[0].prompt_token_ids == prompt
    assert body["usage"]["prompt_tokens"] == len(prompt)


async def test_chat_default_max_tokens_fills_the_context(client, engine):
    r = await client.post("/v1/chat/completions", json={"messages": CHAT})
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == engine.max_model_len


async def test_chat_streaming(client):
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 7, "n": 2, "stream": True,
                                                        "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    firsts = events[:2]
    assert [c["choices"][0]["delta"] for c in firsts] == [{"role": "assistant", "content": ""}] * 2
    assert all(ev["object"] == "chat.completion.chunk" for ev in events[:-1])
    assert all("role" not in c["delta"] for ev in events[2:-2] for c in ev["choices"])
    texts, finishes = choice_texts(events[:-2], key="delta")
    assert texts == {0: "hello w", 1: "lo worl"}
    assert finishes == {0: "length", 1: "length"}
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 14


async def test_chat_logprobs_shape(client):
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "logprobs": True,
                                                        "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["h", "e", "l"]
    for c in content:
        assert c["logprob"] == -0.25 and c["bytes"] == list(c["token"].encode())
        assert [t["logprob"] for t in c["top_logprobs"]] == [-0.25, -2.0]
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3})
    assert r.json()["choices"][0]["logprobs"] is None
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "logprobs": True,
                                                        "stream": True})
    streamed = [c for ev in sse_events(r.text)[1:-1] for ch in ev["choices"] for c in ch["logprobs"]["content"]]
    assert [c["token"] for c in streamed] == ["h", "e", "l"]
    assert all(c["top_logprobs"] == [] for c in streamed)


# ---------------------------------------------------------------------------------------------- the other routes


async def test_models_health_version(client, engine):
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in body["data"]] == [("fake-model", "model", 128)]
    assert (await client.get("/v1/models/fake-model")).json()["id"] == "fake-model"
    assert_openai_error(await client.get("/v1/models/other"), 404)
    assert (await client.get("/health")).status_code == 200
    engine.healthy = False
    assert_openai_error(await client.get("/health"), 503)
    assert (await client.get("/version")).json()["version"]


async def test_tokenize_detokenize(client):
    tok = FakeTokenizer()
    body = (await client.post("/tokenize", json={"prompt": "héllo"})).json()
    assert body == {"tokens": tok.encode("héllo"), "count": len(tok.encode("héllo")), "max_model_len": 128}
    body = (await client.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False})).json()
    assert body["tokens"] == tok.encode("hi", add_special_tokens=False)
    body = (await client.post("/tokenize", json={"messages": CHAT})).json()
    assert body["tokens"] == tok.encode("user: hi\nassistant: ", add_special_tokens=False)
    body = (await client.post("/detokenize", json={"tokens": tok.encode("héllo", add_special_tokens=False)})).json()
    assert body == {"prompt": "héllo"}
    assert_openai_error(await client.post("/detokenize", json={"tokens": [5, 10_000]}), 400)
    assert_openai_error(await client.post("/tokenize", json={"messages": []}), 400)
    assert_openai_error(await client.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404)


async def test_metrics_endpoint(client):
    await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("tokenmill:time_to_first_token_seconds_bucket", "tokenmill:inter_token_latency_seconds_bucket",
                 "tokenmill:e2e_request_latency_seconds_count", "tokenmill:num_requests_running",
                 "tokenmill:num_requests_waiting", "tokenmill:kv_cache_usage_perc",
                 "tokenmill:prefix_cache_queries_total", "tokenmill:prefix_cache_hits_total",
                 "tokenmill:num_preemptions_total", "tokenmill:corrupted_requests_total"):
        assert name in r.text, name
    assert 'tokenmill:prompt_tokens_total{model_name="fake-model"} 3.0' in r.text
    assert 'tokenmill:generation_tokens_total{model_name="fake-model"} 3.0' in r.text
    assert 'tokenmill:request_success_total{finished_reason="length",model_name="fake-model"} 1.0' in r.text


async def test_api_key():
    engine = FakeEngine()
    transport = httpx.ASGITransport(app=build_app(engine, api_key="sesame"))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        req = {"prompt": "hi", "max_tokens": 2}
        err = assert_openai_error(await c.post("/v1/completions", json=req), 401)
        assert err["code"] == "invalid_api_key"
        assert_openai_error(await c.post("/v1/completions", json=req, headers={"Authorization": "Bearer nope"}), 401)
        assert_openai_error(await c.post("/v1/completions", json=req, headers={"Authorization": "sesame"}), 401)
        assert_openai_error(await c.get("/v1/models"), 401)
        assert_openai_error(await c.post("/tokenize", json={"prompt": "x"}), 401)
        auth = {"Authorization": "Bearer sesame"}
        assert (await c.post("/v1/completions", json=req, headers=auth)).status_code == 200
        assert (await c.post("/tokenize", json={"prompt": "x"}, headers=auth)).status_code == 200
        for open_route in ("/health", "/metrics", "/version"):
            assert (await c.get(open_route)).status_code == 200
    assert len(engine.calls) == 1


# ------------------------------------------------------------------------------------------------------ bad input

LONG = "x" * 200
BAD_REQUESTS = [
    # (name, path, body (dict or raw bytes), status, param)
    ("malformed json", "/v1/completions", b'{"prompt": "hi", ', 400, None),
    ("invalid utf-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),
    ("not an object", "/v1/completions", b'["hi"]', 400, None),
    ("NaN literal", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, None),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("prompt wrong type", "/v1/completions", {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("token ids not ints", "/v1/completions", {"prompt": [1, 2.5]}, 400, "prompt"),
    ("temperature wrong type", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("max_tokens float", "/v1/completions", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    ("negative max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("zero max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("absurd max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ("prompt too long", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("token id out of range", "/v1/completions", {"prompt": [1, 259]}, 400, "prompt"),
    ("negative token id", "/v1/completions", {"prompt": [[1], [-1]]}, 400, "prompt"),
    ("empty token prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("n zero", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("n huge", "/v1/completions", {"prompt": "hi", "n": 10**30}, 400, "n"),  # once ran the server out of memory
    ("chat n over 128", "/v1/chat/completions", {"messages": CHAT, "n": 129}, 400, "n"),
    ("top_p zero", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("empty stop string", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("too many logprobs", "/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("stream_options without stream", "/v1/completions",
     {"prompt": "hi", "stream": False, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("logit_bias", "/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ("unknown model", "/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model"),
    ("json mode", "/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("json schema", "/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema"}}, 400,
     "response_format"),
    ("forced tool call", "/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("named tool call", "/v1/chat/completions",
     {"messages": CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
    ("template rejects", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400,
     "messages"),
    ("chat prompt too long", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("chat absurd max_tokens", "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 10**6}, 400,
     "max_tokens"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("chat unknown model", "/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, "model"),
    ("detokenize wrong type", "/detokenize", {"tokens": "abc"}, 400, "tokens"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_input_is_a_4xx_and_the_server_keeps_serving(client, engine, name, path, body, status, param,
                                                              stream):
    if isinstance(body, bytes):
        r = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = await client.post(path, json={"stream": stream, **body} if path.startswith("/v1") else body)
    err = assert_openai_error(r, status)
    if param is not None:
        assert (err["param"] or "").startswith(param), err
    if status == 404:
        assert err["code"] == "model_not_found"
    assert engine.calls == []  # refused before reaching the engine
    ok = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "he"


async def test_unknown_route_and_method(client):
    assert_openai_error(await client.get("/v1/nothing"), 404)
    assert_openai_error(await client.get("/v1/completions"), 405)


async def test_body_without_json_content_type_is_accepted(client):
    r = await client.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}',
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200  # like `curl -d` without -H


# --------------------------------------------------------------------------------------------------- engine errors


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "hi"}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
async def test_engine_rejection_is_400(client, engine, path, body):
    engine.reject_message = "this prompt is not welcome"
    for stream in (False, True):
        err = assert_openai_error(await client.post(path, json={**body, "stream": stream}), 400)
        assert "not welcome" in err["message"]
    engine.reject_message = None
    assert (await client.post(path, json={**body, "max_tokens": 2})).status_code == 200


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "hi"}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
async def test_nan_error_is_500_or_an_error_event(client, engine, path, body):
    engine.fail_after = 2
    err = assert_openai_error(await client.post(path, json={**body, "max_tokens": 5}), 500)
    assert err["code"] == "engine_error" and "NaN" in err["message"]
    r = await client.post(path, json={**body, "max_tokens": 5, "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_error" and "NaN" in events[-2]["error"]["message"]
    assert all("error" not in ev for ev in events[:-2])
    engine.fail_after = None
    assert (await client.post(path, json={**body, "max_tokens": 2})).status_code == 200
    assert "tokenmill:corrupted_requests_total{model_name=\"fake-model\"} 2.0" in (await client.get("/metrics")).text


async def test_engine_crash_mid_stream(client, engine):
    engine.crash_after = 2
    err = assert_openai_error(await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5}), 500)
    assert "RuntimeError" in err["message"] and "Traceback" not in err["message"]
    events = sse_events((await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5,
                                                                    "stream": True})).text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
    engine.crash_after = None
    assert (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).status_code == 200


async def test_failure_in_one_prompt_aborts_the_others(client, engine):
    engine.token_delay = 0.005
    engine.fail_after, engine.fail_only_with_token = 1, FakeTokenizer().encode("b", add_special_tokens=False)[0]
    r = await client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 100})
    assert_openai_error(r, 500)
    healthy, failed = engine.calls
    # The failed prompt ended in the engine; the healthy one was aborted instead of running to its end.
    assert engine.finished == [failed.request_id] and engine.aborted == [healthy.request_id]


async def test_fastapi_validation_errors_are_400_in_openai_format(engine):
    app = build_app(engine)

    @app.get("/typed")
    async def typed(n: int) -> dict:
        return {"n": n}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        err = assert_openai_error(await c.get("/typed", params={"n": "many"}), 400)
        assert err["param"] == "n" and "n: " in err["message"]
        assert (await c.get("/typed", params={"n": "3"})).json() == {"n": 3}


async def test_unexpected_errors_are_500_without_traceback(engine):
    def broken_encode(text, add_special_tokens=True):
        raise RuntimeError("tokenizer exploded")

    engine.tokenizer.encode = broken_encode
    transport = httpx.ASGITransport(app=build_app(engine), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        err = assert_openai_error(await c.post("/v1/completions", json={"prompt": "hi"}), 500)
        assert err["type"] == "server_error" and "tokenizer exploded" in err["message"]
        assert (await c.post("/v1/completions", json={"prompt": [1, 80], "max_tokens": 1})).status_code == 200


def test_make_server_configures_uvicorn(engine):
    from tokenmill.serve.launch import make_server

    server = make_server(engine, host="127.0.0.1", port=8123, api_key="k", log_level="WARNING",
                         timeout_graceful_shutdown=3)
    assert (server.config.host, server.config.port, server.config.timeout_graceful_shutdown) == ("127.0.0.1", 8123, 3)
    assert len(engine.observers) == 1  # build_app attached its metrics


async def test_oversized_bodies_are_413_before_they_are_read(engine):
    app = build_app(engine, max_body_bytes=1000)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=10) as c:
        big = {"prompt": "x" * 2000, "max_tokens": 1}
        r = await c.post("/v1/completions", json=big)
        assert_openai_error(r, 413)
        assert "larger than this server accepts (1000 bytes)" in r.json()["error"]["message"]

        async def chunked():  # no Content-Length: counted as it arrives
            for _ in range(5):
                yield b" " * 400

        r = await c.post("/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
        assert_openai_error(r, 413)
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    assert engine.calls[-1].prompt_token_ids  # only the small request reached the engine
    assert len(engine.calls) == 1
