"""Serving under pressure: the bounded queue (429), clients that go away, slow clients, a failing text, and
a drain that runs out of time. Against a real uvicorn server on 127.0.0.1, configured as `textclass serve`
configures it; every request loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'textclass[serve]'")
import httpx  # noqa: E402

from test_app import metric, predictor, read_response, running_server, serve_run  # noqa: E402,F401  (fixtures)
from textclass.errors import UserError  # noqa: E402
from textclass.inference.predictor import Predictor  # noqa: E402
from textclass.serve import ServeSettings  # noqa: E402
from textclass.serve.app import create_app  # noqa: E402
from textclass.serve.batcher import MicroBatcher  # noqa: E402


class _Gated:
    """A predictor whose model calls wait for `gate` and record what they saw; `poison` makes a call fail."""

    def __init__(self, inner: Predictor, delay: float = 0.0, poison: str | None = None) -> None:
        self.inner, self.delay, self.poison = inner, delay, poison
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.calls: list[list[str]] = []
        self.batcher: MicroBatcher | None = None
        self.max_queued = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict_proba(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(30), "gate never opened"
        time.sleep(self.delay)
        self.calls.append(list(texts))
        if self.batcher is not None:
            self.max_queued = max(self.max_queued, self.batcher.queued_texts)
        if self.poison in texts:
            raise RuntimeError("this text breaks the model")
        return self.inner.predict_proba(texts, pairs)


def _app(model: _Gated, **settings: Any) -> Any:
    app = create_app(model, ServeSettings(**settings))  # type: ignore[arg-type]
    model.batcher = app.state.batcher
    return app


def _until(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _raw(url: str, request: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(request)
    return sock


def _post(path: str, body: dict, content_length: int | None = None) -> bytes:
    data = json.dumps(body).encode()
    n = len(data) if content_length is None else content_length
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n\r\n".encode() + data


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after `seconds`."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        raise AssertionError(f"connection still open after {seconds} s; got {data!r}") from None
    except ConnectionResetError:
        pass
    return data


# --- the bounded queue ----------------------------------------------------------------------------------------


def test_queue_bound_default_and_check() -> None:
    assert ServeSettings().queue_bound == 128  # max(4 x 32, 2 x 64)
    assert ServeSettings(max_batch_size=64).queue_bound == 256
    assert ServeSettings(max_queue_texts=100).queue_bound == 100
    with pytest.raises(UserError, match="--max-queue-texts 10 is below --max-texts 64"):
        ServeSettings(max_queue_texts=10)


def test_full_queue_answers_429_with_retry_after(predictor: Predictor) -> None:
    """40 concurrent requests of 4 texts against a queue of 8: most get 429 with Retry-After, none waits unbounded."""
    model = _Gated(predictor, delay=0.05)
    app = _app(model, max_batch_size=4, max_texts=4, max_queue_texts=8, max_wait_ms=1)
    texts = ["goal match team", "chip code", "bread soup", "the coach"]

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=40)) as http:
            return await asyncio.gather(*(http.post("/v1/classify", json={"texts": texts}) for _ in range(40)))

    with running_server(app) as url:
        answers = asyncio.run(fire(url))
        metrics = httpx.get(url + "/metrics").text
    ok = [r for r in answers if r.status_code == 200]
    busy = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(busy) == 40 and len(ok) >= 2 and busy, [r.status_code for r in answers]
    for r in busy:
        assert int(r.headers["retry-after"]) >= 1
        assert "the server is busy" in r.json()["detail"] and "Retry-After" in r.json()["detail"]
    assert all(r.json() == ok[0].json() for r in ok) and ok[0].json() == {"results": predictor.predict(texts)}
    assert model.max_queued <= 8  # sampled at every model call
    assert metric(metrics, "textclass_texts_total") == 4 * len(ok)  # refused requests cost no model time


def test_disconnected_clients_leave_the_queue(predictor: Predictor) -> None:
    """Texts of clients that hung up while waiting are never computed, and free their place in the queue."""
    model = _Gated(predictor)
    app = _app(model, max_batch_size=1, max_wait_ms=0)
    with running_server(app) as url:
        model.gate.clear()
        model.entered.clear()
        first = _raw(url, _post("/v1/classify", {"texts": ["goal first"]}))
        assert model.entered.wait(10)  # the model is busy with it, behind the gate
        gone = [_raw(url, _post("/v1/classify", {"texts": [f"gone {i}"]})) for i in range(3)]
        _until(lambda: app.state.batcher.queued_texts == 3)
        for sock in gone:
            sock.close()
        _until(lambda: app.state.batcher.queued_texts == 0)
        model.gate.set()
        assert read_response(first)[0] == 200
        first.close()
        assert httpx.post(url + "/v1/classify", json={"texts": ["goal after"]}).status_code == 200
        metrics = httpx.get(url + "/metrics").text
    assert model.calls[1:] == [["goal first"], ["goal after"]]  # after the warm-up; no "gone" text
    assert metric(metrics, 'textclass_requests_total{method="POST",path="/v1/classify",status="499"}') == 3


# --- slow clients ---------------------------------------------------------------------------------------------


def test_slow_or_idle_connections_time_out(predictor: Predictor) -> None:
    """A head that never ends, a body that never ends, a connection that sends nothing, an idle keep-alive."""
    app = create_app(predictor, ServeSettings(read_timeout=0.5, keep_alive_timeout=0.5))
    with running_server(app) as url:
        silent = _raw(url, b"")
        half_head = _raw(url, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
        half_body = _raw(url, _post("/v1/classify", {"texts": ["x"]}, content_length=100))
        keep_alive = _raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(keep_alive) == (200, b'{"status":"ok"}')
        assert _closed_within(silent, 5) == b""
        assert _closed_within(half_head, 5) == b""
        answer = _closed_within(half_body, 5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        detail = json.loads(answer.partition(b"\r\n\r\n")[2])["detail"]
        assert detail == "the request body did not arrive within 0.5 s; send it at once (limit: --read-timeout)"
        assert _closed_within(keep_alive, 5) == b""
        assert httpx.post(url + "/v1/classify", json={"texts": ["goal"]}).status_code == 200  # prompt clients are fine
    for sock in (silent, half_head, half_body, keep_alive):
        sock.close()


# --- a failing text -------------------------------------------------------------------------------------------


def test_a_failing_text_fails_only_its_request(predictor: Predictor, caplog: pytest.LogCaptureFixture) -> None:
    model = _Gated(predictor, poison="poison")
    app = _app(model, max_batch_size=16, max_wait_ms=300)  # the three requests share one model call
    requests = [["goal match team"], ["poison", "bread soup"], ["chip code network"]]

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/classify", json={"texts": t}) for t in requests))

    with running_server(app) as url:
        answers = asyncio.run(fire(url))
    assert [r.status_code for r in answers] == [200, 500, 200]
    assert answers[1].json() == {"detail": "internal server error; the server log has the details"}
    for req, r in zip(requests[::2], answers[::2]):
        assert [g["label"] for g in r.json()["results"]] == [w["label"] for w in predictor.predict(req)]
    assert max(model.calls[1:], key=len) == [t for req in requests for t in req]  # batched first
    assert len(model.calls) == 1 + 1 + 3  # warm-up, the batch, then each request alone
    assert "retrying each alone" in caplog.text


# --- draining -------------------------------------------------------------------------------------------------


def test_drain_out_of_time_refuses_the_waiting_quietly(
    predictor: Predictor, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    """At --graceful-timeout, work still queued gets 503 (not a cancellation and its traceback); the model
    call under way finishes; one line sums it up."""
    model = _Gated(predictor)
    app = _app(model, max_batch_size=1, max_wait_ms=0)
    servers: list[Any] = []
    results: dict[str, int] = {}

    def send(url: str, text: str) -> None:
        results[text] = httpx.post(url + "/v1/classify", json={"texts": [text]}, timeout=30).status_code

    with caplog.at_level(logging.INFO, logger="textclass"), running_server(app, 0.5, servers) as url:
        model.gate.clear()
        model.entered.clear()
        threads = [threading.Thread(target=send, args=(url, "goal running"))]
        threads[0].start()
        assert model.entered.wait(10)
        threads += [threading.Thread(target=send, args=(url, f"waiting {i}")) for i in range(2)]
        for t in threads[1:]:
            t.start()
        _until(lambda: app.state.batcher.queued_texts == 2)
        servers[0].handle_exit(signal.SIGTERM, None)
        _until(lambda: len(results) == 2)  # the waiting two, answered at the graceful timeout
        model.gate.set()
        for t in threads:
            t.join(30)
    assert results == {"waiting 0": 503, "waiting 1": 503, "goal running": 200}
    summary = [r.getMessage() for r in caplog.records if "draining" in r.getMessage()]
    assert summary == ["draining: 1 requests finished, 2 refused"]
    assert "Traceback" not in capfd.readouterr().err and not any(r.exc_info for r in caplog.records)
