"""Data: readers, column mapping, labels, splits and the leak audit, including every bad-input path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from textclass.config import DataConfig
from textclass.data.labels import LabelSet
from textclass.data.prepare import prepare_data, read_eval_data, stratified_split
from textclass.data.readers import first_undecodable, read_table, stream_table
from textclass.errors import UserError

from conftest import make_texts


def write(df: pd.DataFrame, path: Path) -> Path:
    """Write a frame in the format the file name asks for."""
    suffix = path.suffix
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif suffix == ".json":
        df.to_json(path, orient="records", force_ascii=False)
    elif suffix == ".parquet":
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_format_reads_the_same(tmp_path: Path, suffix: str) -> None:
    df = make_texts(20)
    got = read_table(write(df, tmp_path / f"d{suffix}"))
    assert got["text"].tolist() == df["text"].tolist()
    assert got["label"].astype(str).tolist() == df["label"].tolist()


def test_parquet_with_a_repeated_stored_index(tmp_path: Path) -> None:
    """A pandas index saved in Parquet may repeat values; that crashed loading with a raw ValueError."""
    df = make_texts(12)
    df.index = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    p = write(df, tmp_path / "dup.parquet")
    data = prepare_data(DataConfig(train=str(p), valid_ratio=0.25))
    assert sorted(data.train["text"].tolist() + data.valid["text"].tolist()) == sorted(df["text"])
    chunks = list(stream_table(p, chunk_rows=5))
    assert [c.index.tolist() for c in chunks] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    named = write(df.rename_axis("id"), tmp_path / "named.parquet")  # a named index is data: kept as a column
    for got in (read_table(named), pd.concat(stream_table(named, chunk_rows=5))):
        assert got.index.tolist() == list(range(12)) and got["id"].tolist() == df.index.tolist()


def test_save_to_disk_folder(tmp_path: Path) -> None:
    import datasets

    df = make_texts(12)
    datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "ds"))
    assert read_table(tmp_path / "ds")["text"].tolist() == df["text"].tolist()


def test_split_is_seeded_stratified_and_shuffled(tmp_path: Path) -> None:
    df = make_texts(300)
    data = prepare_data(DataConfig(train=str(write(df, tmp_path / "t.csv")), valid_ratio=0.2))
    assert len(data.valid) == 60 and len(data.train) == 240
    counts = data.valid["labels"].map(lambda ls: ls[0]).value_counts()
    assert counts.tolist() == [20, 20, 20]  # stratified: equal classes stay equal
    again = prepare_data(DataConfig(train=str(tmp_path / "t.csv"), valid_ratio=0.2))
    assert again.valid["text"].tolist() == data.valid["text"].tolist()  # seeded
    tail = df["text"].tolist()[-60:]
    assert data.valid["text"].tolist() != tail  # not the unshuffled tail of the file
    other = prepare_data(DataConfig(train=str(tmp_path / "t.csv"), valid_ratio=0.2, seed=7))
    assert other.valid["text"].tolist() != data.valid["text"].tolist()


def test_multilabel_lists_are_inferred(tmp_path: Path) -> None:
    rows = [{"text": f"text {i}", "tags": ["a", "b"] if i % 3 == 0 else ["a"] if i % 3 == 1 else ["c"]} for i in range(30)]
    p = write(pd.DataFrame(rows), tmp_path / "m.jsonl")
    data = prepare_data(DataConfig(train=str(p), label_column="tags"))
    assert data.labels.multi_label and data.labels.names == ["a", "b", "c"]
    assert data.labels.encode(["a", "c"]) == [1.0, 0.0, 1.0]


def test_multilabel_delimited_strings(tmp_path: Path) -> None:
    df = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": ["x|y", "y", "x", "z|x"] * 5})
    data = prepare_data(DataConfig(train=str(write(df, tmp_path / "d.csv")), label_delimiter="|"))
    assert data.labels.multi_label and data.labels.names == ["x", "y", "z"]


def test_text_pairs(tmp_path: Path) -> None:
    df = pd.DataFrame({"q1": [f"a{i}" for i in range(20)], "q2": [f"b{i}" for i in range(20)], "same": [0, 1] * 10})
    p = write(df, tmp_path / "p.csv")
    data = prepare_data(DataConfig(train=str(p), text_column="q1", text_pair_column="q2", label_column="same"))
    assert data.has_pairs and data.labels.names == ["0", "1"]


def test_leak_audit_counts_and_dedups(tmp_path: Path) -> None:
    train = pd.DataFrame({"text": ["Hello  World", "hello world", "other", "x y", "foo", "bar"], "label": list("ababab")})
    test = pd.DataFrame({"text": ["HELLO WORLD", "new one"], "label": ["a", "b"]})
    cfg = DataConfig(train=str(write(train, tmp_path / "tr.csv")), valid=str(write(train.iloc[2:4], tmp_path / "va.csv")), test=str(write(test, tmp_path / "te.csv")))
    audit = prepare_data(cfg).audit
    assert audit["within"]["train"] == 1
    assert audit["across"]["train-test"] == 1 and audit["across"]["train-valid"] == 2
    deduped = prepare_data(cfg.model_copy(update={"dedup": True}))
    assert len(deduped.train) == 5 and len(deduped.test) == 1 and len(deduped.valid) == 0
    assert deduped.audit["dropped"] == {"train": 1, "valid": 2, "test": 1}


def test_empty_texts_dropped_or_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    df = make_texts(30)
    df.loc[3, "text"] = ""
    df.loc[7, "text"] = None
    p = write(df, tmp_path / "e.csv")
    data = prepare_data(DataConfig(train=str(p)))
    assert len(data.train) + len(data.valid) == 28
    assert "2 empty or null text(s)" in caplog.text
    with pytest.raises(UserError, match=r"e.csv: 2 empty or null text\(s\).*data.empty_texts=drop"):
        prepare_data(DataConfig(train=str(p), empty_texts="error"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_numeric_text_column_warns(tmp_path: Path, suffix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Swapped text and label columns train silently on digits; a warning names the column and the file."""
    df = make_texts(30)
    swapped = pd.DataFrame({"text": [i % 2 if suffix != ".csv" else f"{i % 2}.0" for i in range(30)], "label": df["label"]})
    p = write(swapped, tmp_path / f"d{suffix}")
    with caplog.at_level(logging.WARNING, logger="textclass"):
        prepare_data(DataConfig(train=str(p)))
    assert f"d{suffix}: column 'text' (data.text_column) holds numbers, not text (100% of 30 values" in caplog.text
    caplog.clear()
    mixed = df.assign(text=[t if i % 3 else str(i) for i, t in enumerate(df["text"])])  # a third are numbers: fine
    with caplog.at_level(logging.WARNING, logger="textclass"):
        prepare_data(DataConfig(train=str(write(mixed, tmp_path / f"ok{suffix}"))))
    assert "holds numbers" not in caplog.text


@pytest.mark.parametrize("empty_texts", ["drop", "error"])
def test_all_texts_empty_names_the_text_column(tmp_path: Path, empty_texts: str) -> None:
    df = make_texts(30).assign(notes=None)
    p = write(df, tmp_path / "d.csv")
    expected = (
        r"d.csv: no rows left after dropping empty texts: column 'notes' \(data.text_column\) is empty or null in "
        r"all 30 rows; set data.text_column to the column that holds the texts \(columns present: text, label, notes\)$"
    )
    with pytest.raises(UserError, match=expected):
        prepare_data(DataConfig(train=str(p), text_column="notes", empty_texts=empty_texts))
    with pytest.raises(UserError, match=r"column 'notes' \(data.text_pair_column\) is empty or null in all 30"):
        prepare_data(DataConfig(train=str(p), text_pair_column="notes", empty_texts=empty_texts))


def test_empty_pair_texts_are_named_by_their_column(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    df = make_texts(30).assign(other=lambda d: d["text"])
    df.loc[5, "other"] = ""
    prepare_data(DataConfig(train=str(write(df, tmp_path / "d.csv")), text_pair_column="other"))
    assert "1 empty or null text(s) in column 'other' (data rows [6]" in caplog.text


# ---- bad input: each a one-line UserError naming the file/line/column/key and the fix -------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.csv: file not found"):
        prepare_data(DataConfig(train=str(tmp_path / "nope.csv")))


def test_unknown_format(tmp_path: Path) -> None:
    p = tmp_path / "d.xlsx"
    p.write_text("x")
    with pytest.raises(UserError, match=r"d.xlsx: unknown file format '.xlsx'"):
        prepare_data(DataConfig(train=str(p)))


def test_misnamed_column_lists_present_ones(tmp_path: Path) -> None:
    p = write(make_texts(10).rename(columns={"text": "sentence"}), tmp_path / "d.csv")
    with pytest.raises(UserError, match=r"no column 'text' \(data.text_column\); columns present: sentence, label"):
        prepare_data(DataConfig(train=str(p)))
    with pytest.raises(UserError, match=r"no column 'y' \(data.label_column\)"):
        prepare_data(DataConfig(train=str(p), text_column="sentence", label_column="y"))


@pytest.mark.parametrize(
    ("sep", "name", "hint"),
    [
        (";", "d.csv", r"looks like ';'-separated; re-save it with ','"),
        ("\t", "d.csv", r"looks like tab-separated; rename it to .tsv \(or set data.format: tsv\)"),
        (",", "d.tsv", r"looks like ','-separated; rename it to .csv \(or set data.format: csv\)"),
    ],
)
def test_wrong_separator_gets_a_hint(tmp_path: Path, sep: str, name: str, hint: str) -> None:
    p = tmp_path / name
    make_texts(10).to_csv(p, sep=sep, index=False)
    with pytest.raises(UserError, match=rf"no column 'label' \(data.label_column\); columns present: text.label; the file {hint}"):
        prepare_data(DataConfig(train=str(p)))


def test_one_class(tmp_path: Path) -> None:
    df = make_texts(10)
    df["label"] = "only"
    with pytest.raises(UserError, match="has 1 class"):
        prepare_data(DataConfig(train=str(write(df, tmp_path / "d.csv"))))


def test_unknown_label_in_test(tmp_path: Path) -> None:
    test = make_texts(6)
    test.loc[0, "label"] = "weather"
    cfg = DataConfig(train=str(write(make_texts(30), tmp_path / "tr.csv")), test=str(write(test, tmp_path / "te.csv")))
    with pytest.raises(UserError, match="te.csv: label\\(s\\) 'weather' not in the training data"):
        prepare_data(cfg)


def test_bad_encoding(tmp_path: Path) -> None:
    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\ncaf\xe9 au lait,a\nna\xefve,b\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.csv line 2 column 4: not readable as utf-8 \(byte 0xe9\).*data.encoding"):
        read_table(p)
    assert read_table(p, encoding="latin-1")["text"].tolist() == ["café au lait", "naïve"]
    with pytest.raises(UserError, match="data.encoding: unknown encoding 'latin-9x'"):
        read_table(p, encoding="latin-9x")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
def test_bad_encoding_names_line_and_column_deep_in_the_file(tmp_path: Path, suffix: str) -> None:
    """pandas reports an offset into its own buffer; the line and column come from the file itself."""
    df = pd.DataFrame({"text": [f"goal match 学习 {i}" for i in range(20_000)] + ["the café"], "label": "a"})
    p = write(df, tmp_path / f"d{suffix}")
    p.write_bytes(p.read_bytes().replace("café".encode(), "café".encode("latin-1")))
    line = 20_001 + (suffix in (".csv", ".tsv")) - (suffix == ".json") * 20_000  # a JSON array is one line
    column = len(p.read_bytes().splitlines()[line - 1].split(b"caf")[0].decode()) + 4
    expected = rf"d{suffix} line {line} column {column}: not readable as utf-8 \(byte 0xe9\)"
    with pytest.raises(UserError, match=expected):
        read_table(p)
    with pytest.raises(UserError, match=expected):
        list(stream_table(p, chunk_rows=1000))


def test_first_undecodable_across_block_edges(tmp_path: Path) -> None:
    """A character split between two reads is not an error; the column counts characters, not bytes."""
    p = tmp_path / "d.txt"
    p.write_bytes("\ufeff学习\nab学\r\nx学".encode() + b"\xff" + "y".encode())
    for size in range(1, 9):
        assert first_undecodable(p, "utf-8", block_size=size) == (3, 3, b"\xff")
    p.write_bytes("学习\n".encode() + "学".encode()[:2])  # cut off in the middle of the last character
    assert [first_undecodable(p, "utf-8", block_size=size) for size in (1, 4, 64)] == [(2, 1, b"\xe5\xad")] * 3
    p.write_bytes("学习\n".encode())
    assert first_undecodable(p, "utf-8", block_size=2) is None


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_utf8_byte_order_mark_is_accepted(tmp_path: Path, suffix: str) -> None:
    df = make_texts(12)
    p = write(df, tmp_path / f"d{suffix}")
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    for got in (read_table(p), pd.concat(stream_table(p, chunk_rows=5))):
        assert got.columns.tolist() == ["text", "label"] and got["text"].tolist() == df["text"].tolist()
    assert read_table(p, encoding="UTF8")["text"].tolist() == df["text"].tolist()  # any spelling of utf-8


def test_broken_json_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + '{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(UserError, match="d.jsonl line 2: broken JSON"):
        read_table(p)


def test_missing_labels_single_label(tmp_path: Path) -> None:
    df = make_texts(12)
    df.loc[4, "label"] = None
    with pytest.raises(UserError, match=r"1 row\(s\) with no label in column 'label' \(data rows \[5\]"):
        prepare_data(DataConfig(train=str(write(df, tmp_path / "d.csv"))))


def test_eval_file_reports_or_refuses_unknown_labels(tmp_path: Path) -> None:
    labels = LabelSet(["food", "sport", "tech"], multi_label=False)
    df = make_texts(6)
    df.loc[1, "label"] = "weather"
    p = write(df, tmp_path / "d.csv")
    out, unknown = read_eval_data(str(p), DataConfig(train="x"), labels, require_labels=False)
    assert unknown == ["weather"] and len(out) == 6
    with pytest.raises(UserError, match="not in the model's label set"):
        read_eval_data(str(p), DataConfig(train="x"), labels, require_labels=True)


def test_rare_class_split_falls_back_to_shuffle() -> None:
    df = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "labels": [["a"]] * 19 + [["b"]]})
    train, valid = stratified_split(df, 0.2, 0)
    assert len(train) == 16 and len(valid) == 4


def test_hub_loader_on_a_local_folder(tmp_path: Path) -> None:
    """`data.dataset` that is not built-in goes through datasets.load_dataset (here: a local folder)."""
    folder = tmp_path / "myset"
    folder.mkdir()
    make_texts(40, 1).to_csv(folder / "train.csv", index=False)
    make_texts(12, 2).to_csv(folder / "test.csv", index=False)
    data = prepare_data(DataConfig(dataset=str(folder)))
    assert len(data.train) + len(data.valid) == 40 and len(data.test) == 12
    assert data.sources["test"] == f"{folder}:test"


def test_hub_name_that_cannot_load() -> None:
    with pytest.raises(UserError, match="not a built-in data set.*could not be loaded"):
        prepare_data(DataConfig(dataset="no-such-user/no-such-dataset-xyz"))
