"""Read tables from files, `save_to_disk` folders and the Hugging Face hub.

Every reader returns a pandas DataFrame and turns the ways a file can be wrong (missing, unknown format,
bad encoding, a broken JSON line) into a one-line `UserError` that names the file and, where it can, the
line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from textclass.errors import UserError

FORMATS_BY_SUFFIX = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def detect_format(path: Path, fmt: str = "auto") -> str:
    """The file's format, from `fmt` or the file name; a folder is a `save_to_disk` data set."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "disk"
    fmt = FORMATS_BY_SUFFIX.get(path.suffix.lower(), "")
    if not fmt:
        raise UserError(
            f"{path}: unknown file format {path.suffix or '(no extension)'!r}; use one of "
            f"{', '.join(sorted(FORMATS_BY_SUFFIX))} or set data.format"
        )
    return fmt


def read_table(path: str | Path, fmt: str = "auto", encoding: str = "utf-8") -> pd.DataFrame:
    """Read one file (or `save_to_disk` folder) into a DataFrame."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: file not found; check the path (relative paths start at {Path.cwd()})")
    fmt = detect_format(p, fmt)
    try:
        if fmt == "csv":
            return pd.read_csv(p, encoding=encoding, dtype=object, keep_default_na=False, na_values=[""])
        if fmt == "tsv":
            return pd.read_csv(
                p, sep="\t", encoding=encoding, dtype=object, keep_default_na=False, na_values=[""], quoting=3
            )
        if fmt == "jsonl":
            return _read_jsonl(p, encoding)
        if fmt == "json":
            return _read_json(p, encoding)
        if fmt == "parquet":
            return pd.read_parquet(p)
        if fmt == "disk":
            return _read_disk(p)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{p}: not readable as {encoding} (byte {err.start}); set data.encoding (e.g. latin-1, gbk) "
            "or re-save the file as UTF-8"
        ) from None
    except pd.errors.ParserError as err:
        raise UserError(f"{p}: malformed {fmt.upper()} ({' '.join(str(err).split())})") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{p}: the file is empty; it needs a header row and data rows") from None
    except (OSError, ValueError) as err:  # pyarrow errors for bad parquet are ValueError/OSError subclasses
        raise UserError(f"{p}: cannot read as {fmt} ({' '.join(str(err).split())[:200]})") from None
    raise UserError(f"{p}: unknown data.format {fmt!r}")


def _read_jsonl(p: Path, encoding: str) -> pd.DataFrame:
    rows = []
    with p.open(encoding=encoding) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{p} line {lineno}: broken JSON ({err.msg}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise UserError(f"{p} line {lineno}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append(obj)
    if not rows:
        raise UserError(f"{p}: the file has no JSON lines")
    return pd.DataFrame(rows)


def _read_json(p: Path, encoding: str) -> pd.DataFrame:
    text = p.read_text(encoding=encoding)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if err.lineno > 1 and text.lstrip().startswith("{"):  # probably JSON Lines named .json
            return _read_jsonl(p, encoding)
        raise UserError(f"{p} line {err.lineno}: broken JSON ({err.msg})") from None
    if isinstance(obj, dict):  # {"data": [...]} or column-oriented {"text": [...], "label": [...]}
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(obj) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            obj = lists[0]
        elif lists and len(lists) == len(obj):
            return pd.DataFrame(obj)
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise UserError(f"{p}: expected a JSON list of objects (one per example) or JSON Lines")
    return pd.DataFrame(obj)


def _read_disk(p: Path) -> pd.DataFrame:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise UserError(f"{p}: a folder, but not one written by datasets' save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{p}: a DatasetDict without a `train` split (has {', '.join(ds)}); point at one split")
        ds = ds["train"]
    return ds.to_pandas()


def read_hub(name: str, config: str | None) -> dict[str, pd.DataFrame]:
    """Load a hub data set with `datasets.load_dataset` (needs network or a local HF cache)."""
    import datasets

    try:
        dd = datasets.load_dataset(name, config)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs the one line
        raise UserError(
            f"data.dataset {name!r}: not a built-in data set (see `textclass data list`) and could not be "
            f"loaded from the Hugging Face hub ({type(err).__name__}: {' '.join(str(err).split())[:160]})"
        ) from None
    if not isinstance(dd, datasets.DatasetDict):
        dd = datasets.DatasetDict({"train": dd})
    return {split: dd[split].to_pandas() for split in dd}
