"""Hugging Face-compatible text classification, so HF clients and code written for HF services work as-is.

- `POST /`: the Inference API / Inference Endpoints shape. `huggingface_hub.InferenceClient(base_url=SERVER)
  .text_classification(text)` posts `{"inputs": text, "parameters": {...}}` to the base URL and keeps
  element 0 of the list it gets back, so `/` answers one list per input even for a single string:
  `[[{"label": ..., "score": ...}, ...]]`, as the Inference API does.
- `POST /predict`: text-embeddings-inference's path and shape: a single input gets a flat list, a list of
  inputs one list each.
- `GET /info`: labels, task and this server's limits.

`inputs` is a text or a list of texts; for text-pair models `{"text": ..., "text_pair": ...}` or a list of
those, as the transformers pipeline takes them. Each answer is sorted by score, best first, with every label
unless `parameters.top_k` (as the Inference API and TEI answer by default). `function_to_apply` defaults to
the model's own (softmax, or sigmoid for multi-label models), as in the pipeline. The server keeps
probabilities, not logits: a sigmoid's logits are recovered exactly, so multi-label models take all three
functions; softmax loses them, so single-label models take only "softmax" and say so otherwise.

No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
"""

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, create_model

from textclass.inference.predictor import BasePredictor
from textclass.serve.batcher import MicroBatcher
from textclass.serve.settings import ServeSettings
from textclass.serve.submit import submit_texts

NoExtra = ConfigDict(extra="forbid")


class LabelScore(BaseModel):
    label: str
    score: float


class Parameters(BaseModel):
    model_config = NoExtra
    top_k: int | None = Field(None, ge=1, description="Keep the k best labels (default: all).")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="Default: the model's own (softmax; sigmoid for multi-label models)."
    )


class Limits(BaseModel):
    max_texts: int = Field(description="Texts (or pairs) per request.")
    max_chars: int = Field(description="Characters per text.")
    max_body_bytes: int
    max_queue_texts: int = Field(description="Texts waiting for the model; beyond, 429 with Retry-After.")
    max_batch_size: int = Field(description="Texts per model call.")
    max_wait_ms: float
    read_timeout_s: float = Field(description="For the request head, and again for the body (408).")
    keep_alive_timeout_s: float


class Info(BaseModel):
    labels: list[str]
    multi_label: bool
    threshold: float = Field(description="Default multi-label decision threshold (of /v1/classify).")
    text_pairs: bool = Field(description="Whether inputs are {text, text_pair} pairs.")
    function_to_apply: str = Field(description="The model's own function: softmax or sigmoid.")
    backend: str
    version: str
    limits: Limits


def _request_model(settings: ServeSettings, pair_model: bool) -> type[BaseModel]:
    """`{"inputs", "parameters"}` with this server's limits in the schema; the inputs' form picks the branch."""
    text = Annotated[str, StringConstraints(max_length=settings.max_chars)]
    one: Any = text
    if pair_model:
        one = create_model("TextPair", __config__=NoExtra, text=(text, ...), text_pair=(text, ...))
    many = Annotated[list[one], Field(min_length=1, max_length=settings.max_texts)]
    single, several = ("pair", "pairs") if pair_model else ("text", "texts")
    inputs = Annotated[
        Annotated[one, Tag(single)] | Annotated[many, Tag(several)],
        Discriminator(lambda v: several if isinstance(v, list) else single),
    ]
    what = "a {text, text_pair} pair or a list of" if pair_model else "a text or a list of"
    return create_model(
        "HFClassifyRequest",
        __config__=NoExtra,
        inputs=(inputs, Field(description=f"{what} 1 to {settings.max_texts}; texts of at most {settings.max_chars} chars.")),
        parameters=(Parameters | None, None),
        options=(dict[str, Any] | None, Field(None, description="Ignored (the Inference API's caching options).")),
    )


def _scores(probs: np.ndarray, multi_label: bool, function: str | None) -> np.ndarray:
    """The model's probabilities under `function`, as the pipeline's `function_to_apply` would give them."""
    own = "sigmoid" if multi_label else "softmax"
    if function is None or function == own:
        return probs
    if not multi_label:
        raise HTTPException(
            422,
            f"parameters.function_to_apply: this model's scores are softmax probabilities, from which the raw "
            f"logits that {function!r} needs cannot be recovered; use 'softmax' or leave it out",
        )
    p = np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12)
    logits = np.log(p) - np.log1p(-p)  # sigmoid's inverse
    if function == "none":
        return logits
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ranked(scores: np.ndarray, names: list[str], top_k: int | None) -> list[list[dict[str, Any]]]:
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[: top_k or len(names)]
        out.append([{"label": names[i], "score": float(row[i])} for i in order])
    return out


def add_hf_routes(
    app: FastAPI, predictor: BasePredictor, batcher: MicroBatcher, settings: ServeSettings, dependencies: list, responses: dict
) -> None:
    """Add `POST /`, `POST /predict` and `GET /info`, behind the same key, limits and errors as /v1/classify."""
    pair_model = predictor.cfg.data.text_pair_column is not None
    names = list(predictor.labels.names)
    multi_label = predictor.labels.multi_label
    HFClassifyRequest = _request_model(settings, pair_model)

    async def classify(body: Any, request: Request) -> tuple[list[list[dict[str, Any]]], bool]:
        """One ranked list per input, and whether `inputs` was a single input."""
        single = not isinstance(body.inputs, list)
        items = [body.inputs] if single else body.inputs
        texts = [i.text for i in items] if pair_model else items
        pairs = [i.text_pair for i in items] if pair_model else None
        params = body.parameters or Parameters()
        scores = _scores(await submit_texts(request, batcher, texts, pairs), multi_label, params.function_to_apply)
        return _ranked(scores, names, params.top_k), single

    @app.post("/", response_model=list[list[LabelScore]], dependencies=dependencies, responses=responses)
    async def inference_api(body: HFClassifyRequest, request: Request) -> Any:  # type: ignore[valid-type]
        """Hugging Face Inference API shape: one list of {label, score} per input, best first, even for one text."""
        return (await classify(body, request))[0]

    @app.post(
        "/predict", response_model=list[LabelScore] | list[list[LabelScore]], dependencies=dependencies, responses=responses
    )
    async def tei_predict(body: HFClassifyRequest, request: Request) -> Any:  # type: ignore[valid-type]
        """text-embeddings-inference shape: one list of {label, score} for a single input, a list of them for a list."""
        ranked, single = await classify(body, request)
        return ranked[0] if single else ranked

    @app.get("/info", response_model=Info, dependencies=dependencies, responses={k: v for k, v in responses.items() if k == 401})
    async def info() -> Any:
        """The model's labels and task, and the limits this server applies."""
        s = settings
        limits = Limits(
            max_texts=s.max_texts,
            max_chars=s.max_chars,
            max_body_bytes=s.max_body_bytes,
            max_queue_texts=s.queue_bound,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            read_timeout_s=s.read_timeout,
            keep_alive_timeout_s=s.keep_alive_timeout,
        )
        return Info(
            labels=names,
            multi_label=multi_label,
            threshold=predictor.threshold,
            text_pairs=pair_model,
            limits=limits,
            function_to_apply="sigmoid" if multi_label else "softmax",
            backend=predictor.backend,
            version=app.version,
        )
