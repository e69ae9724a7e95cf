"""Run the HTTP server in the foreground: what `tokenmill serve` calls once the engine is built.

With several API server processes (`run_servers`), this process binds the socket and serves on it like the others;
the extra processes are spawned with the socket and a pipe of their own to the engine process, and the kernel hands
each new connection to one of them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
from multiprocessing.connection import Connection
from typing import Any

import uvicorn

from tokenmill.serve.app import build_app

log = logging.getLogger("tokenmill.serve")


def make_server(engine: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                log_level: str = "info", timeout_graceful_shutdown: float = 10.0) -> uvicorn.Server:
    """A configured uvicorn.Server over build_app(engine); not started."""
    app = build_app(engine, api_key=api_key)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        # On SIGINT/SIGTERM uvicorn stops accepting, lets in-flight requests finish for this long, then cancels them
        # (cancelled requests are aborted in the engine by the routes themselves).
        timeout_graceful_shutdown=timeout_graceful_shutdown,
        timeout_keep_alive=30,
    )
    return uvicorn.Server(config)


def run_server(engine: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               log_level: str = "info", timeout_graceful_shutdown: float = 10.0) -> None:
    """Serve until interrupted (blocking; owns the event loop). Returns after a graceful shutdown."""
    server = make_server(engine, host, port, api_key, log_level, timeout_graceful_shutdown)
    log.info("tokenmill serving on http://%s:%d (api key %s)", host, port, "required" if api_key else "off")
    server.run()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, to share between server processes (OSError if it cannot bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Supervisor(uvicorn.Server):
    """This process's server, which passes the first stop signal it gets on to the other server processes (they
    run in process groups of their own, so a terminal's Ctrl-C reaches only this one): all drain at once."""

    def __init__(self, config: uvicorn.Config, workers: list[Any]) -> None:
        super().__init__(config)
        self.workers = workers
        self.stopping = False

    def stop_workers(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for worker in self.workers:
            if worker.is_alive():
                try:
                    os.kill(worker.pid, signal.SIGINT)
                except OSError:
                    pass

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.stop_workers()
        super().handle_exit(sig, frame)


def run_servers(engine: Any, count: int, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                log_level: str = "info", timeout_graceful_shutdown: float = 10.0) -> None:
    """Serve from `count` processes (this one and count - 1 spawned) sharing one socket, each with its own pipe to
    the engine process (`engine.core.front_end_conns`), until this process is stopped (SIGINT / SIGTERM). Returns
    once every server process has stopped; an extra one also stops by itself when the engine process goes away."""
    conns: list[Connection] = engine.core.front_end_conns
    if len(conns) != count - 1:
        raise ValueError(f"the engine has {len(conns) + 1} front-end pipes for {count} server processes")
    sock = bind_socket(host, port)
    ctx = mp.get_context("spawn")
    started = ctx.Queue()
    workers = [ctx.Process(target=_api_server_main, name=f"tokenmill-api-{i + 1}",
                           args=(conn, sock, started, api_key, log_level, timeout_graceful_shutdown))
               for i, conn in enumerate(conns)]
    server = _Supervisor(make_server(engine, host, port, api_key, log_level, timeout_graceful_shutdown).config,
                         workers)
    try:
        for worker in workers:
            worker.start()
        for conn in conns:
            conn.close()  # the workers hold their own copies now
        _wait_started(workers, started)  # so that /health answers only once every process serves
        log.info("tokenmill serving on http://%s:%d from %d processes (api key %s)", host, port, count,
                 "required" if api_key else "off")
        server.run(sockets=[sock])
    finally:
        server.stop_workers()
        for worker in workers:
            if worker.pid is None:
                continue
            worker.join(timeout=timeout_graceful_shutdown + 5)
            if worker.is_alive():
                log.warning("API server process %s did not stop; terminating it", worker.name)
                worker.terminate()
                worker.join(timeout=5)
        sock.close()


def _wait_started(workers: list[Any], started: Any) -> None:
    waiting = {w.name for w in workers}
    while waiting:
        try:
            waiting.discard(started.get(timeout=0.5))
        except queue.Empty:
            for worker in workers:
                if worker.name in waiting and not worker.is_alive():
                    raise RuntimeError(f"API server process {worker.name} exited (code {worker.exitcode}) while "
                                       "starting")


def _api_server_main(conn: Connection, sock: socket.socket, started: Any, api_key: str | None, log_level: str,
                     timeout_graceful_shutdown: float) -> None:
    """An extra API server process: its own AsyncEngine on the engine process's pipe, uvicorn on the shared socket."""
    os.setpgrp()  # the terminal's Ctrl-C goes to the first process, which stops this one (_Supervisor)
    try:
        _api_server(conn, sock, started, api_key, log_level, timeout_graceful_shutdown)
    except KeyboardInterrupt:
        pass  # stopped while starting, or uvicorn re-raising the signal it stopped for once it has drained


def _api_server(conn: Connection, sock: socket.socket, started: Any, api_key: str | None, log_level: str,
                timeout_graceful_shutdown: float) -> None:
    from tokenmill.engine.async_engine import AsyncEngine, ObserverFanout
    from tokenmill.engine.engine_process import PipeCore

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    fanout = ObserverFanout()
    core = PipeCore.attach(conn, fanout)
    engine = AsyncEngine(core, fanout)
    host, port = sock.getsockname()[:2]
    server = make_server(engine, host, port, api_key, log_level, timeout_graceful_shutdown)

    def stop_when_the_engine_goes() -> None:
        core.wait_until_lost()
        server.should_exit = True

    threading.Thread(target=stop_when_the_engine_goes, daemon=True).start()
    started.put(mp.current_process().name)
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
