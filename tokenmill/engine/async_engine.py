"""AsyncEngine: the step loop on a background thread, streaming RequestOutputs to asyncio consumers.

The thread owns the LLMEngine; the event loop only enqueues commands (add/abort) and reads per-request queues, so
HTTP handling never waits behind a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.cpu_threads import apply_threads, serving_threads
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.outputs import EngineObserver, FinishedRequestStats, RequestOutput, SchedulerStats
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: "_Stream"
    progress: bool


@dataclass
class _Abort:
    request_id: str


class _Stream:
    """Delivers one request's outputs from the engine thread to its asyncio consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver_all(deliveries: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]]) -> None:
    """Hands a step's outputs to their event loops: one wake-up per loop, not one per request (each
    call_soon_threadsafe writes to the loop's wake-up pipe)."""
    for loop, items in deliveries.items():
        loop.call_soon_threadsafe(_put_each, items)


def _put_each(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


class _ObserverFanout:
    def __init__(self) -> None:
        self.observers: list[EngineObserver] = []

    def on_step(self, stats: SchedulerStats) -> None:
        for o in self.observers:
            o.on_step(stats)

    def on_first_token(self, ttft_s: float) -> None:
        for o in self.observers:
            o.on_first_token(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        for o in self.observers:
            o.on_inter_token(itl_s)

    def on_finished(self, stats: FinishedRequestStats) -> None:
        for o in self.observers:
            o.on_finished(stats)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, fanout: _ObserverFanout | None = None) -> None:
        self.engine = engine
        self._fanout = fanout or _ObserverFanout()
        self.config = engine.config
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        # Leave a core to the event loop on CPU (see cpu_threads.py); set here and again on the engine thread.
        device = getattr(engine, "device", None)
        self._threads = serving_threads(device) if isinstance(device, torch.device) else None
        self._threads_before = torch.get_num_threads()
        apply_threads(self._threads)
        self._thread = threading.Thread(target=self._loop, name="tokenmill-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        fanout = _ObserverFanout()
        return cls(LLMEngine(config, observer=fanout), fanout)

    def attach_observer(self, observer: EngineObserver) -> None:
        self._fanout.observers.append(observer)

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self._threads is not None:
            apply_threads(self._threads_before)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, progress: bool = True
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs, each cumulative, the last one finished; progress False: only the last."""
        if not self.is_healthy():
            raise RuntimeError(f"the engine has stopped: {self._dead!r}")
        # Validate on the caller's side so a bad request fails before anything streams.
        self.engine.validate_request(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._commands.put(_Add(request_id, prompt_token_ids, params, stream, progress))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # consumer went away (client disconnect, cancellation): free the blocks
                self._commands.put(_Abort(request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))
        self._wake.set()

    # ---- engine thread -----------------------------------------------------------------------------------------

    def _drain_commands(self, live: dict[str, _Stream]) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(cmd.prompt_token_ids, cmd.params, cmd.request_id, cmd.progress)
                    live[cmd.request_id] = cmd.stream
                except ValueError as exc:
                    cmd.stream.put(exc)
            else:
                for out in self.engine.abort_request(cmd.request_id):
                    stream = live.pop(out.request_id, None)
                    if stream is not None:
                        stream.put(out)

    def _loop(self) -> None:
        apply_threads(self._threads)
        live: dict[str, _Stream] = {}
        try:
            while not self._stop.is_set():
                self._drain_commands(live)
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                deliveries: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
                for out in self.engine.step():
                    stream = live.get(out.request_id)
                    if stream is None:
                        continue
                    deliveries.setdefault(stream.loop, []).append((stream, out))
                    if out.finished:
                        live.pop(out.request_id, None)
                _deliver_all(deliveries)
        except BaseException as exc:  # a crashed step must fail every waiting request, not hang them
            logger.exception("engine loop crashed")
            self._dead = exc
            for stream in live.values():
                stream.put(RuntimeError(f"the engine failed: {exc!r}"))
