"""Read tables from files, `save_to_disk` folders and the Hugging Face hub.

Every reader returns a pandas DataFrame and turns the ways a file can be wrong (missing, unknown format,
bad encoding, a broken JSON line) into a one-line `UserError` that names the file and, where it can, the
line.
"""

from __future__ import annotations

import codecs
import itertools
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


def text_codec(encoding: str) -> str:
    """The codec that reads `encoding`: UTF-8 files may start with a byte-order mark (Excel and Notepad write
    one), which pandas skips in CSV but `json` refuses, so UTF-8 is read as `utf-8-sig` everywhere."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"data.encoding: unknown encoding {encoding!r}; use e.g. utf-8, latin-1 or gbk") from None
    return "utf-8-sig" if name == "utf-8" else encoding


def _advance(line: int, column: int, text: str) -> tuple[int, int]:
    """Line and column (1-based, in characters) just after `text`, starting from `line`, `column`."""
    newlines = text.count("\n")
    if newlines:
        return line + newlines, len(text) - text.rfind("\n")
    return line, column + len(text)


def first_undecodable(p: Path, encoding: str, block_size: int = 1 << 20) -> tuple[int, int, bytes] | None:
    """Line, column and bytes of the first spot `encoding` cannot decode, or None.

    Found by decoding the file again: the offset in a reader's `UnicodeDecodeError` is relative to its
    own buffer (pandas reads CSV in blocks), and no reader counts lines for us.
    """
    decoder = codecs.getincrementaldecoder(text_codec(encoding))()
    line, column = 1, 1
    with p.open("rb") as f:
        while True:
            block = f.read(block_size)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                # err.object is the decoder's pending bytes + this block (less a skipped BOM); start indexes it.
                good = err.object[: err.start].decode(text_codec(encoding), errors="replace")
                return (*_advance(line, column, good), err.object[err.start : err.end])
            line, column = _advance(line, column, text)
            if not block:
                return None


@contextmanager
def _reading(p: Path, fmt: str, encoding: str) -> Iterator[None]:
    """Turn the ways a file can be unreadable into one-line `UserError`s naming the file."""
    try:
        yield
    except UnicodeDecodeError:
        spot = first_undecodable(p, encoding) if p.is_file() else None
        where = f"{p} line {spot[0]} column {spot[1]}" if spot else str(p)
        byte = f" (byte 0x{spot[2][:1].hex()})" if spot else ""
        raise UserError(
            f"{where}: not readable as {encoding}{byte}; set data.encoding (e.g. latin-1, gbk) or re-save the file as UTF-8"
        ) from None
    except pd.errors.ParserError as err:
        raise UserError(f"{p}: malformed {fmt.upper()} ({' '.join(str(err).split())})") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{p}: the file is empty; it needs a header row and data rows") from None
    except (OSError, ValueError) as err:  # pyarrow errors for bad parquet are ValueError/OSError subclasses
        raise UserError(f"{p}: cannot read as {fmt} ({' '.join(str(err).split())[:200]})") from None


def _existing(path: str | Path, fmt: str) -> tuple[Path, str]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: file not found; check the path (relative paths start at {Path.cwd()})")
    return p, detect_format(p, fmt)


def _csv_options(fmt: str, encoding: str) -> dict[str, Any]:
    """Every cell a string, only truly empty cells missing; TSV without quoting."""
    opts: dict[str, Any] = {"encoding": encoding, "dtype": object, "keep_default_na": False, "na_values": [""]}
    return opts | ({"sep": "\t", "quoting": 3} if fmt == "tsv" else {})


def read_table(path: str | Path, fmt: str = "auto", encoding: str = "utf-8") -> pd.DataFrame:
    """Read one file (or `save_to_disk` folder) into a DataFrame."""
    p, fmt = _existing(path, fmt)
    codec = text_codec(encoding)
    with _reading(p, fmt, encoding):
        if fmt in ("csv", "tsv"):
            return pd.read_csv(p, **_csv_options(fmt, codec))
        if fmt == "jsonl":
            return _read_jsonl(p, codec)
        if fmt == "json":
            return _read_json(p, codec)
        if fmt == "parquet":
            return _plain_index(pd.read_parquet(p))
        if fmt == "disk":
            return _read_disk(p)
    raise UserError(f"{p}: unknown data.format {fmt!r}")


@dataclass
class TableStream:
    """A table read in chunks of at most `chunk_rows` rows, so memory stays bounded for any file size.

    `progress` tells how far the reader is, in the units of `total` (bytes of the file, or rows of a
    Parquet file), for a progress bar. JSON arrays and `save_to_disk` folders are not line-oriented: they are
    read whole and then handed out in chunks.
    """

    path: Path
    format: str
    encoding: str
    chunk_rows: int
    total: int = 0
    progress: int = 0
    unit: str = "B"

    def __iter__(self) -> Iterator[pd.DataFrame]:
        codec = text_codec(self.encoding)
        with _reading(self.path, self.format, self.encoding):
            if self.format in ("csv", "tsv", "jsonl"):
                self.total = self.path.stat().st_size
                with self.path.open("rb") as raw:
                    chunks = (
                        _jsonl_chunks(raw, self.path, codec, self.chunk_rows)
                        if self.format == "jsonl"
                        else pd.read_csv(raw, chunksize=self.chunk_rows, **_csv_options(self.format, codec))
                    )
                    for chunk in chunks:
                        self.progress = raw.tell()
                        yield chunk
                return
            if self.format == "parquet":
                import pyarrow.parquet as pq

                file = pq.ParquetFile(self.path)
                self.total, self.unit = file.metadata.num_rows, "rows"
                start = 0
                for batch in file.iter_batches(batch_size=self.chunk_rows):
                    df = _plain_index(batch.to_pandas())
                    df.index = pd.RangeIndex(start, start + len(df))
                    start += len(df)
                    self.progress = start
                    yield df
                return
            df = read_table(self.path, self.format, self.encoding)
            self.total, self.unit = len(df), "rows"
            for start in range(0, len(df), self.chunk_rows):
                self.progress = min(len(df), start + self.chunk_rows)
                yield df.iloc[start : start + self.chunk_rows]


def _plain_index(df: pd.DataFrame) -> pd.DataFrame:
    """Rows numbered 0..n-1, as from every other format: a pandas index stored in a Parquet file may repeat
    values, which breaks row selection later. Named index levels (an `id`) become columns, unnamed ones go."""
    named = [n for n in df.index.names if n is not None and n not in df.columns]
    return (df.reset_index(level=named) if named else df).reset_index(drop=True)


def stream_table(path: str | Path, fmt: str = "auto", encoding: str = "utf-8", chunk_rows: int = 10_000) -> TableStream:
    """Chunks of a table file (see `TableStream`); the rows' index counts from 0 across chunks."""
    p, fmt = _existing(path, fmt)
    return TableStream(p, fmt, encoding, chunk_rows)


def _jsonl_rows(lines: Iterable[tuple[int, str]], p: Path) -> Iterator[dict[str, Any]]:
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{p} line {lineno}: broken JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{p} line {lineno}: expected a JSON object per line, got {type(obj).__name__}")
        yield obj


def _jsonl_chunks(raw: BinaryIO, p: Path, encoding: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    lines = ((n, line.decode(encoding)) for n, line in enumerate(raw, 1))
    start = 0
    rows = _jsonl_rows(lines, p)
    while chunk := list(itertools.islice(rows, chunk_rows)):
        yield pd.DataFrame(chunk, index=pd.RangeIndex(start, start + len(chunk)))
        start += len(chunk)
    if start == 0:
        raise UserError(f"{p}: the file has no JSON lines")


def _read_jsonl(p: Path, encoding: str) -> pd.DataFrame:
    with p.open(encoding=encoding) as f:
        rows = list(_jsonl_rows(enumerate(f, 1), p))
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
