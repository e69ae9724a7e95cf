"""Run the HTTP server in the foreground: what `tokenmill serve` calls once the engine is built."""

from __future__ import annotations

import logging
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


async def serve(engine: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                log_level: str = "info", timeout_graceful_shutdown: float = 10.0) -> None:
    """Like run_server, inside an event loop the caller already runs (e.g. one the engine is bound to)."""
    server = make_server(engine, host, port, api_key, log_level, timeout_graceful_shutdown)
    await server.serve()
