"""Serving: the API contract, micro-batching under concurrency, every limit, auth, and graceful shutdown.

The contract is checked in-process (TestClient); concurrency and shutdown against a real uvicorn server on
127.0.0.1 (a thread for concurrency, a subprocess for SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'textclass[serve]'")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from conftest import make_texts, tiny_config  # noqa: E402
from textclass.inference.load import load_predictor  # noqa: E402
from textclass.inference.predictor import Predictor  # noqa: E402
from textclass.serve import ServeSettings, bind_socket  # noqa: E402
from textclass.serve.app import create_app  # noqa: E402
from textclass.serve.batcher import BatcherClosed, MicroBatcher  # noqa: E402

TEXTS = ["goal match team", "chip software code network", "bread soup oven", "the referee and the coach", "", "我爱自然语言处理"]


_TRAINED: dict[str, Path] = {}  # test_serve_browser imports these fixtures; train once per session, not per module


@pytest.fixture(scope="module")
def serve_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run directory (seconds on a CPU)."""
    from textclass.api import train

    if "run" in _TRAINED:
        return _TRAINED["run"]
    root = tmp_path_factory.mktemp("serve")
    files = {}
    for split, (n, seed) in {"train": (90, 1), "valid": (15, 3)}.items():
        files[split] = root / f"{split}.csv"
        make_texts(n, seed).to_csv(files[split], index=False)
    _TRAINED["run"] = Path(train(tiny_config(tiny_bert, files, root / "run", epochs=6)).run_dir)
    return _TRAINED["run"]


@pytest.fixture(scope="module")
def predictor(serve_run: Path) -> Predictor:
    return load_predictor(serve_run)


@contextlib.contextmanager
def client(predictor: Predictor, **settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(predictor, ServeSettings(**settings)), raise_server_exceptions=False) as c:
        yield c


@contextlib.contextmanager
def running_server(app: Any, graceful_timeout: float = 10.0, servers: list | None = None) -> Iterator[str]:
    """A real uvicorn server, configured as `textclass serve` configures it, in a thread on a free loopback
    port; yields its base URL (and appends the server to `servers`, for a test that shuts it down itself)."""
    from textclass.serve.server import DrainingServer, uvicorn_config

    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn_config(app, app.state.settings, graceful_timeout, log_level="warning")
    server = DrainingServer(config, app.state.server, app.state.batcher, graceful_timeout)
    if servers is not None:
        servers.append(server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length, read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response"
        body += chunk
    return int(head.split()[1]), body


def metric(text: str, name: str) -> float:
    """The value of one sample, e.g. `textclass_batch_size_count` or `x_total{path="/"}`, in Prometheus text."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in metrics:\n{text}")


# --- the API contract ---------------------------------------------------------------------------------------


def test_classify_is_predict(predictor: Predictor) -> None:
    with client(predictor) as c:
        r = c.post("/v1/classify", json={"texts": TEXTS})
        assert r.status_code == 200, r.text
        assert r.json() == {"results": predictor.predict(TEXTS)}
        r = c.post("/v1/classify", json={"texts": TEXTS[:3], "top_k": 2})
        assert r.json() == {"results": predictor.predict(TEXTS[:3], top_k=2)}
        first = r.json()["results"][0]
        assert list(first) == ["label", "score", "scores"] and len(first["scores"]) == 2
        assert first["label"] == "sport" and first["score"] == max(first["scores"].values())
        assert list(first["scores"].values()) == sorted(first["scores"].values(), reverse=True)


def test_labels_health_ready_docs(predictor: Predictor) -> None:
    with client(predictor) as c:
        assert c.get("/v1/labels").json() == {"labels": ["food", "sport", "tech"], "multi_label": False,
                                              "threshold": predictor.threshold, "text_pairs": False}
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").json() == {"status": "ready"}
        assert "swagger" in c.get("/docs").text.lower()
        schema = c.get("/openapi.json").json()
        body = schema["components"]["schemas"]["ClassifyRequest"]["properties"]["texts"]
        assert body["maxItems"] == 64 and body["items"]["maxLength"] == 10_000
        page = c.get("/")
        assert page.status_code == 200 and "<textarea" in page.text
        assert "http" not in page.text.replace("http-equiv", "")  # no CDN: every asset is served by us
        assert c.get("/static/app.js").status_code == 200


def test_metrics(predictor: Predictor) -> None:
    with client(predictor) as c:
        for _ in range(3):
            c.post("/v1/classify", json={"texts": TEXTS[:2]})
        c.post("/v1/classify", json={"texts": []})
        text = c.get("/metrics").text
    assert metric(text, 'textclass_requests_total{method="POST",path="/v1/classify",status="200"}') == 3
    assert metric(text, 'textclass_request_errors_total{path="/v1/classify",status="422"}') == 1
    assert metric(text, 'textclass_request_duration_seconds_count{path="/v1/classify"}') == 4
    assert metric(text, "textclass_batch_size_count") == 3  # the warm-up does not go through the batcher
    assert metric(text, "textclass_batch_size_sum") == 6
    assert metric(text, "textclass_texts_total") == 6


def test_text_pairs_and_multi_label(tiny_bert: Path, tmp_path: Path) -> None:
    """A pair model requires `pairs` (and only it offers the field); multi-label results carry `labels`."""
    from textclass.api import train

    files = {}
    for split, (n, seed) in {"train": (60, 1), "valid": (15, 3)}.items():
        df = make_texts(n, seed)
        df["text_pair"] = make_texts(n, seed + 100)["text"]
        df["label"] = [f"{a}|{b}" if a != b and i % 3 == 0 else a for i, (a, b) in enumerate(zip(df["label"], make_texts(n, seed + 100)["label"]))]
        files[split] = tmp_path / f"{split}.csv"
        df.to_csv(files[split], index=False)
    cfg = tiny_config(tiny_bert, files, tmp_path / "run", epochs=1)
    cfg["data"].update(text_pair_column="text_pair", label_delimiter="|")
    pair_predictor = load_predictor(train(cfg).run_dir)
    texts, pairs = TEXTS[:3], ["bread soup", "goal", "chip code"]
    with client(pair_predictor) as c:
        info = c.get("/v1/labels").json()
        assert info["multi_label"] is True and info["text_pairs"] is True
        r = c.post("/v1/classify", json={"texts": texts, "pairs": pairs, "threshold": 0.3})
        assert r.status_code == 200, r.text
        assert r.json() == {"results": pair_predictor.predict(texts, pairs, threshold=0.3)}
        assert set(r.json()["results"][0]) == {"labels", "scores"}
        assert "pairs: Field required" in c.post("/v1/classify", json={"texts": texts}).json()["detail"]
        r = c.post("/v1/classify", json={"texts": texts, "pairs": pairs[:2]})
        assert r.status_code == 422 and "pairs: give one second text per text (3), not 2" in r.json()["detail"]


# --- limits and errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"texts": ["x"] * 5}, 422, "texts: List should have at most 4 items"),
        ({"texts": ["ok", "y" * 41]}, 422, "texts.1: String should have at most 40 characters"),
        ({"texts": []}, 422, "texts: List should have at least 1 item"),
        ({"texts": "just a string"}, 422, "texts: Input should be a valid list"),
        ({"texts": [1, 2]}, 422, "texts.0: Input should be a valid string"),
        ({"text": ["x"]}, 422, "texts: Field required"),
        ({"texts": ["x"], "top_k": 0}, 422, "top_k: Input should be greater than or equal to 1"),
        ({"texts": ["x"], "threshold": 1.5}, 422, "threshold: Input should be less than or equal to 1"),
        ({"texts": ["x"], "pairs": ["y"]}, 422, "pairs: Extra inputs are not permitted"),
        ({"texts": ["x"] * 4, "padding": "z" * 400}, 413, "request body over 300 bytes"),
    ],
)
def test_limits(predictor: Predictor, body: dict, status: int, needle: str) -> None:
    with client(predictor, max_texts=4, max_chars=40, max_body_bytes=300) as c:
        r = c.post("/v1/classify", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert needle in r.json()["detail"], r.json()


def test_malformed_and_oversized_bodies(predictor: Predictor) -> None:
    with client(predictor, max_body_bytes=300) as c:
        r = c.post("/v1/classify", content=b'{"texts": ["unclosed', headers={"content-type": "application/json"})
        assert r.status_code == 422 and "JSON decode error" in r.json()["detail"]
        r = c.post("/v1/classify", content=b"texts=x", headers={"content-type": "text/plain"})
        assert r.status_code == 422 and "detail" in r.json()
        # No Content-Length (chunked): the limit counts the bytes as they arrive.
        r = c.post("/v1/classify", content=iter([b'{"texts": ["', b"a" * 400, b'"]}']), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "over 300 bytes" in r.json()["detail"]
        assert c.post("/v1/classify", json={"texts": ["fine"]}).status_code == 200
        assert c.get("/nowhere").status_code == 404


class _Exploding:
    """A predictor whose model fails after the warm-up, to see what a client gets from an internal error."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict_proba(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        if self.armed:
            raise RuntimeError("secret internals at /srv/model.py line 7")
        return self.inner.predict_proba(texts, pairs)


def test_internal_error_is_a_plain_500(predictor: Predictor) -> None:
    broken = _Exploding(predictor)
    with TestClient(create_app(broken), raise_server_exceptions=False) as c:  # type: ignore[arg-type]
        broken.armed = True
        r = c.post("/v1/classify", json={"texts": ["x"]})
        assert r.status_code == 500
        assert r.json() == {"detail": "internal server error; the server log has the details"}
        broken.armed = False
        assert c.post("/v1/classify", json={"texts": ["x"]}).status_code == 200  # the batcher survived


# --- auth ---------------------------------------------------------------------------------------------------


def test_api_key(predictor: Predictor) -> None:
    with client(predictor, api_key="s3cret") as c:
        body = {"texts": ["goal"]}
        assert c.post("/v1/classify", json=body).status_code == 401
        wrong = c.post("/v1/classify", json=body, headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["detail"]
        assert c.post("/v1/classify", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/v1/classify", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/labels").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert "APIKeyHeader" in c.get("/openapi.json").json()["components"]["securitySchemes"]


# --- the micro-batcher --------------------------------------------------------------------------------------


class _Recorder:
    """A model that returns row i = [id of the text, batch number] and records batch sizes and threads."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.sizes: list[int] = []
        self.threads: set[int] = set()
        self.delay, self.fail_on = delay, fail_on

    def __call__(self, texts: list[str], pairs: list[str] | None) -> np.ndarray:
        self.threads.add(threading.get_ident())
        self.sizes.append(len(texts))
        time.sleep(self.delay)
        if self.fail_on in texts:
            raise ValueError("boom")
        return np.array([[float(t), len(self.sizes)] for t in texts])


def test_batcher_gathers_concurrent_requests_and_returns_each_its_own() -> None:
    model = _Recorder(delay=0.01)

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(model, max_batch_size=8, max_wait_ms=50)
        await b.start()
        requests = [[str(10 * r + i) for i in range(1 + r % 3)] for r in range(12)]
        out = await asyncio.gather(*(b.submit(req) for req in requests))
        big = await b.submit([str(i) for i in range(20)])  # more than one batch
        await b.stop()
        for req, rows in zip(requests, out):
            assert rows[:, 0].tolist() == [float(t) for t in req]
        assert big[:, 0].tolist() == list(range(20))
        return out

    asyncio.run(main())
    # Requests of 1, 2, 3, 1, 2, 3, ... texts packed whole, oldest first, into batches of <= 8; then 20 as 8+8+4.
    assert model.sizes == [7, 8, 6, 3, 8, 8, 4]
    assert len(model.threads) == 1 and threading.get_ident() not in model.threads


def test_batcher_error_reaches_only_its_batch_and_stop_drains() -> None:
    model = _Recorder(fail_on="13")

    async def main() -> None:
        b = MicroBatcher(model, max_batch_size=2, max_wait_ms=1)
        await b.start()
        results = await asyncio.gather(b.submit(["12", "13"]), b.submit(["14"]), return_exceptions=True)
        assert isinstance(results[0], ValueError) and results[1][:, 0].tolist() == [14.0]
        pending = [asyncio.ensure_future(b.submit([str(i)])) for i in range(5)]
        await asyncio.sleep(0)  # queued, not yet run
        await b.stop()
        assert [r[0, 0] for r in await asyncio.gather(*pending)] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert model.sizes[-3:] == [2, 2, 1]  # stop did not wait for max_wait, and kept max_batch_size
        with pytest.raises(BatcherClosed):
            await b.submit(["x"])

    asyncio.run(main())


# --- a real server: concurrency, CLI, shutdown --------------------------------------------------------------


def test_concurrent_requests_match_predict(predictor: Predictor) -> None:
    texts = make_texts(96, seed=5)["text"].tolist()
    requests = [texts[i : i + 1 + i % 4] for i in range(0, 96, 3)]  # 32 requests of 1-4 texts, overlapping

    async def fire(url: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            rs = await asyncio.gather(*(http.post("/v1/classify", json={"texts": t, "top_k": 3}) for t in requests))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
            metrics = (await http.get("/metrics")).text
        assert metric(metrics, "textclass_batch_size_count") < len(requests)  # texts were gathered
        return [r.json()["results"] for r in rs]

    with running_server(create_app(predictor, ServeSettings(max_batch_size=16, max_wait_ms=20))) as url:
        answers = asyncio.run(fire(url))
    for req, got in zip(requests, answers):
        want = predictor.predict(req, top_k=3)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want):
            # Batch-mates change the padding, which moves scores by float rounding only.
            assert list(g["scores"]) == list(w["scores"])
            np.testing.assert_allclose(list(g["scores"].values()), list(w["scores"].values()), atol=1e-5)


def test_cli_serve_user_errors(tmp_path: Path, serve_run: Path) -> None:
    from test_cli import assert_user_error, run

    assert_user_error(run("serve", "--model", tmp_path), "not a textclass run directory")
    assert_user_error(run("serve", "--model", serve_run, "--backend", "tpu"), "--backend tpu")
    taken = bind_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        taken.listen()
        assert_user_error(run("serve", "--model", serve_run, "--port", str(port)), f"127.0.0.1:{port}: cannot listen")
    finally:
        taken.close()


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(serve_run: Path, predictor: Predictor) -> None:
    """Drain: queued requests finish, a request on an idle keep-alive connection gets 503 (it is not just
    closed), and the log has one summary line and no traceback."""
    cmd = [sys.executable, "-m", "textclass.cli", "serve", "--model", str(serve_run), "--port", "0",
           "--max-wait-ms", "1500", "--max-batch-size", "64", "--api-key", "k"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("textclass serve: http://127.0.0.1:"), line + proc.stderr.read()  # type: ignore[union-attr]
        url = line.split()[2]
        http = httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": "k"})
        deadline = time.monotonic() + 120
        while True:  # the port is bound before the model loads, and listens once it has
            with contextlib.suppress(httpx.ConnectError):
                if http.get("/ready").status_code == 200:
                    break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)

        results: dict[int, httpx.Response] = {}
        texts = [[t] for t in TEXTS[:4]]

        def send(i: int) -> None:
            with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": "k"}) as c:
                results[i] = c.post("/v1/classify", json={"texts": texts[i]})

        host, port = url.removeprefix("http://").split(":")
        idle = socket.create_connection((host, int(port)), timeout=10)  # keep-alive, idle when SIGTERM arrives
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(idle)[0] == 200
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        # Wait until all four sit in the batcher (1.5 s max wait), counted by the in-flight gauge (+1: this scrape).
        while metric(http.get("/metrics").text, "textclass_requests_in_flight") < len(texts) + 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        http.close()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        refused = 1
        try:  # in the moment between the signal and closing the socket, new work gets 503
            late = httpx.post(url + "/v1/classify", json={"texts": ["x"]}, headers={"X-API-Key": "k"}, timeout=10)
            assert late.status_code == 503 and "shutting down" in late.json()["detail"]
            refused += 1
        except httpx.ConnectError:
            pass
        time.sleep(0.3)  # uvicorn would have closed the idle connection by now (it checks for exit every 0.1 s)
        body = b'{"texts": ["x"]}'
        idle.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        status, answer = read_response(idle)
        assert status == 503 and "shutting down" in json.loads(answer)["detail"]
        idle.close()
        for t in threads:
            t.join(60)
        for i, req in enumerate(texts):
            assert results[i].status_code == 200, results[i].text
            got = results[i].json()["results"]
            assert [g["label"] for g in got] == [w["label"] for w in predictor.predict(req)]
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
        proc.wait(60)
        log = proc.stderr.read()  # type: ignore[union-attr]
        assert proc.returncode in (0, -signal.SIGTERM), log
        assert "Traceback" not in log
        assert [line for line in log.splitlines() if "draining:" in line] == [
            f"INFO draining: {len(texts)} requests finished, {refused} refused"
        ], log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_json_errors_never_carry_a_traceback(predictor: Predictor) -> None:
    """Every error body is JSON with a `detail` string; none of them mentions Python internals."""
    with client(predictor, max_texts=2) as c:
        bodies = [
            c.post("/v1/classify", json={"texts": ["a", "b", "c"]}),
            c.post("/v1/classify", content=b"\xff\xfe", headers={"content-type": "application/json"}),
            c.post("/v1/classify", json=[1, 2]),
            c.post("/v1/classify", json={"texts": [None]}),
            c.get("/v1/classify"),
        ]
    for r in bodies:
        assert 400 <= r.status_code < 500, r.text
        assert isinstance(json.loads(r.text)["detail"], str)
        assert "Traceback" not in r.text and ".py" not in r.text
