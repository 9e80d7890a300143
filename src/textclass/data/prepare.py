"""From config to clean train/valid/test frames and a label set.

Columns are mapped to `text`, optional `text_pair`, and `labels` (a list of names per row). Empty texts,
missing columns, one-class label columns and labels unseen in training are caught here, before a run
directory exists, so a user's mistake never leaves a half-made run behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from textclass.config import DataConfig
from textclass.data.builtin import is_builtin, load_builtin
from textclass.data.labels import LabelSet, label_to_str, split_label
from textclass.data.normalise import normalise
from textclass.data.readers import read_hub, read_table
from textclass.errors import UserError

log = logging.getLogger("textclass")


@dataclass
class PreparedData:
    """Clean splits (columns: text, [text_pair], labels) plus what we learned about them."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame | None
    labels: LabelSet
    audit: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def has_pairs(self) -> bool:
        return "text_pair" in self.train.columns


def _raw_splits(cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Read the configured sources: files, a built-in data set, or a hub data set."""
    if cfg.train:
        paths = {"train": cfg.train, "valid": cfg.valid, "test": cfg.test}
        frames = {k: read_table(v, cfg.format, cfg.encoding) for k, v in paths.items() if v}
        return frames, {k: str(v) for k, v in paths.items() if v}
    assert cfg.dataset is not None
    if is_builtin(cfg.dataset):
        frames = load_builtin(cfg.dataset)
    else:
        hub = read_hub(cfg.dataset, cfg.dataset_config)
        aliases = {"train": "train", "validation": "valid", "valid": "valid", "dev": "valid", "test": "test"}
        frames = {aliases[k]: v for k, v in hub.items() if k in aliases}
        if "train" not in frames:
            raise UserError(f"data.dataset {cfg.dataset!r}: no `train` split (has {', '.join(hub)})")
    return frames, {k: f"{cfg.dataset}:{k}" for k in frames}


# Separators a one-column table's header may hold: the file was split on the wrong one.
_SEPARATOR_HINTS = {
    ";": "looks like ';'-separated; re-save it with ',' (e.g. pd.read_csv(path, sep=';').to_csv(new_path, index=False))",
    "\t": "looks like tab-separated; rename it to .tsv (or set data.format: tsv)",
    ",": "looks like ','-separated; rename it to .csv (or set data.format: csv)",
}
_NUMBER = r"[-+]?(?:\d+(?:[.,]\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


def check_columns(df: pd.DataFrame, source: str, wanted: dict[str, str | None]) -> None:
    """Fail with the present columns listed when a configured column is missing, and with the likely
    separator when the whole header landed in one column."""
    for key, col in wanted.items():
        if col is not None and col not in df.columns:
            present = ", ".join(map(str, df.columns)) or "(none)"
            header = str(df.columns[0]) if len(df.columns) == 1 else ""
            hint = next((f"; the file {h}" for sep, h in _SEPARATOR_HINTS.items() if sep in header), "")
            raise UserError(f"{source}: no column {col!r} (data.{key}); columns present: {present}{hint}")


def _text_columns(cfg: DataConfig) -> dict[str, tuple[str, str]]:
    """`text`/`text_pair` -> (configured column, its config key)."""
    cols = {"text": (cfg.text_column, "text_column")}
    if cfg.text_pair_column:
        cols["text_pair"] = (cfg.text_pair_column, "text_pair_column")
    return cols


def warn_numeric_texts(df: pd.DataFrame, cfg: DataConfig, source: str) -> None:
    """Warn when a text column holds mostly numbers (swapped text and label columns, an id column): the
    model would train on digits without a word said."""
    for col, key in _text_columns(cfg).values():
        sample = df[col].dropna().head(1000).astype(str).str.strip()
        sample = sample[sample != ""]
        share = float(sample.str.fullmatch(_NUMBER).mean()) if len(sample) else 0.0
        if share > 0.5:
            log.warning(
                "%s: column %r (data.%s) holds numbers, not text (%.0f%% of %d values looked at); is it the label "
                "or an id column? set data.%s to the column that holds the texts",
                source,
                col,
                key,
                100 * share,
                len(sample),
                key,
            )


def clean_texts(df: pd.DataFrame, cfg: DataConfig, source: str, chunk: int | None = None) -> pd.DataFrame:
    """Map text columns to `text`/`text_pair` as strings; drop or reject empty and null texts.

    `chunk` numbers the chunks of a streamed file (None: the whole file). A whole file with no text left
    fails: that is a wrongly set column, not data to drop. Numbers are looked for once per file.
    """
    if chunk in (None, 0):
        warn_numeric_texts(df, cfg, source)
    out = pd.DataFrame(index=df.index)
    bad = np.zeros(len(df), dtype=bool)
    emptied = []
    for new, (col, key) in _text_columns(cfg).items():
        values = df[col]
        texts = values.where(~values.isna(), "").astype(str)
        empty = values.isna().to_numpy() | (texts.str.strip() == "").to_numpy()
        if empty.any():
            emptied.append((col, key, bool(empty.all())))
        bad |= empty
        out[new] = texts
    if chunk is None and len(df) and bad.all():
        col, key = next(((c, k) for c, k, every in emptied if every), emptied[0][:2])
        raise UserError(
            f"{source}: no rows left after dropping empty texts: column {col!r} (data.{key}) is empty or null "
            f"in all {len(df)} rows; set data.{key} to the column that holds the texts "
            f"(columns present: {', '.join(map(str, df.columns))})"
        )
    if bad.any():
        start = df.index.start if isinstance(df.index, pd.RangeIndex) else 0  # a chunk of a streamed file
        rows = (np.flatnonzero(bad)[:5] + start + 1).tolist()
        where = " or ".join(repr(c) for c, _, _ in emptied)
        what = f"{int(bad.sum())} empty or null text(s) in column {where} (data rows {rows}...)"
        if cfg.empty_texts == "error":
            raise UserError(f"{source}: {what}; fill or remove them, or set data.empty_texts=drop")
        log.warning("%s: dropped %s", source, what)
    return out[~bad]


def parse_labels(df: pd.DataFrame, cleaned: pd.DataFrame, cfg: DataConfig, source: str, multi: bool) -> pd.Series:
    """Each kept row's labels as a list of names; single-label rows must have exactly one."""
    raw = df.loc[cleaned.index, cfg.label_column]
    labels = raw.map(lambda v: split_label(v, cfg.label_delimiter) if multi else _single(v))
    if not multi:
        missing = labels.map(len).to_numpy() == 0
        if missing.any():
            rows = (np.flatnonzero(missing)[:5] + 1).tolist()
            raise UserError(
                f"{source}: {int(missing.sum())} row(s) with no label in column {cfg.label_column!r} "
                f"(data rows {rows}...); fill or remove them"
            )
    return labels


def _single(value: Any) -> list[str]:
    items = split_label(value, None)
    return [label_to_str(value)] if len(items) == 1 and not isinstance(value, str) else items[:1] or []


def infer_multi_label(df: pd.DataFrame, cfg: DataConfig) -> bool:
    """Multi-label when configured, when a delimiter is set, or when label cells are lists."""
    if cfg.multi_label != "auto":
        return bool(cfg.multi_label)
    if cfg.label_delimiter is not None:
        return True
    sample = df[cfg.label_column].dropna().head(1000)
    return bool(sample.map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any()) or bool(
        sample.map(lambda v: isinstance(v, str) and v.strip().startswith("[") and v.strip().endswith("]")).any()
    )


def text_keys(df: pd.DataFrame) -> pd.Series:
    """Each row's normalised text (tab, normalised second text): what counts as the same text."""
    key = df["text"].map(normalise)
    if "text_pair" in df.columns:
        key = key + "\t" + df["text_pair"].map(normalise)
    return key


def leak_audit(splits: dict[str, pd.DataFrame], dedup: bool) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Count exact (normalised) duplicates within and across splits; optionally drop them.

    With `dedup`, repeated rows inside a split are dropped, and rows of a later split (valid, test) that
    already occur in an earlier one are dropped from the later split, so evaluation never scores memorised
    text.
    """
    report: dict[str, Any] = {"within": {}, "across": {}, "conflicting_labels": {}, "dedup": dedup}
    keys = {name: text_keys(df) for name, df in splits.items()}
    for name, df in splits.items():
        k = keys[name]
        report["within"][name] = int(k.duplicated().sum())
        label_key = df["labels"].map(lambda ls: "|".join(sorted(ls)))
        per_text = pd.DataFrame({"k": k, "l": label_key}).groupby("k")["l"].nunique()
        report["conflicting_labels"][name] = int((per_text > 1).sum())
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            report["across"][f"{a}-{b}"] = int(keys[b].isin(set(keys[a])).sum())
    if dedup:
        seen: set[str] = set()
        out = {}
        for name in names:
            k = keys[name]
            keep = ~k.duplicated() & ~k.isin(seen)
            out[name] = splits[name][keep.to_numpy()]
            seen |= set(k)
        report["dropped"] = {n: len(splits[n]) - len(out[n]) for n in names}
        splits = out
    return splits, report


def stratified_split(df: pd.DataFrame, ratio: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded, shuffled split; stratified by label (combination) whenever every class allows it."""
    strata = df["labels"].map(lambda ls: "|".join(sorted(ls)))
    counts = strata.value_counts()
    n_valid = max(1, int(round(len(df) * ratio)))
    stratify = strata if counts.min() >= 2 and n_valid >= len(counts) else None
    if stratify is None:
        log.warning("validation split is shuffled but not stratified: some label (combination) is too rare")
    train, valid = train_test_split(df, test_size=n_valid, random_state=seed, shuffle=True, stratify=stratify)
    return train, valid


def load_split(df: pd.DataFrame, cfg: DataConfig, source: str, multi: bool) -> pd.DataFrame:
    """Columns checked, texts cleaned, labels parsed: one split ready for the label set."""
    check_columns(
        df, source, {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column, "label_column": cfg.label_column}
    )
    out = clean_texts(df, cfg, source)
    out["labels"] = parse_labels(df, out, cfg, source, multi)
    return out.reset_index(drop=True)


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Everything training needs from the data section, validated."""
    frames, sources = _raw_splits(cfg)
    if "train" not in frames or len(frames["train"]) == 0:
        raise UserError(f"{sources.get('train', 'train')}: no training rows")
    check_columns(frames["train"], sources["train"], {"label_column": cfg.label_column})
    multi = infer_multi_label(frames["train"], cfg)
    splits = {name: load_split(df, cfg, sources[name], multi) for name, df in frames.items()}

    labels = LabelSet.from_labels(splits["train"]["labels"], multi)
    if labels.num_labels < 2:
        raise UserError(
            f"{sources['train']}: column {cfg.label_column!r} has {labels.num_labels} class(es) "
            f"({', '.join(labels.names) or 'none'}); a classifier needs at least two"
            + ("" if multi or cfg.label_delimiter else "; for multi-label strings set data.label_delimiter")
        )
    for name in ("valid", "test"):
        if name in splits:
            unknown = labels.unknown(splits[name]["labels"])
            if unknown:
                raise UserError(
                    f"{sources[name]}: label(s) {', '.join(map(repr, unknown[:5]))} not in the training data "
                    f"(known: {', '.join(labels.names[:10])}); fix the labels or add examples to train"
                )

    if "valid" not in splits:
        splits["train"], splits["valid"] = stratified_split(splits["train"], cfg.valid_ratio, cfg.seed)
        sources["valid"] = f"{cfg.valid_ratio:.0%} of {sources['train']} (seed {cfg.seed})"
    order = [n for n in ("train", "valid", "test") if n in splits]
    splits, audit = leak_audit({n: splits[n].reset_index(drop=True) for n in order}, cfg.dedup)
    audit["sizes"] = {n: len(df) for n, df in splits.items()}
    return PreparedData(
        train=splits["train"], valid=splits["valid"], test=splits.get("test"), labels=labels, audit=audit, sources=sources
    )


def read_eval_data(path: str, cfg: DataConfig, labels: LabelSet, require_labels: bool) -> tuple[pd.DataFrame, list[str]]:
    """A file to evaluate or predict, read with the run's column mapping (format from the file name).

    Returns the frame (with `labels` when the file has the label column) and the label names the model
    does not know: evaluation (`require_labels`) refuses them, prediction only reports them.
    """
    return eval_frame(read_table(path, "auto", cfg.encoding), path, cfg, labels, require_labels)


def eval_frame(
    df: pd.DataFrame, path: str, cfg: DataConfig, labels: LabelSet, require_labels: bool, chunk: int | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """`read_eval_data` for a frame already read: a whole file, or chunk number `chunk` of a streamed one."""
    if require_labels:
        out = load_split(df, cfg, path, labels.multi_label)
    else:
        check_columns(df, path, {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column})
        out = clean_texts(df, cfg, path, chunk)
        if cfg.label_column in df.columns:
            out["labels"] = df.loc[out.index, cfg.label_column].map(lambda v: split_label(v, cfg.label_delimiter))
        out = out.reset_index(drop=True)
    unknown = labels.unknown(out["labels"]) if "labels" in out.columns else []
    if unknown and require_labels:
        raise UserError(
            f"{path}: label(s) {', '.join(map(repr, unknown[:5]))} are not in the model's label set "
            f"({', '.join(labels.names[:10])}); the model cannot predict them"
        )
    return out, unknown
