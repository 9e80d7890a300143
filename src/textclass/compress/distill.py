"""Knowledge distillation: a student of any family trained on the soft labels of teacher runs of any family.

`textclass distill --teacher RUN [--teacher RUN ...] --config student.yaml` (or `textclass.distill`):

1. The teachers are read from their run directories (k-fold ensembles included) and stay in eval mode.
2. Their logits on the student's training texts and on `data.unlabeled` texts are computed ONCE, in
   inference mode (no gradients, no autocast), and cached on disk by teacher and texts; several teachers
   are combined like a k-fold ensemble's members (log of the mean softmax; logit of the mean sigmoid).
3. The student trains through the ordinary training path (`training.run.train_run`: every trick, resume,
   checkpoints), its loss `alpha * hard + (1 - alpha) * T² * soft` (`training.losses.DistillationLoss`);
   unlabeled texts have no hard term.
4. Self-distillation (`distill.student.from_teacher`): the student is the teacher's own model with only the
   chosen transformer layers (embeddings, those layers and the head copied, never a random start), and
   the outputs of matched layers are also pulled together by MSE, the teacher run on the same batch
   without gradients (`HiddenMatcher`).

The result is an ordinary run directory; metrics.json's `distill` entry names the teachers and their scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from textclass.config import Config, DataConfig, DistillConfig, apply_overrides, build_config, read_config_file
from textclass.data.builtin import is_builtin, load_builtin
from textclass.data.frames import text_columns
from textclass.data.labels import LabelSet
from textclass.data.prepare import PreparedData, check_columns, clean_texts, text_keys
from textclass.data.readers import read_table
from textclass.errors import UserError
from textclass.fileio import atomic_write, cache_dir
from textclass.models.base import TextModel
from textclass.models.ensemble import mean_logits
from textclass.rundir import CHECKPOINTS_DIR, EVAL_DIR, ONNX_DIR, TENSORBOARD_DIR, check_run_dir, load_model, read_metrics
from textclass.training import distributed
from textclass.training.losses import DistillationLoss
from textclass.training.run import (
    TrainResult,
    build_loss,
    build_model,
    default_run_dir,
    start_run,
    train_run,
    vocabulary_texts,
)
from textclass.training.trainer import ExtraTargets, encoding_code_version, tokenizer_fingerprint

log = logging.getLogger("textclass")


def distill_config(
    teachers: Sequence[str | Path],
    config: str | Path | dict | None = None,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
) -> Config:
    """The student's config: `config` (a file, a dict or nothing) with the teachers in `distill.teachers`.

    A config whose data section names no data (`train` or `dataset`) trains on the first teacher's data, its
    own data keys (e.g. `unlabeled`) on top; with `distill.student.from_teacher`
    the model section is the teacher's (and a config that gives one is refused: the student is that model).
    """
    raw: dict[str, Any]
    if isinstance(config, dict):
        raw = json.loads(json.dumps(config))
    elif config is not None:
        raw = read_config_file(config)[0]
    else:
        raw = {}
    if raw.get("distill") is None:  # absent, or `distill:` left empty in the YAML file
        raw["distill"] = {}
    distill = raw["distill"]
    if teachers and isinstance(distill, dict):
        distill["teachers"] = [str(t) for t in teachers]
    # overrides first, so that a --set model.x counts as a model section
    raw = apply_overrides(raw, (overrides or []) + ([f"training.output_dir={output}"] if output is not None else []))
    listed = distill.get("teachers") if isinstance(distill, dict) else None
    first = check_run_dir(listed[0]) if isinstance(listed, list) and listed and isinstance(listed[0], str) else None
    data = raw.get("data") if isinstance(raw.get("data"), dict) else None
    if first is not None and (data is None or not (data.get("train") or data.get("dataset"))):
        from textclass.rundir import read_run_config

        raw["data"] = read_run_config(first).data.model_dump(mode="json") | (data or {})
    cfg = build_config(raw, source=str(config) if isinstance(config, (str, Path)) else "config")
    if cfg.distill is None or not cfg.distill.teachers:
        raise UserError("distill.teachers: no teacher run; pass --teacher RUN (a run directory `textclass train` wrote)")
    if cfg.distill.student.from_teacher and "model" in raw:
        raise UserError(
            "model: with distill.student.from_teacher the student is the teacher's model with fewer layers; "
            "remove the model section (or set from_teacher: false to train a model of your own)"
        )
    return cfg


def run_distillation(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Distil `cfg.distill.teachers` into the student of `cfg`; returns the student run's `TrainResult`.

    Everything a user can get wrong (teacher folders, labels, data, layers) fails before the run directory
    is touched.
    """
    with distributed.session():
        return _distil(cfg, resume, overwrite)


def _distil(cfg: Config, resume: bool, overwrite: bool) -> TrainResult:
    d = cfg.distill
    if d is None or not d.teachers:
        raise UserError("distill.teachers: no teacher run; pass --teacher RUN (a run directory `textclass train` wrote)")
    paths = [check_run_dir(t) for t in d.teachers]
    teachers = [load_model(p) for p in paths]
    student: TextModel | None = None
    if d.student.from_teacher:
        student = student_from_teacher(paths[0], d.student.layers)
        cfg.model = student.cfg.model.model_copy(deep=True)
    if not cfg.training.output_dir:
        cfg.training.output_dir = f"{default_run_dir(cfg)}-student"
    family, run_dir, changes, data = start_run(cfg, resume)
    _check_output(run_dir, paths)
    columns = _teacher_columns(teachers, paths, data.labels)
    unlabeled = unlabeled_texts(cfg.data, data)
    if student is None:
        vocabulary = vocabulary_texts(pd.concat([data.train, unlabeled], ignore_index=True))
        student, hard = build_model(cfg, family, data, vocabulary)
    else:
        student.cfg = cfg
        student.network.train()
        hard = build_loss(cfg, data)
    loss = DistillationLoss(hard, d.alpha, d.temperature, data.labels.multi_label)
    pool = _training_pool(data, unlabeled)
    extra = soft_label_targets(teachers, paths, columns, pool, len(data.train), cfg.training.eval_batch_size)
    matcher = None
    if d.student.from_teacher and d.hidden_weight > 0:  # after the logits: its hooks would keep their states
        matcher = HiddenMatcher(student.network, teachers[0].network, hidden_matches(cfg, teachers[0]), d.hidden_weight)
        extra.auxiliary_loss = matcher
    record = {"distill": _record(cfg, paths, teachers, len(data.train), len(unlabeled))}
    log.info(
        "distilling %d teacher(s) into a %s student: %d labeled + %d unlabeled texts, alpha %.2g, T %.2g",
        len(teachers),
        cfg.model.family,
        len(data.train),
        len(unlabeled),
        d.alpha,
        d.temperature,
    )
    try:
        return train_run(student, loss, replace(data, train=pool), run_dir, resume, overwrite, changes, extra, record)
    finally:
        if matcher is not None:
            matcher.remove()


# -- teachers --------------------------------------------------------------------------------------------------
def _check_output(run_dir: Path, teachers: list[Path]) -> None:
    """The student's folder must not be, hold or lie inside a teacher's: --overwrite would delete the teacher."""
    out = run_dir.resolve()
    for t in teachers:
        t = t.resolve()
        if out == t or out in t.parents or t in out.parents:
            raise UserError(f"{run_dir}: is (or overlaps) the teacher run {t}; choose another --output for the student")


def _teacher_columns(teachers: list[TextModel], paths: list[Path], labels: LabelSet) -> list[list[int]]:
    """Per teacher, its logit columns in the student's label order; refuses teachers of another label set."""
    out = []
    for teacher, path in zip(teachers, paths, strict=True):
        names = teacher.labels.names
        if teacher.multi_label != labels.multi_label or sorted(names) != sorted(labels.names):
            kind = "multi-label" if teacher.multi_label else "single-label"
            raise UserError(
                f"{path}: the teacher was trained on other labels ({kind}: {', '.join(names[:10])}) than the student's "
                f"data has ({', '.join(labels.names[:10])}); distil on data with the teacher's label set"
            )
        out.append([names.index(n) for n in labels.names])
    return out


def soft_label_targets(
    teachers: list[TextModel],
    paths: list[Path],
    columns: list[list[int]],
    frame: pd.DataFrame,
    labeled: int,
    batch_size: int,
    auxiliary_loss: HiddenMatcher | None = None,
) -> ExtraTargets:
    """What a distilled student learns from besides its labels: the teachers' logits for every row of `frame`
    (the first `labeled` rows have gold labels, the rest none) and, for self-distillation, the hidden matches."""
    with distributed.main_process_first():  # rank 0 computes and caches the logits, the other ranks read them
        logits = teacher_logits(teachers, paths, columns, frame, batch_size)
    return ExtraTargets({"teacher_logits": logits, "labeled": np.arange(len(frame)) < labeled}, auxiliary_loss=auxiliary_loss)


def distillation_from(source: Path, data: PreparedData, hard: nn.Module, batch_size: int) -> tuple[nn.Module, ExtraTargets]:
    """The loss and targets of training on `data.train` with the run at `source` as teacher, at the default
    alpha and temperature (pruning's `--recover-from-teacher`: the unpruned model teaches the pruned one)."""
    teacher = load_model(source)
    columns = _teacher_columns([teacher], [source], data.labels)
    defaults = DistillConfig()
    loss = DistillationLoss(hard, defaults.alpha, defaults.temperature, data.labels.multi_label)
    return loss, soft_label_targets([teacher], [source], columns, data.train, len(data.train), batch_size)


def _teacher_fingerprint(path: Path) -> str:
    """What identifies a teacher's weights without reading them: every model file's name, size and mtime."""
    skip = {EVAL_DIR, ONNX_DIR, TENSORBOARD_DIR, CHECKPOINTS_DIR}
    files = sorted(f for f in path.rglob("*") if f.is_file() and not skip & set(f.relative_to(path).parts))
    stats = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps([str(path.resolve()), stats])


def teacher_logits(
    teachers: list[TextModel], paths: list[Path], columns: list[list[int]], frame: pd.DataFrame, batch_size: int
) -> np.ndarray:
    """The teachers' combined logits (float32, rows of `frame`, the student's label order), computed once
    without gradients and cached on disk (keyed by the teachers' files and the texts)."""
    texts, pairs = text_columns(frame)
    h = hashlib.sha256()
    for p, teacher, cols in zip(paths, teachers, columns, strict=True):
        h.update(_teacher_fingerprint(p).encode())
        # how the teacher turns texts into ids, and the code that does it: a changed encoding is new logits
        h.update(encoding_code_version(teacher).encode())
        h.update(tokenizer_fingerprint(teacher.tokenizer).encode())
        h.update(json.dumps(cols).encode())
    h.update(json.dumps([texts, pairs], ensure_ascii=False).encode())
    cached = cache_dir() / "teacher_logits" / f"{h.hexdigest()[:32]}.npy"
    if cached.is_file():
        log.info("teacher logits: read from the cache (%s)", cached)
        return np.load(cached)
    outputs = []
    for i, (teacher, cols) in enumerate(zip(teachers, columns, strict=True)):
        log.info("teacher %d/%d (%s): logits of %d texts", i + 1, len(teachers), paths[i], len(texts))
        if torch.cuda.is_available():  # this process's GPU (under torchrun: its local rank's)
            teacher.network.to(torch.device("cuda", torch.cuda.current_device()))
        outputs.append(teacher.predict_logits(texts, pairs, batch_size=batch_size, progress=True)[:, cols])
    first = teachers[0]
    logits = outputs[0] if len(outputs) == 1 else mean_logits([torch.from_numpy(o) for o in outputs], first.multi_label).numpy()
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, lambda tmp: _save_array(tmp, logits))
    return logits


def _save_array(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save given a name would append ".npy" to it
        np.save(f, array)


def _record(cfg: Config, paths: list[Path], teachers: list[TextModel], n_labeled: int, n_unlabeled: int) -> dict[str, Any]:
    """metrics.json's `distill` entry: the teachers (folder, family, parameters, scores) and the settings."""
    d = cfg.distill
    assert d is not None
    entries: list[dict[str, Any]] = []
    for path, teacher in zip(paths, teachers, strict=True):
        m = read_metrics(path)
        entries.append(
            {
                "run_dir": str(path.resolve()),
                "family": teacher.cfg.model.family,
                "parameters": teacher.parameter_counts()[0],
                **{split: m[split] for split in ("valid", "test", "oof") if split in m},
            }
        )
    return {
        "teachers": entries,
        "alpha": d.alpha,
        "temperature": d.temperature,
        "labeled_texts": n_labeled,
        "unlabeled_texts": n_unlabeled,
        "from_teacher": d.student.from_teacher,
    }


# -- data ----------------------------------------------------------------------------------------------------
def unlabeled_texts(cfg: DataConfig, data: PreparedData) -> pd.DataFrame:
    """`data.unlabeled`: texts (and second texts) without labels, minus any text of train/valid/test.

    A built-in data set's name gives its training texts, so a run that trains on part of them can learn
    from the rest. Texts that also occur in the run's own splits are dropped (normalised comparison): a
    test text must never reach training, even unlabeled.
    """
    if not cfg.unlabeled:
        return data.train.iloc[:0][[c for c in ("text", "text_pair") if c in data.train.columns]]
    if is_builtin(cfg.unlabeled):
        if data.has_pairs:
            raise UserError(f"data.unlabeled: the built-in set {cfg.unlabeled!r} has single texts, this run text pairs")
        frame = load_builtin(cfg.unlabeled)["train"][["text"]].reset_index(drop=True)
        source = f"{cfg.unlabeled}:train"
    else:
        path = Path(cfg.unlabeled)
        if not path.exists():
            raise UserError(f"data.unlabeled: {path} not found; give a file of texts or a built-in data set's name")
        raw = read_table(str(path), "auto", cfg.encoding)
        check_columns(raw, str(path), {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column})
        frame = clean_texts(raw, cfg, str(path)).reset_index(drop=True)
        source = str(path)
        if data.has_pairs != ("text_pair" in frame.columns):
            raise UserError(f"{path}: data.unlabeled must have the same text columns as the training data")
    keys = text_keys(frame)
    seen = set(pd.concat([text_keys(df) for df in (data.train, data.valid, data.test) if df is not None]))
    keep = ~keys.isin(seen) & ~keys.duplicated()
    dropped = int((~keep).sum())
    frame = frame[keep.to_numpy()].reset_index(drop=True)
    if cfg.unlabeled_limit is not None and len(frame) > cfg.unlabeled_limit:
        frame = frame.sample(n=cfg.unlabeled_limit, random_state=cfg.seed).reset_index(drop=True)
    log.info("unlabeled texts from %s: %d used (%d dropped: repeated, or in this run's splits)", source, len(frame), dropped)
    return frame


def _training_pool(data: PreparedData, unlabeled: pd.DataFrame) -> pd.DataFrame:
    """The labeled training rows, then the unlabeled ones (carrying the first label as a placeholder the
    loss never reads: `labeled` is false for them)."""
    if not len(unlabeled):
        return data.train
    placeholder = [[data.labels.names[0]]] * len(unlabeled)
    return pd.concat([data.train, unlabeled.assign(labels=placeholder)], ignore_index=True)


# -- self-distillation -----------------------------------------------------------------------------------------
def student_from_teacher(path: Path, layers: int | list[int] | None) -> TextModel:
    """A second copy of the teacher's model holding only the chosen layers: embeddings, those layers and
    the head keep the teacher's weights (a LoRA teacher's adapters merged), all of it trainable."""
    from textclass.models.surgery import keep_layers, transformer_layers

    student = load_model(path)
    student.prepare_surgery()
    count = len(transformer_layers(student.network))
    chosen = chosen_layers(layers, count)
    keep_layers(student, chosen)
    student.network.requires_grad_(True)
    log.info("student: the teacher's layers %s of %d (its embeddings and head copied)", chosen, count)
    return student


def chosen_layers(layers: int | list[int] | None, total: int) -> list[int]:
    """`distill.student.layers` as indices into the teacher's `total` layers: a count is spread evenly."""
    from textclass.models.surgery import evenly_spaced

    if isinstance(layers, int):
        if layers > total:
            raise UserError(f"distill.student.layers: {layers} layers asked, the teacher has {total}; give at most {total}")
        return evenly_spaced(total, layers)
    chosen = list(layers or [])
    if not chosen or chosen[-1] >= total:
        raise UserError(
            f"distill.student.layers: {chosen} asks for layer {chosen[-1] if chosen else '?'}; the teacher has 0 to {total - 1}"
        )
    return chosen


def hidden_matches(cfg: Config, teacher: TextModel) -> list[tuple[int, int]]:
    """`distill.hidden_matches`, or each student layer with the teacher layer it was copied from."""
    d = cfg.distill
    assert d is not None
    if d.hidden_matches:
        return [tuple(m) for m in d.hidden_matches]  # type: ignore[misc]
    from textclass.models.surgery import transformer_layers

    return list(enumerate(chosen_layers(d.student.layers, len(transformer_layers(teacher.network)))))


class HiddenMatcher:
    """Self-distillation's intermediate matches: MSE between matched layers' outputs, over real tokens.

    Forward hooks keep each matched student layer's output of the current forward pass; `__call__` then runs
    the teacher on the same batch without gradients (hooks on its matched layers) and returns
    `weight * mean over matches of MSE(student, teacher)`, padding positions left out.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, matches: list[tuple[int, int]], weight: float) -> None:
        from textclass.models.surgery import transformer_layers

        s_layers, t_layers = transformer_layers(student), transformer_layers(teacher)
        for s, t in matches:
            if not (0 <= s < len(s_layers) and 0 <= t < len(t_layers)):
                raise UserError(
                    f"distill.hidden_matches: [{s}, {t}] is out of range; the student has layers 0-{len(s_layers) - 1}, "
                    f"the teacher 0-{len(t_layers) - 1}"
                )
        self.matches, self.weight, self.teacher = matches, weight, teacher.eval()
        self.student_out: dict[int, torch.Tensor] = {}
        self.teacher_out: dict[int, torch.Tensor] = {}
        self.handles = [s_layers[s].register_forward_hook(self._keep(self.student_out, s)) for s in {s for s, _ in matches}]
        self.handles += [t_layers[t].register_forward_hook(self._keep(self.teacher_out, t)) for t in {t for _, t in matches}]

    @staticmethod
    def _keep(store: dict[int, torch.Tensor], index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v for k, v in inputs.items() if k not in ("teacher_logits", "labeled", "labels")}
        device = batch["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            self.teacher(**batch)
        mask = batch.get("attention_mask")
        losses = []
        for s, t in self.matches:
            diff = (self.student_out[s].float() - self.teacher_out[t].float()) ** 2
            if mask is not None:
                m = mask.unsqueeze(-1).to(diff.dtype)
                losses.append((diff * m).sum() / (m.sum() * diff.size(-1)).clamp(min=1.0))
            else:
                losses.append(diff.mean())
        self.student_out.clear()  # no activation (nor its graph) outlives the step
        self.teacher_out.clear()
        return self.weight * torch.stack(losses).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
