"""Prometheus metrics, and the one ASGI middleware that records them, limits body size and refuses work while draining.

prometheus_client does the counting and the text format; each app gets its own registry so that two apps
in one process (tests, notebooks) never share or clash over counters.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from fastapi import HTTPException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
# Paths are labelled by name only when they are ours: a scanner's random URLs must not grow the label set.
KNOWN_PATHS = frozenset({"/", "/v1/classify", "/v1/labels", "/health", "/ready", "/metrics", "/docs", "/openapi.json"})
# Probes and scrapes still answer while the server drains; everything else gets 503.
OPEN_WHILE_DRAINING = frozenset({"/health", "/ready", "/metrics"})


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


class ServingMiddleware:
    """Counts every HTTP request by path and status and times it; answers 503 to new work while draining;
    answers 413 to bodies over `max_body_bytes`.

    A plain ASGI middleware (not Starlette's BaseHTTPMiddleware), which adds no extra task per request.
    FastAPI's own `max_body_size` answers in plain text from outside every user middleware, so its 413s
    would be neither JSON nor counted; this one raises an HTTPException that FastAPI turns into JSON.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, state: ServerState, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.state = state
        self.max_body_bytes = max_body_bytes

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
        received = 0

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # FastAPI re-raises a middleware's HTTPException as the answer
                    raise HTTPException(413, too_large)
            return message

        m = self.metrics
        m.in_flight.inc()
        started = time.perf_counter()
        try:
            if self.state.draining and path not in OPEN_WHILE_DRAINING:
                await _send_json(send_with_status, 503, {"detail": "the server is shutting down; retry on another instance"})
            elif _content_length(scope) > limit:
                await _send_json(send_with_status, 413, {"detail": too_large})
            else:
                await self.app(scope, receive_with_limit, send_with_status)
        finally:
            m.in_flight.dec()
            m.latency.labels(path).observe(time.perf_counter() - started)
            m.requests.labels(scope["method"], path, str(status)).inc()
            if status >= 400:
                m.errors.labels(path, str(status)).inc()


def _content_length(scope: Scope) -> int:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # uvicorn/h11 reject a malformed length before we see it
    return 0


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
