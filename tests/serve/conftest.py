"""Fixtures for the server tests: a fake engine, an in-process ASGI client, and a live uvicorn server."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import httpx
import pytest
from serve_fakes import FakeEngine

from tokenmill.serve.app import build_app
from tokenmill.serve.testing import ServerThread


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=10) as c:
        yield c


@pytest.fixture
def live_server(engine: FakeEngine):
    with ServerThread(build_app(engine)) as server:
        yield server


def sse_events(body: str) -> list[Any]:
    """The JSON payloads of an SSE body, with the final [DONE] as the string "[DONE]"."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    return err
