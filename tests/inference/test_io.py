"""`textclass predict` on files streams them chunk by chunk: same results as one pass, bounded memory, and
nothing half-written when the input breaks half-way."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_texts
from textclass.config import build_config
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.inference.io import predict_file
from textclass.inference.predictor import Predictor
from textclass.models.registry import get_family


@pytest.fixture(scope="module")
def predictor(tiny_bert: Path) -> Predictor:
    """An untrained tiny BERT classifier: streaming must reproduce whatever the model says in one pass."""
    import torch

    cfg = build_config({"data": {"train": "x.csv"}, "model": {"name": str(tiny_bert), "max_length": 32}})
    labels = LabelSet.from_labels([["food"], ["sport"], ["tech"]], multi_label=False)
    torch.manual_seed(0)
    return Predictor(get_family("encoder").create(cfg, labels, []), batch_size=4)


class CountingPredictor:
    """Wraps a Predictor and records how many texts each call received."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict(self, texts: list[str], *args, **kwargs):
        self.calls.append(len(texts))
        return self.inner.predict(texts, *args, **kwargs)


def write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif path.suffix == ".json":
        df.to_json(path, orient="records", force_ascii=False)
    else:
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet", ".json"])
def test_streamed_predictions_equal_one_pass_in_input_order(predictor: Predictor, tmp_path: Path, suffix: str) -> None:
    df = make_texts(53, seed=5)
    df.loc[7, "text"] = "goal, \"quoted\" match\nwith a new line" if suffix != ".tsv" else "goal match 好"
    inp = write(df, tmp_path / f"in{suffix}")
    counting = CountingPredictor(predictor)
    n, unknown = predict_file(counting, inp, tmp_path / "out.csv", chunk_rows=10)  # type: ignore[arg-type]
    assert n == 53 and unknown == []
    assert counting.calls == [10, 10, 10, 10, 10, 3]  # never more than one chunk in memory
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    expected = predictor.predict(df["text"].tolist())
    assert out["text"].tolist() == df["text"].tolist()
    assert out["label"].tolist() == [r["label"] for r in expected]
    for name in predictor.labels.names:
        np.testing.assert_allclose(out[f"score_{name}"], [r["scores"][name] for r in expected], atol=1e-6)


def test_jsonl_output_and_unknown_labels_across_chunks(predictor: Predictor, tmp_path: Path) -> None:
    df = make_texts(25, seed=6)
    df.loc[3, "label"] = "weather"
    df.loc[21, "label"] = "music"
    inp = write(df, tmp_path / "in.jsonl")
    n, unknown = predict_file(predictor, inp, tmp_path / "out.jsonl", top_k=2, chunk_rows=8)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == 25 and len(rows) == 25 and [r["text"] for r in rows] == df["text"].tolist()
    assert all(len(r["scores"]) == 2 for r in rows)
    assert unknown == ["weather", "music"]  # reported, from the first and the third chunk


def test_broken_line_in_a_later_chunk_leaves_no_output(predictor: Predictor, tmp_path: Path) -> None:
    lines = [json.dumps({"text": t}) for t in make_texts(30, seed=7)["text"]]
    lines[24] = '{"text": "goal match'  # broken JSON, well after the first chunk was written
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.csv"
    with pytest.raises(UserError, match=r"in\.jsonl line 25: broken JSON"):
        predict_file(predictor, inp, out, chunk_rows=10)
    assert list(tmp_path.iterdir()) == [inp]  # no output, no temp file


def test_bad_encoding_in_a_later_chunk_leaves_no_output(predictor: Predictor, tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    body = "text\n" + "".join(f"goal match {i}\n" for i in range(40)) + "caf\xe9 au lait\n"
    inp.write_bytes(body.encode("latin-1"))
    with pytest.raises(UserError, match=r"in\.csv line 42 column 4: not readable as utf-8 \(byte 0xe9\)"):
        predict_file(predictor, inp, tmp_path / "out.csv", chunk_rows=10)
    assert list(tmp_path.iterdir()) == [inp]


def test_empty_texts_in_a_later_chunk_name_their_rows(
    predictor: Predictor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    df = make_texts(30, seed=8)
    df.loc[[4, 26], "text"] = ""
    inp = write(df, tmp_path / "in.csv")
    with caplog.at_level(logging.WARNING, logger="textclass"):
        n, _ = predict_file(predictor, inp, tmp_path / "out.csv", chunk_rows=10)
    assert n == 28
    assert "data rows [5]" in caplog.text and "data rows [27]" in caplog.text  # file rows, not chunk rows


def test_missing_column_names_the_file(predictor: Predictor, tmp_path: Path) -> None:
    inp = write(pd.DataFrame({"sentence": ["a b c"]}), tmp_path / "in.csv")
    with pytest.raises(UserError, match=r"in\.csv: no column 'text' \(data\.text_column\); columns present: sentence"):
        predict_file(predictor, inp, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_a_first_chunk_of_empty_texts_writes_no_second_header(predictor: Predictor, tmp_path: Path) -> None:
    df = make_texts(25, seed=9)
    df.loc[0:9, "text"] = ""  # the whole first chunk (and the start of the second) is empty
    df.loc[12:14, "text"] = ""
    inp = write(df, tmp_path / "in.csv")
    n, _ = predict_file(predictor, inp, tmp_path / "out.csv", chunk_rows=10)
    lines = (tmp_path / "out.csv").read_text(encoding="utf-8").splitlines()
    assert n == 12 and len(lines) == 13 and sum(line.startswith("text,") for line in lines) == 1
    assert pd.read_csv(tmp_path / "out.csv")["text"].tolist() == df["text"].iloc[[10, 11, *range(15, 25)]].tolist()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_all_texts_empty_gives_a_header_only_file_and_says_why(
    predictor: Predictor, tmp_path: Path, suffix: str, caplog: pytest.LogCaptureFixture
) -> None:
    inp = write(pd.DataFrame({"text": [""] * 15, "label": ["food"] * 15}), tmp_path / "in.csv")
    out = tmp_path / f"out{suffix}"
    with caplog.at_level(logging.WARNING, logger="textclass"):
        n, _ = predict_file(predictor, inp, out, chunk_rows=10)
    assert n == 0
    if suffix == ".csv":  # the usual columns, no rows: a reader downstream sees an empty table, not a broken file
        expected = ["text", "label", "score"] + [f"score_{name}" for name in predictor.labels.names]
        assert out.read_text(encoding="utf-8").splitlines() == [",".join(expected)]
    else:
        assert out.read_text(encoding="utf-8") == ""
    assert "no non-empty text in column 'text'" in caplog.text and "data.text_column" in caplog.text


def test_numeric_texts_warn_once_per_file(predictor: Predictor, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inp = write(pd.DataFrame({"text": [str(i) for i in range(25)]}), tmp_path / "in.csv")
    with caplog.at_level(logging.WARNING, logger="textclass"):
        predict_file(predictor, inp, tmp_path / "out.csv", chunk_rows=10)
    assert caplog.text.count("in.csv: column 'text' (data.text_column) holds numbers") == 1
