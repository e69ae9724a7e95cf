"""A fake OpenAI-compatible streaming server on loopback, with scripted misbehaviour."""

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest


@pytest.fixture(scope="session")
def toy_tokenizer_file(toy_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    toy_tokenizer.save(str(path))
    return path


@dataclass
class FakeServerState:
    first_token_delay: float = 0.05
    token_delay: float = 0.01
    default_tokens: int = 4  # answer length when the client does not ask for ignore_eos
    block: int = 4  # cached tokens are reported in whole blocks of words
    # behaviour(request_index, body) -> "ok" | "error500" | "stall" | "disconnect" | "error_event" | "no_usage"
    # | "plain_json"
    behaviour: object = None
    requests: list = field(default_factory=list)  # (arrival time, path, body)
    finished: list = field(default_factory=list)  # (finish time, body)
    prompts: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, **changes):
        with self.lock:
            self.requests.clear()
            self.finished.clear()
            self.prompts.clear()
        self.behaviour = None
        for k, v in {"first_token_delay": 0.05, "token_delay": 0.01, "default_tokens": 4, **changes}.items():
            setattr(self, k, v)


def _words(body: dict) -> list[str]:
    if "messages" in body:
        text = " ".join(m["role"] + " " + m["content"] for m in body["messages"])
    else:
        text = body.get("prompt", "")
    return text.split()


def build_app(state: FakeServerState):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def complete(request: Request, chat: bool):
        body = await request.json()
        with state.lock:
            index = len(state.requests)
            state.requests.append((time.perf_counter(), request.url.path, body))
        behaviour = state.behaviour(index, body) if state.behaviour else "ok"
        if behaviour == "error500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        if behaviour == "plain_json":  # a server that ignores stream=true
            return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})
        words = _words(body)
        # Cached tokens: the longest word prefix shared with an earlier prompt, in whole blocks.
        with state.lock:
            best = max((_common(words, p) for p in state.prompts), default=0)
            state.prompts.append(words)
        cached = best // state.block * state.block
        n = body["max_tokens"] if body.get("ignore_eos") else min(state.default_tokens, body["max_tokens"])

        def chunk(payload):
            return "data: " + json.dumps(payload) + "\n\n"

        async def stream():
            if chat:
                yield chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            if behaviour == "stall":
                await asyncio.sleep(30)
            await asyncio.sleep(state.first_token_delay)
            for i in range(n):
                if i:
                    await asyncio.sleep(state.token_delay)
                piece = f" ans{i}"
                delta = {"delta": {"content": piece}} if chat else {"text": piece}
                yield chunk({"choices": [{"index": 0, **delta, "finish_reason": None}]})
                if behaviour == "disconnect" and i == 2:
                    raise RuntimeError("simulated crash mid-stream")
                if behaviour == "error_event" and i == 1:
                    yield chunk({"error": {"message": "engine died", "code": 500}})
                    return
            last = {"delta": {}} if chat else {"text": ""}
            yield chunk({"choices": [{"index": 0, **last, "finish_reason": "length"}]})
            if behaviour != "no_usage":
                usage = {
                    "prompt_tokens": len(words),
                    "completion_tokens": n,
                    "total_tokens": len(words) + n,
                    "prompt_tokens_details": {"cached_tokens": cached},
                }
                yield chunk({"choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
            with state.lock:
                state.finished.append((time.perf_counter(), body))

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def _common(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeServer:
    url: str
    state: FakeServerState


@pytest.fixture(scope="session")
def fake_server():
    import uvicorn

    state = FakeServerState()
    port = free_port()
    config = uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="critical",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.02)
    yield FakeServer(f"http://127.0.0.1:{port}", state)
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def server(fake_server):
    fake_server.state.reset()
    return fake_server
