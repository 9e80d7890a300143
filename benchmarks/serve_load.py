"""`textclass serve` vs a naive FastAPI endpoint that runs the model once per request, under the same load.

The naive server is what most projects write first: a FastAPI `def` endpoint (run in FastAPI's thread
pool) that calls a transformers `pipeline("text-classification")` per request — for a run directory with
the `hf` head, which `pipeline()` loads. For a `linear`-head run it calls our own predictor per request
instead (`--naive predictor`): same model, no batching.

Both servers run as subprocesses on 127.0.0.1 with the same model and texts; one load generator (raw
HTTP/1.1 keep-alive connections on asyncio) keeps `--clients` requests in flight until `--requests` are
answered (or `--max-seconds` pass), one text per request. Then schemathesis fuzzes our `/openapi.json`
and the server's own Prometheus counters say how many 5xx it answered. Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/serve_load.py --model runs/demo_hf --requests 1500 --clients 32 \
        --serve "--backend torch" --serve "--backend torch --threads 1" --serve "--backend onnx"
    python benchmarks/serve_load.py --model runs/demo --naive predictor

The machine's cores are shared by server and load generator alike (and, when measured for the README, by
other work): compare the two columns of one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

RESULTS = Path(__file__).parent / "results"
HERE = Path(__file__).resolve()


# --- the naive server (runs in its own process: `serve_load.py --naive-server ...`) ---------------------------


class Body(BaseModel):
    """The naive server's request (module level: FastAPI resolves the handler's string annotations here)."""

    texts: list[str]


def naive_app(model_dir: str, mode: str) -> Any:
    from fastapi import FastAPI

    app = FastAPI()
    if mode == "pipeline":
        from transformers import pipeline

        from textclass.rundir import read_run_config

        max_length = read_run_config(Path(model_dir)).model.max_length
        pipe = pipeline("text-classification", model=model_dir, top_k=None)

        @app.post("/classify")
        def classify(body: Body) -> dict:  # a plain `def`: FastAPI runs it in its thread pool, one call per request
            out = pipe(body.texts, truncation=True, max_length=max_length)
            return {"results": [{"label": r[0]["label"], "scores": {d["label"]: d["score"] for d in r}} for r in out]}

    else:
        from textclass.inference.load import load_predictor

        predictor = load_predictor(model_dir, backend="torch")

        @app.post("/classify")
        def classify(body: Body) -> dict:  # type: ignore[no-redef]
            return {"results": predictor.predict(body.texts)}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app


# --- the load generator ---------------------------------------------------------------------------------------


def lead_texts(kind: str) -> list[str]:
    """BBC News test articles: `lead` = headline and first paragraph (a typical request), `article` = the whole text."""
    from textclass.data.builtin import load_builtin

    texts = load_builtin("bbc-news")["test"]["text"].tolist()
    if kind == "article":
        return texts
    return [" ".join([p.strip() for p in t.split("\n") if p.strip()][:2]) for t in texts]


class Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: the load generator's whole client.

    Hand-written instead of httpx because the load generator shares this machine's two cores with the
    server it measures: against `textclass serve` httpx spent 3.4-4.1 ms of CPU per request, this client
    0.07 ms (time.process_time over 600 requests each, twice), and the server's requests/s went from 141-161
    to 342 once the client stopped taking most of a core.
    This client sends a fixed request and reads a Content-Length response (uvicorn answers JSON that way).
    Anything else counts as an error and reconnects.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        assert self.reader is not None
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        length = headers.get("content-length")
        if length is None:
            raise ConnectionError("response without Content-Length")
        return status, await self.reader.readexactly(int(length))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(url: str, path: str, texts: list[str], clients: int, requests: int, max_seconds: float) -> dict:
    from urllib.parse import urlsplit

    where = urlsplit(url)
    bodies = [json.dumps({"texts": [t]}).encode() for t in texts]
    latencies: list[float] = []
    labels: dict[int, str] = {}
    errors = 0
    counter = 0
    started = time.perf_counter()

    async def client() -> None:
        nonlocal counter, errors
        conn = Connection(where.hostname or "127.0.0.1", where.port or 80)
        while counter < requests and time.perf_counter() - started < max_seconds:
            i = counter
            counter += 1
            t0 = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(conn.post(path, bodies[i % len(texts)]), 60)
                ok = status == 200
                if ok:
                    labels[i % len(texts)] = json.loads(body)["results"][0]["label"]
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, KeyError):
                ok = False
                conn.close()
            latencies.append(time.perf_counter() - t0)
            errors += not ok
        conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "rps": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "errors": errors,
        "labels": labels,
    }


def start(cmd: list[str], url: str, ready_path: str, timeout: float = 300) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}\n{proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(url + ready_path, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not become ready: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_5xx(url: str) -> int:
    """5xx answers counted by the server itself (textclass_request_errors_total)."""
    import httpx

    total = 0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("textclass_request_errors_total{") and 'status="5' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def measure(args: argparse.Namespace, name: str, cmd: list[str], url: str, ready: str, path: str, texts: list[str]) -> tuple[dict, subprocess.Popen]:
    print(f"[{name}] starting: {' '.join(cmd)}", flush=True)
    proc = start(cmd, url, ready)
    asyncio.run(load(url, path, texts, args.clients, min(64, args.requests), 60))  # warm-up, not counted
    print(f"[{name}] {args.requests} requests from {args.clients} clients...", flush=True)
    result = asyncio.run(load(url, path, texts, args.clients, args.requests, args.max_seconds))
    print(f"[{name}] {result['rps']} req/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, errors {result['errors']}", flush=True)
    return result, proc


def run_schemathesis(url: str, seconds: int) -> dict:
    exe = Path(sys.executable).parent / "schemathesis"
    cmd = [str(exe), "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-time", str(seconds),
           "--workers", "1", "--request-timeout", "30", "--phases", "examples,coverage,fuzzing"]
    print(f"[schemathesis] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300)
    summary = [l for l in proc.stdout.splitlines() if "generated" in l or "failure" in l.lower()]
    return {"exit_code": proc.returncode, "summary": summary[-3:], "tail": proc.stdout[-1500:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo_hf", help="Run directory (an `hf`-head run for --naive pipeline).")
    p.add_argument("--naive", choices=["auto", "pipeline", "predictor"], default="auto", help="auto: pipeline for hf-head runs.")
    p.add_argument("--serve", action="append", default=None, metavar="ARGS",
                   help="Extra `textclass serve` options for one variant, e.g. --serve '--backend torch --threads 1'; "
                        "repeat for several variants (default: one, '--backend torch').")
    p.add_argument("--requests", type=int, default=1500, help="Requests per server (bounded).")
    p.add_argument("--clients", type=int, default=32, help="Concurrent clients.")
    p.add_argument("--max-seconds", type=float, default=240, help="Stop sending after this long per server.")
    p.add_argument("--texts", choices=["lead", "article"], default="lead", help="Headline+first paragraph, or whole articles.")
    p.add_argument("--schemathesis-seconds", type=int, default=120, help="Fuzz the first variant this long; 0 skips.")
    p.add_argument("--port", type=int, default=8771)
    # internal: run the naive server in this process
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.naive_server:
        import uvicorn

        uvicorn.run(naive_app(args.model, args.naive), host="127.0.0.1", port=args.port, log_level="warning")
        return

    from textclass.rundir import read_run_config

    cfg = read_run_config(Path(args.model))
    mode = args.naive if args.naive != "auto" else ("pipeline" if cfg.model.head == "hf" else "predictor")
    if mode == "pipeline" and cfg.model.head != "hf":
        raise SystemExit(f"{args.model}: --naive pipeline needs an `hf`-head run (train with --set model.head=hf)")
    variants = args.serve or ["--backend torch"]
    texts = lead_texts(args.texts)
    py = sys.executable
    url_naive = f"http://127.0.0.1:{args.port}"
    naive_cmd = [py, str(HERE), "--naive-server", "--model", args.model, "--naive", mode, "--port", str(args.port)]
    naive, proc = measure(args, f"naive {mode}", naive_cmd, url_naive, "/health", "/classify", texts)
    stop(proc)

    import httpx

    results: list[dict] = []
    schema: dict = {"skipped": True}
    for n, extra in enumerate(variants):
        url = f"http://127.0.0.1:{args.port + 1 + n}"
        cmd = [py, "-m", "textclass.cli", "serve", "--model", args.model, "--port", str(args.port + 1 + n), *extra.split()]
        ours, proc = measure(args, f"serve {extra or '(defaults)'}", cmd, url, "/ready", "/v1/classify", texts)
        try:
            metrics = httpx.get(url + "/metrics", timeout=10).text
            batches = {l.split(" ")[0]: float(l.split(" ")[1]) for l in metrics.splitlines() if l.startswith("textclass_batch_size_")}
            ours["mean_batch"] = round(batches["textclass_batch_size_sum"] / max(1.0, batches["textclass_batch_size_count"]), 1)
            if n == 0 and args.schemathesis_seconds:
                before = server_5xx(url)
                schema = run_schemathesis(url, args.schemathesis_seconds)
                schema["server_5xx"] = server_5xx(url) - before
                schema["variant"] = extra or "(defaults)"
        finally:
            stop(proc)
        same = [i for i in ours["labels"] if i in naive["labels"]]
        ours["label_agreement"] = round(float(np.mean([ours["labels"][i] == naive["labels"][i] for i in same])), 4) if same else None
        ours["throughput_ratio"] = round(ours["rps"] / naive["rps"], 2) if naive["rps"] else None
        ours["variant"] = extra or "(defaults)"
        results.append(ours)

    print(f"\nmodel {args.model} ({cfg.model.name}, max_length {cfg.model.max_length}), {args.clients} clients, 1 text per "
          f"request ({args.texts} texts), naive = FastAPI + {mode} per request, os.cpu_count() = {os.cpu_count()}")
    width = max(18, *(len(r["variant"]) + 8 for r in results))
    print(f"{'':<24}{'naive':>12}" + "".join(f"{'serve ' + r['variant']:>{width}}" for r in results))
    rows = [("requests", "requests"), ("req/s", "rps"), ("p50 latency (ms)", "p50_ms"), ("p99 latency (ms)", "p99_ms"),
            ("errors", "errors"), ("throughput vs naive", "throughput_ratio"), ("mean batch size", "mean_batch"),
            ("labels = naive's", "label_agreement")]
    for title, key in rows:
        print(f"{title:<24}{naive.get(key, '')!s:>12}" + "".join(f"{r.get(key)!s:>{width}}" for r in results))
    if not schema.get("skipped"):
        print(f"schemathesis ({schema['variant']}): exit {schema['exit_code']}; {' | '.join(schema['summary'])}; "
              f"5xx counted by the server: {schema['server_5xx']}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "serve_load.json"
    for r in (naive, *results):
        r.pop("labels")
    out.write_text(json.dumps({"model": args.model, "naive_mode": mode, "args": vars(args), "naive": naive, "serve": results,
                               "schemathesis": schema}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
