"""The `onnx` prediction backend: ONNX Runtime on the file `textclass export` wrote.

Only the tokenizer is read from the run directory; the forward pass is ONNX Runtime on numpy arrays (no
PyTorch module is built, no weights are loaded into torch), and nothing here imports training code. For
encoders nothing imports torch at all: texts are encoded by the `tokenizers` library (the Rust fast tokenizer
from the run's `tokenizer.json`, batched and multi-threaded) with the same truncation as training; the
export's parity check runs through this path, so a tokenisation difference would fail the export. That
keeps an ONNX-serving process about 220 MB smaller than one that imports torch (measured with
benchmarks/inference.py). The small family encodes with its own tokenizer, whose module imports torch.

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

from textclass.batching import BatchEncoder
from textclass.config import Config
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.inference.predictor import BasePredictor
from textclass.rundir import EXPORT_FILE, HF_TOKENIZER_FILE, ONNX_DIR, check_run_dir, read_labels, read_run_config

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


# Characters kept per wanted token before tokenizing long single texts (English WordPiece averages ~4.5);
# a prefix that falls short is simply re-encoded whole, so this only trades speed, never correctness.
PREFIX_CHARS_PER_TOKEN = 8


class RustEncoder:
    """An encoder run's tokenizer through the `tokenizers` library: what `EncoderFamily.encode` + the
    collator compute (truncation to max_length, longest-first for pairs; padding to the batch's longest)."""

    def __init__(self, path: Path, max_length: int, pad_id: int, padding_side: str, names: list[str]) -> None:
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for unreadable JSON
            raise UserError(f"{path}: the tokenizer file is missing or damaged ({' '.join(str(err).split())[:120]})") from None
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=max_length, strategy="longest_first")
        self.max_length = max_length
        self.pad_id = pad_id
        self.left = padding_side == "left"
        self.names = names

    def features(self, texts: list[str], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        enc = self.encode(texts, pairs)
        return [{k: enc[k][i] for k in self.names} for i in range(len(texts))]

    def collate(self, features: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return self.pad(features, self.names)

    def encode(self, texts: list[str], pairs: list[str] | None) -> dict[str, list]:
        if pairs is not None:
            batch = self.tok.encode_batch(list(zip(texts, pairs, strict=False)))
        else:
            batch = self._encode_prefixes(texts)
        return {
            "input_ids": [e.ids for e in batch],
            "attention_mask": [e.attention_mask for e in batch],
            "token_type_ids": [e.type_ids for e in batch],
        }

    def _encode_prefixes(self, texts: list[str]) -> list[Any]:
        """Encode only a whitespace-bounded prefix of long texts: the same ids, less tokenizing.

        The tokenizer would tokenize a whole 2,300-character article to keep its first 128 tokens: on the
        bbc-news test set the prefix halves tokenizing (0.31 instead of 0.66 ms per text in batches). A
        prefix that ends just before whitespace tokenizes to a prefix of the full text's tokens for the
        whitespace-splitting pre-tokenizers of BERT, RoBERTa/GPT-2 byte-level BPE and SentencePiece's
        Metaspace, so when the prefix alone overflows `max_length` the result is exactly the full text's.
        Texts whose prefix does not overflow it (long URLs, no spaces at all, as in Chinese) are encoded
        whole. The tokenizers library has no such option (it truncates only after tokenizing).
        """
        budget = PREFIX_CHARS_PER_TOKEN * self.max_length
        cut = []
        for text in texts:
            space = text.rfind(" ", 0, budget) if len(text) > budget else -1
            cut.append(text[:space] if space > 0 else text)
        batch = self.tok.encode_batch(cut)
        redo = [i for i, e in enumerate(batch) if len(cut[i]) < len(texts[i]) and not e.overflowing]
        for i, e in zip(redo, self.tok.encode_batch([texts[i] for i in redo]) if redo else [], strict=True):
            batch[i] = e
        return batch

    def pad(self, features: list[dict[str, Any]], names: list[str]) -> dict[str, np.ndarray]:
        width = max(len(f["input_ids"]) for f in features)
        out = {}
        for name in names:
            fill = self.pad_id if name == "input_ids" else 0
            arr = np.full((len(features), width), fill, dtype=np.int64)
            for row, f in enumerate(features):
                seq = f[name]
                if self.left:
                    arr[row, width - len(seq) :] = seq
                else:
                    arr[row, : len(seq)] = seq
            out[name] = arr
        return out


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


class _NumpyBatches:
    """The model object's own encoding (a family without a torch-free tokenizer), batches as int64 arrays."""

    def __init__(self, model: Any, names: list[str]) -> None:
        self.model = model
        self.names = names

    def features(self, texts: list[str], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        return self.model.features(texts, pairs)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        batch = self.model.collate(features)
        return {k: np.asarray(batch[k], dtype=np.int64) for k in self.names}


class OnnxPredictor(BasePredictor):
    """Same interface and outputs as the torch `Predictor`; the forward pass runs in ONNX Runtime."""

    backend = "onnx"

    def __init__(
        self,
        session: Any,
        encoder: BatchEncoder,
        cfg: Config,
        labels: LabelSet,
        batch_size: int = 32,
        variant: str = "fp32",
        path: Path | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size: {batch_size} must be at least 1 text per batch")
        self.session = session
        self.encoder = encoder
        self.cfg = cfg
        self.labels = labels
        self.batch_size = batch_size
        self.variant = variant
        self.path = path

    def _forward(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["probabilities"], batch)[0]

    def parameter_counts(self) -> tuple[int, int]:
        """Weight values (initializers) in the loaded ONNX file; a graph has no trainable/frozen split."""
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph
        n = int(sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type != onnx.TensorProto.INT64))
        return n, n


def onnx_encoder(run_dir: Path, cfg: Config, labels: LabelSet, record: dict[str, Any]) -> BatchEncoder:
    """How the ONNX backend turns texts into the graph's inputs, as the export recorded it.

    `tokenizers`: the run's tokenizer.json through the Rust `tokenizers` library, torch-free. Otherwise the
    family's own tokenizer and padding (its modules import torch); exports made before the record said so
    take this path too.
    """
    names = list(record["inputs"])
    if record.get("text_encoding") == "tokenizers":
        max_length = int(cfg.model.max_length)
        path = run_dir / HF_TOKENIZER_FILE
        return RustEncoder(path, max_length, int(record.get("pad_id", 0)), record.get("padding_side", "right"), names)
    from textclass.rundir import load_model_parts

    return _NumpyBatches(load_model_parts(run_dir, cfg, labels, network=False), names)


def load_onnx_predictor(
    run_dir: str | Path, batch_size: int = 32, threads: int | None = None, variant: str | None = None
) -> OnnxPredictor:
    """Load the exported model of a run directory (the record's default file unless `variant` says)."""
    path = check_run_dir(run_dir)
    record = read_export_record(path)
    variant = variant or record.get("default", "fp32")
    if variant not in VARIANTS:
        raise UserError(f"variant: unknown ONNX variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if variant not in record["files"]:
        raise UserError(
            f"{path}: no {variant} ONNX export; run `textclass export --model {path}{' --int8' if variant == 'int8' else ''}`"
        )
    cfg = read_run_config(path)
    labels = read_labels(path)
    file = path / ONNX_DIR / record["files"][variant]
    session = make_session(file, threads)
    encoder = onnx_encoder(path, cfg, labels, record)
    return OnnxPredictor(session, encoder, cfg, labels, batch_size=batch_size, variant=variant, path=file)
