"""Run an app on a real uvicorn server on loopback in a background thread (for tests and end-to-end checks)."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from typing import Any

import httpx
import uvicorn


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port unless given) in a daemon thread; a context manager.

    with ServerThread(build_app(engine)) as server:
        httpx.get(server.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0, wait_healthy: bool = True) -> "ServerThread":
        # Bind the socket here so the port is known and cannot be taken between choosing and listening.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, timeout_graceful_shutdown=2, lifespan="auto")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"uvicorn-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the uvicorn server thread exited during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"uvicorn did not start within {timeout} s")
            time.sleep(0.01)
        if wait_healthy:
            self.wait_healthy(deadline - time.monotonic())
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + max(timeout, 0.1)
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}/health did not answer 200 within {timeout:.1f} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the uvicorn server on port {self.port} did not stop within {timeout} s")
        self._server = self._thread = None

    def __enter__(self) -> "ServerThread":
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(engine: Any, api_key: str | None = None, **kwargs: Any) -> ServerThread:
    """build_app(engine, api_key) served on a free loopback port; call .stop() (or use `with`) when done."""
    from tokenmill.serve.app import build_app

    return ServerThread(build_app(engine, api_key=api_key), **kwargs).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m tokenmill serve MODEL ARGS` on 127.0.0.1 (a free port), healthy on entering; a context manager
    that stops it on leaving as Ctrl-C would (SIGINT, then a kill after `stop_timeout_s`). For benchmark scripts.

    with ServerProcess("path/to/model", ["--max-num-seqs", "64"]) as server:
        httpx.get(server.url + "/health")
    """

    def __init__(self, model: str, args: list[str] | None = None, start_timeout_s: float = 600.0,
                 stop_timeout_s: float = 60.0) -> None:
        self.model = model
        self.args = list(args or [])
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Any = None
        self.log: Any = None

    def __enter__(self) -> "ServerProcess":
        import subprocess
        import sys

        # The server's log goes to a file: a server that fails to start says why in the exception.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "tokenmill", "serve", self.model, "--port",
                                         str(self.port), *self.args],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().decode("utf-8", errors="replace")[-3000:]
                self.__exit__()  # (closes the log: a failed __enter__ gets no __exit__ from the with statement)
                raise RuntimeError(f"the server exited (code {self.process.returncode}) before it was healthy:\n"
                                   f"{tail}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the server did not become healthy in time")
            time.sleep(0.3)

    def __exit__(self, *exc: Any) -> None:
        import signal
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.close()
            self.log = None
