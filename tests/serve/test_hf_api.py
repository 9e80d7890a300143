"""The Hugging Face-compatible routes: `POST /` (Inference API shape), `POST /predict` (TEI shape), `GET /info`,
checked with raw JSON and with huggingface_hub's own InferenceClient pointed at a local server.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'textclass[serve]'")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from conftest import make_texts, tiny_config  # noqa: E402
from test_app import TEXTS, metric, predictor, running_server, serve_run  # noqa: E402,F401  (fixtures)
from textclass.inference.load import load_predictor  # noqa: E402
from textclass.inference.predictor import Predictor  # noqa: E402
from textclass.serve import ServeSettings  # noqa: E402
from textclass.serve.app import create_app  # noqa: E402


@contextlib.contextmanager
def client(predictor: Predictor, **settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(predictor, ServeSettings(**settings)), raise_server_exceptions=False) as c:
        yield c


def ranked(probs: np.ndarray, names: list[str], top_k: int | None = None) -> list[list[dict[str, Any]]]:
    """What the routes should answer: per text, every label (or the top_k) with its score, best first."""
    out = []
    for row in probs:
        order = sorted(range(len(names)), key=lambda i: -row[i])[: top_k or len(names)]
        out.append([{"label": names[i], "score": pytest.approx(float(row[i]), abs=1e-6)} for i in order])
    return out


@pytest.fixture(scope="module")
def pair_predictor(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    """A multi-label text-pair model (seconds on a CPU)."""
    from textclass.api import train

    root = tmp_path_factory.mktemp("pairs")
    files = {}
    for split, (n, seed) in {"train": (60, 1), "valid": (15, 3)}.items():
        df, other = make_texts(n, seed), make_texts(n, seed + 100)
        df["text_pair"] = other["text"]
        df["label"] = [f"{a}|{b}" if a != b and i % 3 == 0 else a for i, (a, b) in enumerate(zip(df["label"], other["label"]))]
        files[split] = root / f"{split}.csv"
        df.to_csv(files[split], index=False)
    cfg = tiny_config(tiny_bert, files, root / "run", epochs=1)
    cfg["data"].update(text_pair_column="text_pair", label_delimiter="|")
    return load_predictor(train(cfg).run_dir)


def test_shapes_scores_and_top_k(predictor: Predictor) -> None:
    names = list(predictor.labels.names)
    probs = predictor.predict_proba(TEXTS[:3])
    with client(predictor) as c:
        # `/`: one list per input, even for one string (what InferenceClient.text_classification parses).
        assert c.post("/", json={"inputs": TEXTS[0]}).json() == ranked(probs[:1], names)
        assert c.post("/", json={"inputs": TEXTS[:3]}).json() == ranked(probs, names)
        # `/predict`: TEI's shape, a flat list for a single input.
        assert c.post("/predict", json={"inputs": TEXTS[0]}).json() == ranked(probs[:1], names)[0]
        assert c.post("/predict", json={"inputs": TEXTS[:3]}).json() == ranked(probs, names)
        body = {"inputs": TEXTS[:3], "parameters": {"top_k": 2, "function_to_apply": "softmax"}, "options": {"use_cache": False}}
        assert c.post("/", json=body).json() == ranked(probs, names, top_k=2)
        r = c.post("/", json={"inputs": "x", "parameters": {"function_to_apply": "sigmoid"}})
        assert r.status_code == 422 and "'sigmoid' needs cannot be recovered; use 'softmax'" in r.json()["detail"]
        page = c.get("/")  # GET / is still the web page
        assert page.status_code == 200 and "<textarea" in page.text
        info = c.get("/info").json()
    assert info["labels"] == names and info["multi_label"] is False and info["text_pairs"] is False
    assert info["function_to_apply"] == "softmax" and info["backend"] == "torch"
    assert info["limits"] == {"max_texts": 64, "max_chars": 10_000, "max_body_bytes": 1_000_000, "max_queue_texts": 128,
                              "max_batch_size": 32, "max_wait_ms": 5.0, "read_timeout_s": 30.0, "keep_alive_timeout_s": 5.0}


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"inputs": ["x"] * 5}, 422, "inputs.texts: List should have at most 4 items"),
        ({"inputs": ["ok", "y" * 41]}, 422, "inputs.texts.1: String should have at most 40 characters"),
        ({"inputs": "y" * 41}, 422, "inputs.text: String should have at most 40 characters"),
        ({"inputs": []}, 422, "inputs.texts: List should have at least 1 item"),
        ({"inputs": 3}, 422, "inputs.text: Input should be a valid string"),
        ({"text": "x"}, 422, "inputs: Field required"),
        ({"inputs": "x", "parameters": {"top_k": 0}}, 422, "parameters.top_k: Input should be greater than or equal to 1"),
        ({"inputs": "x", "parameters": {"topk": 2}}, 422, "parameters.topk: Extra inputs are not permitted"),
        ({"inputs": {"text": "a", "text_pair": "b"}}, 422, "inputs.text: Input should be a valid string"),
        ({"inputs": ["x"] * 4, "padding": "z" * 400}, 413, "request body over 300 bytes"),
    ],
)
@pytest.mark.parametrize("path", ["/", "/predict"])
def test_limits_and_errors(predictor: Predictor, path: str, body: dict, status: int, needle: str) -> None:
    """The limits of /v1/classify; errors carry `detail` and, for Hugging Face clients, the same text as `error`."""
    with client(predictor, max_texts=4, max_chars=40, max_body_bytes=300) as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"] and r.json()["error"] == r.json()["detail"], r.json()


def test_api_key(predictor: Predictor) -> None:
    with client(predictor, api_key="s3cret") as c:
        for method, path in [("POST", "/"), ("POST", "/predict"), ("GET", "/info")]:
            kwargs: dict[str, Any] = {"json": {"inputs": "goal"}} if method == "POST" else {}
            r = c.request(method, path, **kwargs)
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert c.request(method, path, headers={"Authorization": "Bearer s3cret"}, **kwargs).status_code == 200
        assert c.get("/").status_code == 200  # the page stays open


def test_pairs_and_multi_label(pair_predictor: Predictor) -> None:
    """Pairs as the pipeline takes them; sigmoid scores, and the other two functions recovered from them."""
    names = list(pair_predictor.labels.names)
    texts, pairs = TEXTS[:3], ["bread soup", "goal", "chip code"]
    probs = pair_predictor.predict_proba(texts, pairs).astype(np.float64)
    logits = np.log(probs) - np.log1p(-probs)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    inputs = [{"text": t, "text_pair": p} for t, p in zip(texts, pairs)]
    with client(pair_predictor) as c:
        assert c.post("/predict", json={"inputs": inputs[0]}).json() == ranked(probs[:1], names)[0]
        assert c.post("/", json={"inputs": inputs}).json() == ranked(probs, names)
        for function, want in [("sigmoid", probs), ("none", logits), ("softmax", softmax)]:
            got = c.post("/", json={"inputs": inputs, "parameters": {"function_to_apply": function}}).json()
            assert got == ranked(want, names), function
        r = c.post("/", json={"inputs": "just one text"})
        assert r.status_code == 422 and "inputs.pair: Input should be a valid dictionary" in r.json()["detail"]
        info = c.get("/info").json()
    assert info["multi_label"] is True and info["text_pairs"] is True and info["function_to_apply"] == "sigmoid"


def test_huggingface_hub_inference_client(predictor: Predictor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The official client, pointed at the local server: it posts only to base_url and parses the answer."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    # Offline mode makes the client refuse every URL, even ours; nothing else is requested (checked below).
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    names = list(predictor.labels.names)
    text = "the striker scored a goal for the team"
    probs = predictor.predict_proba([text])
    with running_server(create_app(predictor, ServeSettings(api_key="s3cret"))) as url:
        hf = InferenceClient(base_url=url, api_key="s3cret", timeout=30)
        got = hf.text_classification(text)
        top = hf.text_classification(text, top_k=1, function_to_apply="softmax")
        with pytest.raises(HfHubHTTPError, match="missing or wrong API key"):
            InferenceClient(base_url=url, api_key="guess", timeout=30).text_classification(text)
        metrics = httpx.get(url + "/metrics", headers={"X-API-Key": "s3cret"}).text
    assert [{"label": e.label, "score": e.score} for e in got] == ranked(probs, names)[0]
    assert [e.label for e in top] == [got[0].label]
    assert metric(metrics, 'textclass_requests_total{method="POST",path="/",status="200"}') == 2
    assert metric(metrics, 'textclass_requests_total{method="POST",path="/",status="401"}') == 1
