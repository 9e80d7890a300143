"""The FastAPI app: classify, labels, health, readiness, metrics, OpenAPI and the web page; the Hugging
Face-compatible routes are in `hf_api`.

Every error is JSON with a `detail` that says what went wrong and what to change; no stack trace ever
reaches a client (unexpected errors are logged here and answered with a plain 500). Results are decoded by
the predictor's own `decode`, so they are the ones `textclass predict` prints for the same texts.

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at runtime, and the
request model is built per app (its limits are settings).
"""

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from textclass.inference.predictor import BasePredictor
from textclass.serve.batcher import MicroBatcher
from textclass.serve.hf_api import add_hf_routes
from textclass.serve.metrics import Metrics, ServerState, ServingMiddleware, error_body
from textclass.serve.settings import ServeSettings
from textclass.serve.submit import CLIENT_GONE, ClientGone, ErrorBody, submit_texts

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


class Prediction(BaseModel):
    """One text's result: `label`/`score` (single-label) or `labels` (multi-label), and ranked `scores`."""

    label: str | None = Field(None, description="Best class (single-label models).")
    score: float | None = Field(None, description="Probability of `label` (single-label models).")
    labels: list[str] | None = Field(None, description="Classes at or above the threshold (multi-label models).")
    scores: dict[str, float] = Field(description="Class probabilities, best first (the top_k best when top_k is given).")


class ClassifyResponse(BaseModel):
    results: list[Prediction] = Field(description="One entry per input text, in input order.")


class LabelsResponse(BaseModel):
    labels: list[str]
    multi_label: bool
    threshold: float = Field(description="Default multi-label decision threshold.")
    text_pairs: bool = Field(description="Whether the model classifies text pairs (then `pairs` is required).")


class Status(BaseModel):
    status: str


def _request_model(settings: ServeSettings, pair_model: bool) -> type[BaseModel]:
    """The request schema with this server's limits in it, so OpenAPI documents them and pydantic enforces them.

    `pairs` exists (and is required) only for text-pair models, so the schema never offers what the model refuses.
    """
    text = Annotated[str, StringConstraints(max_length=settings.max_chars)]
    texts = Annotated[list[text], Field(min_length=1, max_length=settings.max_texts)]
    fields: dict[str, Any] = {
        "texts": (texts, Field(description=f"1 to {settings.max_texts} texts of at most {settings.max_chars} characters.")),
        "top_k": (int | None, Field(None, ge=1, description="Keep the k best class scores per text.")),
        "threshold": (float | None, Field(None, ge=0.0, le=1.0, description="Multi-label threshold (default: the model's).")),
    }
    if pair_model:
        fields["pairs"] = (texts, Field(description="The second text of each pair, one per text."))
    return create_model("ClassifyRequest", __config__=ConfigDict(extra="forbid"), **fields)


def _validation_detail(exc: RequestValidationError) -> str:
    """One readable line per problem, e.g. `texts: List should have at most 64 items`; never echoes the input."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        lines.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(lines)


def create_app(predictor: BasePredictor, settings: ServeSettings = ServeSettings(), state: ServerState | None = None) -> FastAPI:
    """An app serving `predictor`; `state` lets the process that runs it mark it as draining on SIGTERM."""
    state = state or ServerState()
    metrics = Metrics()
    pair_model = predictor.cfg.data.text_pair_column is not None
    batcher = MicroBatcher(
        predictor.predict_proba, settings.max_batch_size, settings.max_wait_ms, metrics.observe_batch, settings.queue_bound
    )
    ClassifyRequest = _request_model(settings, pair_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        # One warm-up call: the first call pays for lazy initialisation, which no user request should.
        await batcher.run_in_model_thread(lambda: predictor.predict_proba(["warm up"], ["warm up"] if pair_model else None))
        state.ready = True
        log.info(
            "ready: %d labels, max batch %d, max wait %g ms, queue bound %d texts",
            predictor.labels.num_labels,
            settings.max_batch_size,
            settings.max_wait_ms,
            settings.queue_bound,
        )
        try:
            yield
        finally:
            state.ready = False
            await batcher.stop()  # in-flight requests have finished by now; this drains anything left

    app = FastAPI(
        title="textclass",
        summary="Text classification with micro-batching.",
        version=_version(),
        lifespan=lifespan,
        responses={422: {"model": ErrorBody, "description": "Invalid request"}},
    )
    app.state.settings, app.state.metrics, app.state.server, app.state.batcher = settings, metrics, state, batcher
    app.add_middleware(
        ServingMiddleware,
        metrics=metrics,
        state=state,
        max_body_bytes=settings.max_body_bytes,
        read_timeout=settings.read_timeout,
        batcher=batcher,
    )

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(request.scope["path"], exc.detail), status_code=exc.status_code, headers=exc.headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(request.scope["path"], _validation_detail(exc)), status_code=422)

    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_GONE)  # uvicorn drops it: the connection is closed

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        detail = "internal server error; the server log has the details"
        return JSONResponse(error_body(request.scope["path"], detail), status_code=500)

    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientGone, client_gone)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected_error)

    protected = [Depends(_key_checker(settings.api_key))] if settings.api_key else []
    auth_responses: dict[int | str, dict[str, Any]] = (
        {401: {"model": ErrorBody, "description": "Missing or wrong API key"}} if settings.api_key else {}
    )
    work_responses: dict[int | str, dict[str, Any]] = {
        **auth_responses,
        408: {"model": ErrorBody, "description": f"Body not complete within --read-timeout ({settings.read_timeout:g} s)"},
        413: {"model": ErrorBody, "description": "Request body too large"},
        429: {"model": ErrorBody, "description": f"Queue full ({settings.queue_bound} texts waiting); see Retry-After"},
        503: {"model": ErrorBody, "description": "Shutting down"},
    }

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        dependencies=protected,
        responses=work_responses,
    )
    async def classify(body: ClassifyRequest, request: Request) -> Any:  # type: ignore[valid-type]
        """Labels and ranked class scores for each text, exactly as `textclass predict` gives them."""
        texts, pairs = body.texts, getattr(body, "pairs", None)  # type: ignore[attr-defined]
        if pairs is not None and len(pairs) != len(texts):
            raise HTTPException(422, f"pairs: give one second text per text ({len(texts)}), not {len(pairs)}")
        probs = await submit_texts(request, batcher, texts, pairs)
        return {"results": predictor.decode(probs, top_k=body.top_k, threshold=body.threshold)}  # type: ignore[attr-defined]

    @app.get("/v1/labels", response_model=LabelsResponse, dependencies=protected, responses=auth_responses)
    async def labels() -> Any:
        """The model's classes, in score order of its outputs."""
        return {
            "labels": list(predictor.labels.names),
            "multi_label": predictor.labels.multi_label,
            "threshold": predictor.threshold,
            "text_pairs": pair_model,
        }

    @app.get("/health", response_model=Status)
    async def health() -> Any:
        """The process is alive (never needs a key)."""
        return {"status": "ok"}

    @app.get("/ready", response_model=Status, responses={503: {"model": Status, "description": "Loading or shutting down"}})
    async def ready() -> Any:
        """The model is loaded and warmed up, and the server is not shutting down."""
        if state.ready and not state.draining:
            return {"status": "ready"}
        return JSONResponse({"status": "shutting down" if state.draining else "loading"}, status_code=503)

    @app.get("/metrics", dependencies=protected, responses={**auth_responses, 200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests, errors, latency, batch sizes."""
        metrics.queued.set(batcher.queued_texts)
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    add_hf_routes(app, predictor, batcher, settings, protected, work_responses)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _key_checker(expected: str) -> Any:
    """A dependency that accepts the key in `X-API-Key` or as `Authorization: Bearer KEY`."""
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key.")
    bearer = HTTPBearer(auto_error=False, description="The server's API key as a bearer token.")
    want = expected.encode()

    async def check(key: str | None = Security(header), cred: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        given = key if key is not None else (cred.credentials if cred is not None else None)
        if given is None or not secrets.compare_digest(given.encode(), want):
            raise HTTPException(
                401, "missing or wrong API key: send it in the X-API-Key header", headers={"WWW-Authenticate": "Bearer"}
            )

    return check


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("textclass")
    except PackageNotFoundError:
        return "0"
