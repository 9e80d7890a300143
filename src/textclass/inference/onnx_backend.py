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

from textclass.config import Config
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.inference.predictor import BasePredictor
from textclass.rundir import LABELS_FILE, check_run_dir, read_run_config

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


# Characters kept per wanted token before tokenizing long single texts (English WordPiece averages ~4.5);
# a prefix that falls short is simply re-encoded whole, so this only trades speed, never correctness.
PREFIX_CHARS_PER_TOKEN = 8


class RustEncoder:
    """An encoder run's tokenizer through the `tokenizers` library: what `EncoderFamily.encode` + the
    collator compute (truncation to max_length, longest-first for pairs; padding to the batch's longest)."""

    def __init__(self, path: Path, max_length: int, pad_id: int, padding_side: str) -> None:
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

    def encode(self, texts: list[str], pairs: list[str] | None) -> dict[str, list]:
        if pairs is not None:
            batch = self.tok.encode_batch(list(zip(texts, pairs)))
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
        for i, e in zip(redo, self.tok.encode_batch([texts[i] for i in redo]) if redo else []):
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


class OnnxPredictor(BasePredictor):
    """Same interface and outputs as the torch `Predictor`; the forward pass runs in ONNX Runtime."""

    backend = "onnx"

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        family: Any,
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
        self._family_collate: Any = None  # built on first use: only tokenizers other than RustEncoder need it

    def _encode(self, texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        if not isinstance(self.tokenizer, RustEncoder):
            return super()._encode(texts, pairs)
        enc = self.tokenizer.encode(texts, pairs)
        return [{k: enc[k][i] for k in self.inputs} for i in range(len(texts))]

    def _collate_batch(self, features: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """int64 arrays named as in export.json: padded by `RustEncoder` without torch, else by the family's
        own collator (those tokenizers import torch anyway), so both backends batch exactly alike."""
        if isinstance(self.tokenizer, RustEncoder):
            return self.tokenizer.pad(features, self.inputs)
        if self._family_collate is None:
            self._family_collate = self.family.collator(self.tokenizer, self.cfg.model)
        batch = self._family_collate(features)
        return {k: np.asarray(batch[k], dtype=np.int64) for k in self.inputs}

    def _forward(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["probabilities"], batch)[0]


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
        raise UserError(f"{path}: no {variant} ONNX export; run `textclass export --model {path}{' --int8' if variant == 'int8' else ''}`")
    cfg = read_run_config(path)
    labels = LabelSet.load(path / LABELS_FILE)
    file = path / ONNX_DIR / record["files"][variant]
    session = make_session(file, threads)
    tokenizer, family = load_tokenizer(cfg, path, record)
    return OnnxPredictor(session, tokenizer, family, cfg, labels, record, batch_size=batch_size, variant=variant, path=file)


def graph_parameter_count(predictor: OnnxPredictor) -> int:
    """Number of weight values (initializers) in the loaded ONNX file, for `textclass info`."""
    import onnx

    graph = onnx.load(str(predictor.path), load_external_data=False).graph
    return int(sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type != onnx.TensorProto.INT64))


def load_tokenizer(cfg: Config, run_dir: Path, record: dict[str, Any]) -> tuple[Any, Any]:
    """(tokenizer, family) for the onnx backend; `family` is None where the encoding needs no family hook.

    Encoders with a `tokenizer.json` (every fast tokenizer) get the torch-free `RustEncoder`; otherwise the
    family's own tokenizer and `encode` are used (transformers' AutoTokenizer and the small family's
    modules import torch).
    """
    if cfg.model.family == "encoder" and (run_dir / "tokenizer.json").is_file() and "pad_id" in record:
        encoder = RustEncoder(run_dir / "tokenizer.json", cfg.model.max_length, int(record["pad_id"]), record.get("padding_side", "right"))
        return encoder, None
    from textclass.models.registry import get_family

    family = get_family(cfg.model.family)
    if cfg.model.family == "encoder":
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(run_dir), family
        except (OSError, ValueError) as err:
            raise UserError(f"{run_dir}: the tokenizer files are missing or damaged ({type(err).__name__})") from None
    from textclass.text import TOKENIZER_FILE, TextTokenizer

    return TextTokenizer.load(run_dir / TOKENIZER_FILE), family
