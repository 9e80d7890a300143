"""The `onnx` prediction backend: ONNX Runtime on the file `textclass export` wrote.

Only the tokenizer is read from the run directory; the forward pass is ONNX Runtime on numpy arrays (no
PyTorch module is built, no weights are loaded into torch), and nothing here imports training code.

The export lives in `RUN_DIR/onnx/`: `model.onnx` (fp32, graph-optimised with `--optimize`),
`model.int8.onnx` (with `--int8`) and `export.json`, which records the graph's input names, how batches are
laid out (`padded`: `input_ids` + `attention_mask` [+ `token_type_ids`]; `bags`: fastText's flat
`input_ids` + `offsets`), the files, which one the backend uses by default, and the parity numbers.
Graph outputs: `logits` (batch, num_labels) and `probabilities` (softmax, or sigmoid for multi-label runs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from textclass.config import Config
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.inference.predictor import BasePredictor
from textclass.models.registry import Family, get_family

ONNX_DIR = "onnx"
EXPORT_FILE = "export.json"
VARIANTS = ("fp32", "int8")


def export_record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / ONNX_DIR / EXPORT_FILE


def has_export(run_dir: str | Path) -> bool:
    """True when `textclass export` finished for this run directory (export.json is written last)."""
    return export_record_path(run_dir).is_file()


def read_export_record(run_dir: str | Path) -> dict[str, Any]:
    path = export_record_path(run_dir)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record["files"], record["inputs"], record["layout"]  # noqa: B018 - the keys every reader needs
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: unreadable export record; run `textclass export --model {Path(run_dir)}` again") from None
    return record


def load_tokenizer(family: Family, run_dir: Path) -> Any:
    """The tokenizer alone (the family's `load` would also build the PyTorch model, which ONNX does not need)."""
    if family.name == "encoder":
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(run_dir)
        except (OSError, ValueError) as err:
            raise UserError(f"{run_dir}: the tokenizer files are missing or damaged ({type(err).__name__})") from None
    from textclass.text import TOKENIZER_FILE, TextTokenizer

    return TextTokenizer.load(run_dir / TOKENIZER_FILE)


def onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def require_onnx(what: str) -> None:
    """A one-line UserError when the optional ONNX packages are missing."""
    if not onnx_available():
        raise UserError(f"{what} needs onnxruntime; install it with: pip install 'textclass[onnx]'")


def make_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session; a missing, corrupt or truncated file is a one-line UserError."""
    require_onnx("the onnx backend")
    import onnxruntime as ort

    if not path.is_file():
        raise UserError(f"{path}: ONNX file missing; run `textclass export --model {path.parent.parent}` again")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: the graph rewriter's notes are not the user's business
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        msg = " ".join(str(err).split())[:160]
        raise UserError(
            f"{path}: not a valid ONNX model (corrupt or truncated: {msg}); run `textclass export --model "
            f"{path.parent.parent}` again"
        ) from None


class OnnxPredictor(BasePredictor):
    """Same interface and outputs as the torch `Predictor`; the forward pass runs in ONNX Runtime."""

    backend = "onnx"

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        family: Family,
        cfg: Config,
        labels: LabelSet,
        record: dict[str, Any],
        batch_size: int = 32,
        variant: str = "fp32",
        path: Path | None = None,
    ) -> None:
        self.session = session
        self.path = path
        self.tokenizer = tokenizer
        self.family = family
        self.cfg = cfg
        self.labels = labels
        self.batch_size = batch_size
        self.record = record
        self.variant = variant
        self.inputs: list[str] = list(record["inputs"])
        self.layout: str = record["layout"]
        self.pad_id: int = int(record.get("pad_id", 0))

    def _collate_batch(self, features: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Pad with numpy (no torch tensors): the graph takes int64 arrays named as in export.json."""
        if self.layout == "bags":  # fastText: flat ids + start offset of each text
            lengths = [len(f["input_ids"]) for f in features]
            offsets = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
            flat = np.fromiter((i for f in features for i in f["input_ids"]), dtype=np.int64)
            return {"input_ids": flat, "offsets": offsets}
        if self.family.name == "encoder":
            batch = self.tokenizer.pad(features, padding=True, return_tensors="np")
            return {k: np.asarray(batch[k], dtype=np.int64) for k in self.inputs}
        width = max([len(f["input_ids"]) for f in features] + [1])
        ids = np.full((len(features), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(features), width), dtype=np.int64)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = f["input_ids"]
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _forward(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["probabilities"], batch)[0]


def load_onnx_predictor(
    run_dir: str | Path, batch_size: int = 32, threads: int | None = None, variant: str | None = None
) -> OnnxPredictor:
    """Load the exported model of a run directory (the record's default file unless `variant` says)."""
    from textclass.rundir import LABELS_FILE, check_run_dir, read_run_config

    path = check_run_dir(run_dir)
    record = read_export_record(path)
    variant = variant or record.get("default", "fp32")
    if variant not in VARIANTS:
        raise UserError(f"variant: unknown ONNX variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if variant not in record["files"]:
        raise UserError(f"{path}: no {variant} ONNX export; run `textclass export --model {path}{' --int8' if variant == 'int8' else ''}`")
    cfg = read_run_config(path)
    labels = LabelSet.load(path / LABELS_FILE)
    family = get_family(cfg.model.family)
    file = path / ONNX_DIR / record["files"][variant]
    session = make_session(file, threads)
    tokenizer = load_tokenizer(family, path)
    return OnnxPredictor(session, tokenizer, family, cfg, labels, record, batch_size=batch_size, variant=variant, path=file)


def graph_parameter_count(predictor: OnnxPredictor) -> int:
    """Number of weight values (initializers) in the loaded ONNX file, for `textclass info`."""
    import onnx

    graph = onnx.load(str(predictor.path), load_external_data=False).graph
    return int(sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type != onnx.TensorProto.INT64))
