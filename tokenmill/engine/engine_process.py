"""ProcessCore: the LLMEngine stepping in a process of its own, for the server.

On a GPU a decode step is ~1 ms of device time and a comparable share of Python launching it; with the engine on a
thread of the server's process, the event loop streaming every token holds the GIL between the engine's torch calls
and the steps stretch (session 11: engine steps of 1.8–2.6 ms in the server against ~1.05 ms of GPU). Here the
engine has a process, and so a GIL, to itself: the server sends it requests and aborts over a pipe, and it sends back
one message per step with what is new for each request (output_deltas.py) and the observer events of that step
(metrics), which the server replays.

The child is spawned (never forked: CUDA does not survive a fork), ignores SIGINT (the server decides when it stops,
after its graceful shutdown) and exits when the pipe closes, so it never outlives the server.

One engine can serve several HTTP front-end processes (`tokenmill serve --api-server-count N`, as vLLM's flag): a
Python server process spends ~60-100 us per streamed token (rendering, the event loop, the socket), so one caps
out near 10-15k tok/s, below what an H100 decodes at 64 streams. The engine then has a pipe per front-end, sends
each the deltas of the requests it added (and every front-end the observer events, so each one's /metrics counts
everything), and aborts a front-end's requests when its pipe closes. Pipe 0 belongs to the process that started
the engine: when it closes, the engine stops.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import socket
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.engine import RequestLimits
from tokenmill.engine.output_deltas import DeltaDecoder
from tokenmill.engine.outputs import EngineObserver, FinishedRequestStats, SchedulerStats
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.async_engine import CoreSink

logger = logging.getLogger(__name__)

# Messages. Server -> engine: ("add", request_id, prompt_token_ids, params, progress), ("abort", request_id),
# ("shutdown",). Engine -> server: ("ready", EngineInfo), ("step", [RequestDelta], [(request_id, ValueError)],
# [(observer method, argument)]), ("failed", exception).
_ADD, _ABORT, _SHUTDOWN = "add", "abort", "shutdown"
_READY, _STEP, _FAILED = "ready", "step", "failed"


@dataclass
class EngineInfo:
    """What the server needs to know of the engine it did not build."""

    config: EngineConfig  # as the engine completed it (served model name, clamped max_model_len)
    model_config: ModelConfig
    max_model_len: int
    limits: RequestLimits
    tokenizer_source: Any  # a ModelSource or a path: the server loads its own tokenizer from it


class _RecordingObserver:
    """Engine side: keeps each event until the step's message carries it to the server."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_step(self, stats: SchedulerStats) -> None:
        self.events.append(("on_step", stats))

    def on_first_token(self, ttft_s: float) -> None:
        self.events.append(("on_first_token", ttft_s))

    def on_inter_token(self, itl_s: float) -> None:
        self.events.append(("on_inter_token", itl_s))

    def on_finished(self, stats: FinishedRequestStats) -> None:
        self.events.append(("on_finished", stats))

    def take(self) -> list[tuple[str, Any]]:
        events, self.events = self.events, []
        return events


def _portable(exc: BaseException) -> BaseException:
    """The exception itself where it survives pickling, else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _engine_main(config: EngineConfig, conns: list[Connection], log_level: int) -> None:
    """The engine process: build the engine, then step while there is work, reading commands between steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    from tokenmill.engine.cpu_threads import apply_threads, serving_threads
    from tokenmill.engine.engine import LLMEngine

    events = _RecordingObserver()
    try:
        engine = LLMEngine(config, observer=events)
        # On the CPU every core: the server's process mostly waits on sockets (cpu_threads.py has the numbers).
        apply_threads(serving_threads(engine.device, shares_process=False))
    except BaseException as exc:
        for conn in conns:
            conn.send((_FAILED, _portable(exc)))
        return
    events.take()
    info = EngineInfo(engine.config, engine.model_config, engine.max_model_len, engine.limits,
                      engine.tokenizer_source)
    for conn in conns:
        conn.send((_READY, info))
    live = dict(enumerate(conns))  # front-end index -> its pipe
    owner: dict[str, int] = {}  # request id -> the front-end that added it

    def drop(k: int) -> None:
        """A front-end went away: free what it had asked for."""
        del live[k]
        for request_id in [r for r, i in owner.items() if i == k]:
            engine.abort_request_deltas(request_id)
            del owner[request_id]

    try:
        while True:
            outputs, rejected = [], []
            # Idle: block until a command comes (a closed pipe also wakes the wait, and recv then raises EOFError).
            for conn in mp_connection.wait(list(live.values()), None if not engine.has_unfinished_requests() else 0):
                k = next(i for i, c in live.items() if c is conn)
                try:
                    while conn.poll(0):
                        msg = conn.recv()
                        if msg[0] == _ADD:
                            _, request_id, prompt_token_ids, params, progress = msg
                            try:
                                engine.add_request(prompt_token_ids, params, request_id, progress)
                                owner[request_id] = k
                            except ValueError as exc:
                                rejected.append((k, request_id, exc))
                        elif msg[0] == _ABORT:
                            outputs.extend(engine.abort_request_deltas(msg[1]))
                        elif msg[0] == _SHUTDOWN:
                            return
                except (EOFError, OSError):
                    if k == 0:
                        return  # the server went away
                    drop(k)
            if engine.has_unfinished_requests():
                outputs.extend(engine.step_deltas())
            step_events = events.take()
            if not (outputs or rejected or step_events):
                continue
            per_front_end: dict[int, tuple[list, list]] = {k: ([], []) for k in live}
            for d in outputs:
                k = owner.get(d.request_id)
                if k in per_front_end:
                    per_front_end[k][0].append(d)
                if d.finished:
                    owner.pop(d.request_id, None)
            for k, request_id, exc in rejected:
                if k in per_front_end:
                    per_front_end[k][1].append((request_id, exc))
            for k, (mine, theirs) in per_front_end.items():
                if mine or theirs or step_events:
                    try:
                        live[k].send((_STEP, mine, theirs, step_events))
                    except OSError:
                        if k == 0:
                            return
                        drop(k)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the server went away
    except BaseException as exc:
        logger.exception("engine loop crashed")
        for conn in live.values():
            try:
                conn.send((_FAILED, _portable(exc)))
            except OSError:
                pass


class PipeCore:
    """An EngineCore (async_engine.py) talking to an engine process over one pipe: requests and aborts out, each
    step's deltas (rebuilt into cumulative RequestOutputs) and observer events in, read on a thread of its own.
    `ready` is the engine's first message on this pipe."""

    def __init__(self, conn: Connection, ready: tuple, observer: EngineObserver) -> None:
        from tokenmill.tokenizer import Tokenizer

        self._conn = conn
        self._closing = False
        self._sink: CoreSink | None = None
        if ready[0] == _FAILED:
            raise ready[1]
        info: EngineInfo = ready[1]
        self.config = info.config
        self.model_config = info.model_config
        self.max_model_len = info.max_model_len
        self.limits = info.limits
        self.tokenizer = Tokenizer.from_source(info.tokenizer_source)
        self._observer = observer
        self._decoder = DeltaDecoder()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="tokenmill-engine-reader", daemon=True)

    @classmethod
    def attach(cls, conn: Connection, observer: EngineObserver) -> "PipeCore":
        """A front-end's core on a pipe that an engine process (started elsewhere) serves."""
        try:
            ready = conn.recv()
        except EOFError:
            raise RuntimeError("the engine process exited before it was ready") from None
        return cls(conn, ready, observer)

    def start(self, sink: CoreSink) -> None:
        self._sink = sink
        self._reader.start()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, progress: bool) -> None:
        self._send((_ADD, request_id, prompt_token_ids, params, progress))

    def abort(self, request_id: str) -> None:
        self._send((_ABORT, request_id))

    def is_alive(self) -> bool:
        return self._reader.is_alive()

    def wait_until_lost(self) -> None:
        """Blocks until this pipe is done: the engine process went away, or shutdown() hung up."""
        self._reader.join()

    def shutdown(self) -> None:
        """Hangs up: the engine aborts this front-end's requests (and keeps serving the others)."""
        if self._closing:
            return
        self._closing = True
        # The pipe is a socket pair: shutting it down wakes the reader blocked in recv (closing the fd would not).
        try:
            with socket.socket(fileno=os.dup(self._conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader.is_alive():
            self._reader.join(timeout=5)
        self._conn.close()

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(msg)
            except OSError:
                pass  # the process is gone; the reader reports it to every waiting request

    def _read(self) -> None:
        """The reader thread: each step's message back into observer events and cumulative RequestOutputs."""
        sink = self._sink
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == _FAILED:
                    sink.fail(msg[1])
                    return
                _, deltas, rejected, events = msg
                for method, arg in events:
                    getattr(self._observer, method)(arg)
                for request_id, error in rejected:
                    sink.reject(request_id, error)
                if deltas:
                    sink.deliver([self._decoder.decode(d) for d in deltas])
        except (EOFError, OSError):
            sink.fail(RuntimeError("the engine was shut down" if self._closing else self._lost()))
        except BaseException as exc:  # e.g. an observer that raised: fail every waiting request, never hang them
            logger.exception("reading the engine process's results failed")
            sink.fail(exc)

    def _lost(self) -> str:
        return "the engine process went away"


class ProcessCore(PipeCore):
    """A PipeCore that starts the engine's process itself (built and ready on return) and stops it on shutdown.
    front_ends > 1: the engine gets that many pipes; this core uses the first, and `front_end_conns` holds the
    others for the extra server processes to `PipeCore.attach` to."""

    def __init__(self, config: EngineConfig, observer: EngineObserver, front_ends: int = 1) -> None:
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe() for _ in range(front_ends)]
        engine_ends = [child for _, child in pipes]
        self._process = ctx.Process(target=_engine_main, args=(config, engine_ends, logging.getLogger().level),
                                    name="tokenmill-engine", daemon=True)
        self._process.start()
        for child in engine_ends:
            child.close()  # so the child's exit shows here as EOF
        conn = pipes[0][0]
        self.front_end_conns: list[Connection] = [parent for parent, _ in pipes[1:]]
        ready = self._wait_ready(conn)
        if ready[0] == _FAILED:
            self._process.join(timeout=10)
        super().__init__(conn, ready, observer)

    def _wait_ready(self, conn: Connection) -> tuple:
        """The child's first message (ready or failed), however long loading takes (downloads included)."""
        while not conn.poll(0.2) and self._process.is_alive():
            pass
        try:
            return conn.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(f"the engine process exited (code {self._process.exitcode}) before it was "
                               "ready") from None

    def is_alive(self) -> bool:
        return self._process.is_alive() and super().is_alive()

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._send((_SHUTDOWN,))
        self._stop_process()
        self._conn.close()
        for conn in self.front_end_conns:
            conn.close()
        if self._reader.is_alive():
            self._reader.join(timeout=5)

    def _stop_process(self) -> None:
        self._process.join(timeout=10)
        if self._process.is_alive():
            logger.warning("the engine process did not stop within 10 s; terminating it")
            self._process.terminate()
            self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _lost(self) -> str:
        self._process.join(timeout=5)
        return f"the engine process exited (code {self._process.exitcode})"
