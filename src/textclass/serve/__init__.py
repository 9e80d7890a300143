"""Serving a run directory over HTTP (FastAPI + uvicorn), with micro-batching, limits and metrics.

`textclass serve --model DIR` calls `serve()`; `create_app()` builds the app for tests or for another ASGI
server. Needs the `serve` extra: `pip install textclass[serve]`.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

from textclass.errors import UserError
from textclass.serve.settings import ServeSettings

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UserError(f"serving needs the `serve` extra ({err.name} is missing): pip install 'textclass[serve]'") from None


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading anything, so a taken port is one clear error rather than uvicorn's exit."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: cannot resolve ({err.strerror}); use an address such as 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"{host}:{port}: cannot listen ({err.strerror}); choose another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "auto",
    settings: ServeSettings | None = None,
    threads: int | None = None,
    forward_batch_size: int = 8,
    graceful_timeout: float = 30.0,
    access_log: bool = False,
) -> None:
    """Load the run directory and serve it until SIGTERM/SIGINT, then drain (see `server.DrainingServer`) and exit."""
    _require_extra()
    from textclass.serve.app import create_app
    from textclass.serve.metrics import ServerState
    from textclass.serve.server import DrainingServer, uvicorn_config

    settings = settings or ServeSettings()
    sock = bind_socket(host, port)
    try:
        # The predictor sorts a micro-batch by length and runs it in slices of forward_batch_size, so short
        # texts are not padded to the longest one (on CPU, slices of 8 measured ~2x faster than one of 32).
        predictor = _load(model_dir, backend, forward_batch_size, threads or default_threads())
    except BaseException:
        sock.close()
        raise
    state = ServerState()
    app = create_app(predictor, settings, state)
    config = uvicorn_config(app, settings, graceful_timeout, access_log)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"textclass serve: http://{shown}:{bound_port}  (model {model_dir}, backend {predictor.backend}, "
        f"{'API key required' if settings.api_key else 'no API key'})",
        flush=True,
    )
    if host not in LOOPBACK and not settings.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model", host)
    DrainingServer(config, state, app.state.batcher, graceful_timeout).run(sockets=[sock])


def default_threads() -> int:
    """All usable cores for the model's intra-op threads.

    Measured with benchmarks/serve_load.py on the 2-core machine (MiniLM, 32 clients, a load generator cheap
    enough not to take a core): onnx int8 with 2 threads served 242 requests/s (p99 218 ms) against 194 with
    1 thread (p99 310 ms); torch 142 against 78. The event loop's work per request is small next to the model's.
    An earlier measurement that favoured cores - 1 used an httpx load generator that took most of a core.
    """
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load(model_dir: str | Path, backend: str, batch_size: int, threads: int | None) -> Any:
    from textclass.inference.load import load_predictor

    return load_predictor(model_dir, batch_size=batch_size, threads=threads, backend=backend)


__all__ = ["ServeSettings", "serve", "bind_socket"]
