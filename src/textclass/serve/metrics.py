"""Prometheus metrics, and the one ASGI middleware that records them and guards the app: body size and read
time limits, refusal while draining or while the batcher's queue is full.

prometheus_client does the counting and the text format; each app gets its own registry so that two apps
in one process (tests, notebooks) never share or clash over counters.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from textclass.serve.batcher import MicroBatcher

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
# Paths are labelled by name only when they are ours: a scanner's random URLs must not grow the label set.
KNOWN_PATHS = frozenset(
    {"/", "/predict", "/info", "/v1/classify", "/v1/labels", "/health", "/ready", "/metrics", "/docs", "/openapi.json"}
)
# Probes and scrapes still answer while the server drains; everything else gets 503.
OPEN_WHILE_DRAINING = frozenset({"/health", "/ready", "/metrics"})
# POSTs here feed the batcher: refused before their body is read while its queue is full.
CLASSIFYING_PATHS = frozenset({"/", "/predict", "/v1/classify"})
# Hugging Face clients read an error's message from `error` (huggingface_hub's hf_raise_for_status), ours from `detail`.
HF_PATHS = frozenset({"/", "/predict", "/info"})


def error_body(path: str, detail: Any) -> dict[str, Any]:
    """`{"detail": ...}` everywhere, plus the same text as `error` on the Hugging Face-compatible paths."""
    return {"detail": detail, "error": detail} if path in HF_PATHS else {"detail": detail}


def queue_full_detail(batcher: MicroBatcher) -> str:
    return (
        f"the server is busy ({batcher.queued_texts} texts waiting, bound {batcher.max_queue_texts}); retry after "
        f"{batcher.retry_after()} s (the Retry-After header), send fewer texts per request, or add instances"
    )


@dataclass
class Metrics:
    """The server's counters and histograms, in their own registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("textclass_requests", "HTTP requests answered.", ["method", "path", "status"], registry=r)
        self.errors = Counter(
            "textclass_request_errors", "HTTP requests answered with a 4xx or 5xx status.", ["path", "status"], registry=r
        )
        self.latency = Histogram(
            "textclass_request_duration_seconds", "Time from request to response.", ["path"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("textclass_requests_in_flight", "Requests being handled now.", registry=r)
        self.batch_size = Histogram("textclass_batch_size", "Texts per model call.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_latency = Histogram(
            "textclass_batch_duration_seconds", "Time spent in one model call.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.texts = Counter("textclass_texts", "Texts classified.", registry=r)
        self.queued = Gauge("textclass_queued_texts", "Texts waiting for a model call.", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_latency.observe(seconds)
        self.texts.inc(size)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class ServerState:
    """Shared between the app and the process running it: `draining` is set when SIGTERM arrives."""

    ready: bool = False
    draining: bool = False
    finished: int = 0  # requests answered while draining (not probes), other than with 503
    refused: int = 0  # requests answered 503 while draining


class ServingMiddleware:
    """Counts every HTTP request by path and status and times it; answers 503 to new work while draining;
    413 to bodies over `max_body_bytes`; 408 to bodies not complete `read_timeout` seconds after the request
    started (a slowloris body would otherwise hold its connection and handler forever); 429 to classifying
    requests while the batcher's queue is full, before their body is read or parsed.

    A plain ASGI middleware (not Starlette's BaseHTTPMiddleware), which adds no extra task per request.
    FastAPI's own `max_body_size` answers in plain text from outside every user middleware, so its 413s
    would be neither JSON nor counted; this one raises an HTTPException that FastAPI turns into JSON.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        state: ServerState,
        max_body_bytes: int,
        read_timeout: float = 30.0,
        batcher: MicroBatcher | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.state = state
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        self.batcher = batcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in KNOWN_PATHS or scope["path"].startswith("/static/") else "other"
        path = "/static" if path.startswith("/static/") else path
        status = 500  # if the app dies before answering, ServerErrorMiddleware (outside us) answers 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        limit = self.max_body_bytes
        too_large = f"request body over {limit} bytes; send fewer or shorter texts per request (limit: --max-body-bytes)"
        too_slow = f"the request body did not arrive within {self.read_timeout:g} s; send it at once (limit: --read-timeout)"
        received, body_done = 0, False
        started = time.perf_counter()

        async def guarded_receive() -> Message:
            # FastAPI re-raises a middleware's HTTPException raised here as the answer.
            nonlocal received, body_done
            if body_done:  # later calls wait for the disconnect, which may take as long as the answer
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, started + self.read_timeout - time.perf_counter()))
            except asyncio.TimeoutError:
                raise HTTPException(408, too_slow, headers={"connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, too_large, headers={"connection": "close"})
                body_done = not message.get("more_body", False)
            return message

        m, answer = self.metrics, scope["path"]
        m.in_flight.inc()
        try:
            if self.state.draining and path not in OPEN_WHILE_DRAINING:
                shutting_down = "the server is shutting down; retry on another instance"
                await _send_json(send_with_status, 503, error_body(answer, shutting_down))
            elif _content_length(scope) > limit:
                await _send_json(send_with_status, 413, error_body(answer, too_large))
            elif self.batcher is not None and self.batcher.full and scope["method"] == "POST" and path in CLASSIFYING_PATHS:
                retry = ((b"retry-after", str(self.batcher.retry_after()).encode()),)
                await _send_json(send_with_status, 429, error_body(answer, queue_full_detail(self.batcher)), retry)
            else:
                await self.app(scope, guarded_receive, send_with_status)
        finally:
            m.in_flight.dec()
            m.latency.labels(path).observe(time.perf_counter() - started)
            m.requests.labels(scope["method"], path, str(status)).inc()
            if status >= 400:
                m.errors.labels(path, str(status)).inc()
            if self.state.draining and path not in OPEN_WHILE_DRAINING:
                if status == 503:
                    self.state.refused += 1
                else:
                    self.state.finished += 1


def _content_length(scope: Scope) -> int:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # uvicorn/h11 reject a malformed length before we see it
    return 0


async def _send_json(send: Send, status: int, body: dict, extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """A JSON answer that closes the connection: the body was not read, so the connection cannot be reused."""
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), (b"connection", b"close")]
    headers += list(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
