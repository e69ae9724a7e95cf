"""AsyncEngine: streams RequestOutputs to asyncio consumers from an engine core that steps on its own.

The core owns the LLMEngine and runs its step loop either on a background thread of this process (ThreadCore) or in
a process of its own (engine_process.ProcessCore: no GIL shared with the HTTP event loop). Either way the event loop
only enqueues commands (add/abort) and reads per-request queues, so HTTP handling never waits behind a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.cpu_threads import apply_threads, serving_threads
from tokenmill.engine.engine import LLMEngine, RequestLimits
from tokenmill.engine.outputs import EngineObserver, FinishedRequestStats, RequestOutput, SchedulerStats
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
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


class ObserverFanout:
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


class CoreSink(Protocol):
    """Where an engine core reports, from its own thread."""

    def deliver(self, outputs: list[RequestOutput]) -> None: ...

    def reject(self, request_id: str, error: ValueError) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class EngineCore(Protocol):
    """An LLMEngine stepping on its own: requests in (add/abort), outputs and failures out through a CoreSink."""

    config: EngineConfig
    model_config: ModelConfig
    max_model_len: int
    tokenizer: Tokenizer
    limits: RequestLimits

    def start(self, sink: CoreSink) -> None: ...

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, progress: bool) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def is_alive(self) -> bool: ...

    def shutdown(self) -> None: ...


class ThreadCore:
    """The step loop on a background thread of this process."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.config = engine.config
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self.limits = engine.limits
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Leave a core to the event loop on CPU (see cpu_threads.py); set here and again on the engine thread.
        device = getattr(engine, "device", None)
        self._threads = serving_threads(device) if isinstance(device, torch.device) else None
        self._threads_before = torch.get_num_threads()
        apply_threads(self._threads)
        self._thread = threading.Thread(target=self._loop, name="tokenmill-engine", daemon=True)

    def start(self, sink: CoreSink) -> None:
        self._sink = sink
        self._thread.start()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, progress: bool) -> None:
        self._commands.put(_Add(request_id, prompt_token_ids, params, progress))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))
        self._wake.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._threads is not None:
            apply_threads(self._threads_before)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(cmd.prompt_token_ids, cmd.params, cmd.request_id, cmd.progress)
                except ValueError as exc:
                    self._sink.reject(cmd.request_id, exc)
            else:
                self._sink.deliver(self.engine.abort_request(cmd.request_id))

    def _loop(self) -> None:
        apply_threads(self._threads)
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._sink.deliver(self.engine.step())
        except BaseException as exc:  # a crashed step must fail every waiting request, not hang them
            logger.exception("engine loop crashed")
            self._sink.fail(exc)


class AsyncEngine:
    def __init__(self, core: EngineCore, fanout: ObserverFanout | None = None) -> None:
        self.core = core
        self._fanout = fanout or ObserverFanout()
        self.config = core.config
        self.model_config = core.model_config
        self.max_model_len = core.max_model_len
        self.tokenizer = core.tokenizer
        self.limits = core.limits
        self._streams: dict[str, _Stream] = {}
        self._dead: BaseException | None = None
        core.start(self)

    @classmethod
    def from_config(cls, config: EngineConfig, engine_process: bool = False, front_ends: int = 1) -> "AsyncEngine":
        """engine_process: step in a process of its own (engine_process.ProcessCore) instead of a thread here;
        front_ends > 1 (with engine_process): that process also serves the pipes in `core.front_end_conns`, for
        other server processes to attach to."""
        fanout = ObserverFanout()
        if front_ends > 1 and not engine_process:
            raise ValueError("several front-ends need the engine in a process of its own")
        if engine_process:
            from tokenmill.engine.engine_process import ProcessCore

            core: EngineCore = ProcessCore(config, fanout, front_ends)
        else:
            core = ThreadCore(LLMEngine(config, observer=fanout))
        return cls(core, fanout)

    def attach_observer(self, observer: EngineObserver) -> None:
        self._fanout.observers.append(observer)

    def is_healthy(self) -> bool:
        return self._dead is None and self.core.is_alive()

    def shutdown(self) -> None:
        self.core.shutdown()

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, progress: bool = True
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs, each cumulative, the last one finished; progress False: only the last.

        A consumer that falls behind gets the newest output of those waiting (it holds everything the skipped ones
        did): each step's outputs are queued for every stream, and rendering one SSE chunk per step per stream is
        the server's main per-token cost, so a server short of CPU then sends fewer, larger chunks instead of falling
        further behind."""
        if not self.is_healthy():
            raise RuntimeError(f"the engine has stopped: {self._dead!r}")
        # Validate on the caller's side so a bad request fails before anything streams.
        self.limits.check(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self.core.add(request_id, prompt_token_ids, params, progress)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                error = None
                while not isinstance(item, BaseException) and not item.finished and not stream.queue.empty():
                    newer = stream.queue.get_nowait()
                    if isinstance(newer, BaseException):
                        error = newer  # after the newest output
                        break
                    item = newer
                if isinstance(item, BaseException):
                    raise item
                yield item
                if error is not None:
                    raise error
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # consumer went away (client disconnect, cancellation): free the blocks
                self.core.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    # ---- CoreSink: called on the core's thread -----------------------------------------------------------------

    def deliver(self, outputs: list[RequestOutput]) -> None:
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                deliveries.setdefault(stream.loop, []).append((stream, out))
        _deliver_all(deliveries)

    def reject(self, request_id: str, error: ValueError) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(error)

    def fail(self, error: BaseException) -> None:
        self._dead = error
        for stream in list(self._streams.values()):
            stream.put(RuntimeError(f"the engine failed: {error!r}"))
