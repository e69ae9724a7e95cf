"""Running prompts through the engine for one HTTP request: merge concurrent prompts, notice a departed client,
and make sure every engine request either finishes or is aborted (so its KV blocks are freed)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from typing import Any, AsyncIterator, Awaitable, TypeVar

import anyio
from starlette.requests import Request

from tokenmill.engine.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger("tokenmill.serve")

# How often a request that is waiting on the engine checks whether its client is still connected.
DISCONNECT_POLL_S = 0.1

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


class EngineFailure(Exception):
    """A request finished with finish_reason "error" (e.g. NaN logits)."""


class Generation:
    """One engine `generate()` per prompt, run concurrently and merged; `close()` aborts whatever did not finish.

    Prompt i runs as engine request `{request_id}-{i}` (just `request_id` when there is one prompt). progress False:
    each prompt yields only its finished output (a response that does not stream).
    """

    def __init__(self, engine: Any, prompts: list[list[int]], params: list[SamplingParams], request_id: str,
                 progress: bool = True) -> None:
        self.engine = engine
        self.progress = progress
        self.request_ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        self._iterators: list[Any] = [None] * len(prompts)
        self._prompts = prompts
        self._params = params
        self._pending: dict[asyncio.Future, int] = {}
        self._ready: deque[asyncio.Future] = deque()
        self._done: set[int] = set()
        self._started = False
        self._closed = False

    async def _start(self) -> None:
        self._started = True
        for i, (ids, params) in enumerate(zip(self._prompts, self._params)):
            it = self.engine.generate(ids, params, self.request_ids[i], progress=self.progress)
            if inspect.isawaitable(it):  # tolerate `async def generate` returning an iterator
                it = await it
            self._iterators[i] = it
            if len(self._prompts) > 1:
                self._pending[asyncio.ensure_future(_anext(it))] = i

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next (prompt index, cumulative RequestOutput) from any prompt; None once all have finished.

        An exception out of the engine propagates; that request counts as unfinished, so close() aborts it.
        """
        if not self._started:
            await self._start()
        if len(self._iterators) == 1:  # the common case needs no merging tasks
            if 0 in self._done:
                return None
            try:
                output = await self._iterators[0].__anext__()
            except StopAsyncIteration:
                self._done.add(0)
                return None
            if output.finished:
                self._done.add(0)
            return 0, output
        while self._pending:
            if not self._ready:
                done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
                self._ready.extend(sorted(done, key=lambda f: self._pending[f]))
            fut = self._ready.popleft()
            i = self._pending.pop(fut)
            try:
                output = fut.result()
            except StopAsyncIteration:
                self._done.add(i)
                continue
            if output.finished:
                self._done.add(i)
            else:
                self._pending[asyncio.ensure_future(_anext(self._iterators[i]))] = i
            return i, output
        return None

    async def close(self) -> None:
        """Abort unfinished requests in the engine and close their iterators. Idempotent; survives cancellation."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for i, rid in enumerate(self.request_ids):
                if self._started and i not in self._done:
                    try:
                        await self.engine.abort(rid)
                    except Exception:
                        log.exception("engine.abort(%s) failed", rid)
            for fut in self._pending:
                fut.cancel()
            if self._pending:
                await asyncio.gather(*self._pending, return_exceptions=True)
            self._pending.clear()
            for it in self._iterators:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:
                        log.exception("closing an engine output stream failed")


async def _anext(it: AsyncIterator[T]) -> T:
    return await it.__anext__()


async def until_disconnect(request: Request, coro: Awaitable[T]) -> T:
    """Await `coro`, checking every DISCONNECT_POLL_S whether the client left; if so cancel it and raise."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)


def raise_if_failed(output: RequestOutput) -> None:
    if output.error is not None or any(o.finish_reason == "error" for o in output.outputs):
        raise EngineFailure(output.error or "the engine failed to generate this request")
