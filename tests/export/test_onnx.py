"""ONNX export and the onnx backend: parity with PyTorch for every family, the README snippet, bad input.

Models are tiny (the 2-layer random BERT of conftest, small models with 16-dim embeddings, one epoch);
the point is that the exported graph computes what the PyTorch module computes, for any batch size and
sequence length, and that users get one clear line when something is wrong.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_texts, tiny_config
from test_cli import run as cli

pytest.importorskip("onnxruntime")

README = Path(__file__).resolve().parents[2] / "README.md"
PROBE = ["match goal team", "software chip computer phone internet data code robot network startup " * 3, "soup", "a"]


def _files(folder: Path, pairs: bool = False, multi: bool = False) -> dict[str, Path]:
    paths = {}
    for split, (n, seed) in {"train": (90, 10), "valid": (30, 11)}.items():
        df = make_texts(n, seed)
        if pairs:
            df["text_pair"] = make_texts(n, seed + 100)["text"]
        if multi:  # every third row also carries the label of its pair text
            other = make_texts(n, seed + 100)["label"]
            df["label"] = [f"{a}|{b}" if i % 3 == 0 and a != b else a for i, (a, b) in enumerate(zip(df["label"], other))]
        paths[split] = folder / f"{split}.csv"
        df.to_csv(paths[split], index=False)
    return paths


def _train(cfg: dict) -> Path:
    from textclass import api

    return Path(api.train(cfg, overwrite=True).run_dir)


@pytest.fixture(scope="module")
def encoder_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export-enc")
    return _train(tiny_config(tiny_bert, _files(folder), folder / "run", epochs=1))


@pytest.fixture(scope="module")
def hf_pairs_multi_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export-hf")
    cfg = tiny_config(tiny_bert, _files(folder, pairs=True, multi=True), folder / "run", epochs=1)
    cfg["data"].update(text_pair_column="text_pair", label_delimiter="|")
    cfg["model"]["head"] = "hf"
    return _train(cfg)


def _probs(run_dir: Path, backend: str, texts: list[str], pairs: list[str] | None = None, **kw: object) -> np.ndarray:
    from textclass.inference.load import load_predictor

    pred = load_predictor(run_dir, backend=backend, **kw)
    assert pred.backend == backend
    return pred.predict_proba(texts, pairs)


def test_encoder_export_optimized_int8(encoder_run: Path) -> None:
    from textclass import api

    record = api.export(encoder_run, optimize=True, int8=True)
    onnx_dir = encoder_run / "onnx"
    saved = json.loads((onnx_dir / "export.json").read_text())
    assert saved["parity"] == json.loads((onnx_dir / "parity.json").read_text()) == record["parity"]
    parity = record["parity"]
    assert parity["samples"] == 30 and parity["fp32_max_abs_diff"] <= 1e-4
    assert 0.0 <= parity["int8_agreement"] <= 1.0 and parity["int8_accuracy_change"] is not None
    assert record["fused_operators"].get("Attention") == 2  # both layers fused
    assert record["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    shapes = record["graph"]["inputs"]["input_ids"]["shape"]
    assert all(isinstance(d, str) for d in shapes), shapes  # symbolic batch and sequence axes
    assert (onnx_dir / "model.int8.onnx").stat().st_size < (onnx_dir / "model.onnx").stat().st_size

    # Same probabilities as torch, any batch, in the caller's order (batches are sorted by length inside).
    texts = PROBE * 11
    ref = _probs(encoder_run, "torch", texts)
    fp32 = _probs(encoder_run, "onnx", texts, variant="fp32", batch_size=5, threads=1)
    assert np.abs(fp32 - ref).max() <= 1e-4
    assert np.allclose(fp32[: len(PROBE)], fp32[len(PROBE) : 2 * len(PROBE)], atol=1e-6)
    one = _probs(encoder_run, "onnx", texts[1:2], variant="fp32", batch_size=1)
    assert np.abs(one - ref[1:2]).max() <= 1e-4
    int8 = _probs(encoder_run, "onnx", texts)  # the default after --int8
    assert (int8.argmax(1) == ref.argmax(1)).mean() >= 0.9

    from textclass.inference.load import load_predictor

    assert load_predictor(encoder_run).backend == "onnx"  # auto
    assert load_predictor(encoder_run, backend="onnx").variant == "int8"


def test_readme_snippet_runs_on_an_export(encoder_run: Path, capsys: pytest.CaptureFixture) -> None:
    from textclass import api

    api.export(encoder_run)
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Export and fast inference") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'run = "runs/bbc"' in snippet
    exec(compile(snippet.replace('run = "runs/bbc"', f"run = {str(encoder_run)!r}"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    expected = [r["label"] for r in api.Classifier.load(encoder_run, backend="torch").predict(
        ["Shares rose after the merger.", "The striker scored twice."])]
    assert printed == repr(expected)


def test_hf_head_pairs_multi_label(hf_pairs_multi_run: Path) -> None:
    from textclass import api

    record = api.export(hf_pairs_multi_run, int8=True)
    assert record["probabilities"] == "sigmoid" and record["parity"]["fp32_max_abs_diff"] <= 1e-4
    assert "token_type_ids" in record["inputs"]
    texts, pairs = PROBE * 3, list(reversed(PROBE * 3))
    ref = _probs(hf_pairs_multi_run, "torch", texts, pairs)
    out = _probs(hf_pairs_multi_run, "onnx", texts, pairs, variant="fp32", batch_size=4)
    assert np.abs(out - ref).max() <= 1e-4
    assert not np.allclose(out.sum(1), 1.0)  # independent sigmoids, not a softmax
    clf = api.Classifier.load(hf_pairs_multi_run)
    assert clf.backend == "onnx" and "labels" in clf.predict(texts[:1], pairs[:1])[0]


@pytest.mark.parametrize("arch", ["fasttext", "textcnn", "textrnn", "textrcnn", "transformer"])
def test_small_family_exports(arch: str, tmp_path: Path) -> None:
    from textclass import api

    model = {"family": "small", "arch": arch, "max_length": 32, "embedding_dim": 16}
    own = {"fasttext": {"buckets": 500, "word_ngrams": 2, "minn": 2, "maxn": 3}, "textcnn": {}}
    model.update(own.get(arch, {"hidden_size": 16}))
    files = _files(tmp_path)
    run_dir = _train({"data": {k: str(v) for k, v in files.items()}, "model": model,
                      "training": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 16}})
    record = api.export(run_dir, optimize=True, int8=True)
    assert record["parity"]["fp32_max_abs_diff"] <= 1e-4
    assert record["layout"] == ("bags" if arch == "fasttext" else "padded")
    # Lengths and batch sizes never seen at export time (dynamic axes), incl. one-token texts.
    texts = PROBE + make_texts(37, seed=5)["text"].tolist()
    ref = _probs(run_dir, "torch", texts)
    for bs in (1, 7, 64):
        assert np.abs(_probs(run_dir, "onnx", texts, variant="fp32", batch_size=bs) - ref).max() <= 1e-4


def test_parity_failure_leaves_no_usable_export(encoder_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import textclass.export.onnx as export_mod
    from textclass import api
    from textclass.errors import UserError

    monkeypatch.setattr(export_mod, "FP32_TOLERANCE", -1.0)  # any difference, even 0, now fails
    out = tmp_path / "onnx"
    with pytest.raises(UserError, match="parity check"):
        api.export(encoder_run, output=out)
    assert not out.exists()
    failed = json.loads((tmp_path / "onnx-failed" / "parity.json").read_text())
    assert failed["fp32_max_abs_diff"] >= 0.0 and failed["samples"] == 30


def test_int8_warns_below_agreement_threshold(encoder_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    import textclass.export.onnx as export_mod
    from textclass import api

    monkeypatch.setattr(export_mod, "INT8_MIN_AGREEMENT", 1.01)  # no agreement can reach it
    with caplog.at_level("WARNING", logger="textclass"):
        api.export(encoder_run, output=tmp_path / "onnx", int8=True)
    assert any("int8 agrees with PyTorch" in r.getMessage() for r in caplog.records)


def test_cli_export_prints_parity(encoder_run: Path, tmp_path: Path) -> None:
    res = cli("export", "--model", encoder_run, "--int8", "--output", tmp_path / "out", "--samples", "10")
    assert res.returncode == 0, res.stderr
    assert "fp32 max |delta probability| vs PyTorch" in res.stdout and "int8 top-1 agreement" in res.stdout
    assert json.loads((tmp_path / "out" / "export.json").read_text())["parity"]["samples"] == 10


def _one_line_error(res: object, *fragments: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_input(encoder_run: Path, tmp_path: Path) -> None:
    _one_line_error(cli("export", "--model", tmp_path), "not a textclass run directory")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_line_error(cli("export", "--model", encoder_run, "--output", blocker / "onnx"), "cannot write", "--output")
    _one_line_error(cli("predict", "--model", encoder_run, "-i", "--backend", "gpu"), "unknown backend")


def test_no_export_and_corrupt_files(tiny_bert: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = _train(tiny_config(tiny_bert, _files(tmp_path), tmp_path / "run", epochs=1))
    _one_line_error(cli("predict", "--model", run_dir, "-i", "--backend", "onnx"), "textclass export --model")
    assert cli("predict", "--model", run_dir, "-i", input="soup\n").returncode == 0  # auto without export: torch
    assert cli("export", "--model", run_dir, "--samples", "8").returncode == 0
    model = run_dir / "onnx" / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 2])  # truncated
    _one_line_error(cli("predict", "--model", run_dir, "-i"), "model.onnx", "corrupt or truncated")
    model.write_bytes(b"\x00garbage" * 100)  # corrupt
    _one_line_error(cli("info", "--model", run_dir), "corrupt or truncated")
    model.unlink()
    _one_line_error(cli("evaluate", "--model", run_dir, "--data", tmp_path / "valid.csv"), "ONNX file missing")
    (run_dir / "onnx" / "export.json").write_text("{not json")
    _one_line_error(cli("predict", "--model", run_dir, "-i"), "export.json")
    shutil.rmtree(run_dir / "onnx")
    res = cli("evaluate", "--model", run_dir, "--data", tmp_path / "valid.csv", "--backend", "torch", "--threads", "1")
    assert res.returncode == 0, res.stderr


def test_onnx_backend_of_an_encoder_never_imports_torch(encoder_run: Path) -> None:
    """The ONNX path tokenizes with the Rust `tokenizers` library and runs onnxruntime: no torch import,
    which is most of the memory an ONNX-serving process saves."""
    import subprocess
    import sys

    from textclass import api

    api.export(encoder_run)
    code = (
        "import sys; from textclass.inference.load import load_predictor; "
        f"p = load_predictor({str(encoder_run)!r}); print(p.backend, p.predict(['match goal', 'soup'])[1]['label']); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    expected = api.Classifier.load(encoder_run, backend="torch").predict(["soup"])[0]["label"]
    assert out[0] == f"onnx {expected}" and out[1] == "False False", out


def _bpe_tokenizer_files(tmp_path: Path, corpus: list[str]) -> list[Path]:
    """Byte-level BPE (GPT-2/RoBERTa style) and SentencePiece-style BPE (Metaspace), trained on the fly."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer

    paths = []
    for name, tok in {"bytelevel": ByteLevelBPETokenizer(), "metaspace": SentencePieceBPETokenizer()}.items():
        tok.train_from_iterator(corpus, vocab_size=300, min_frequency=1)
        paths.append(tmp_path / f"{name}.json")
        tok.save(str(paths[-1]))
    return paths


def test_prefix_encoding_gives_the_full_texts_ids(tiny_bert: Path, tmp_path: Path) -> None:
    """The ONNX path tokenizes only a prefix of long texts; the ids must be exactly the whole text's."""
    from conftest import make_texts

    from textclass.inference.onnx_backend import PREFIX_CHARS_PER_TOKEN, RustEncoder

    words = " ".join(make_texts(60, seed=3)["text"])
    texts = [
        words,  # long, ordinary spacing
        words.replace(" ", "   "),  # runs of spaces at the cut
        words.replace(" ", "\n"),  # newlines only: no space to cut at, encoded whole
        "x" * 500 + " " + words,  # a giant first word
        "https://example.com/" + "a" * 300 + " tail",  # the prefix cannot fill max_length: re-encoded whole
        "中文评论很好" * 80,  # no spaces at all
        "short text",
        "",
    ]
    corpus = make_texts(200, seed=4)["text"].tolist() + texts
    for file in [tiny_bert / "tokenizer.json", *_bpe_tokenizer_files(tmp_path, corpus)]:
        for max_length in (8, 16):
            enc = RustEncoder(file, max_length=max_length, pad_id=0, padding_side="right", names=["input_ids"])
            assert any(len(t) > PREFIX_CHARS_PER_TOKEN * max_length for t in texts)
            got = enc.encode(texts, None)
            for i, want in enumerate(enc.tok.encode_batch(texts)):
                assert got["input_ids"][i] == want.ids, (file.name, max_length, i)
                assert got["attention_mask"][i] == want.attention_mask


def test_fasttext_export_keeps_only_the_rows_in_use(tmp_path: Path) -> None:
    """fastText's hashed table is mostly zero rows; the export holds the rows in use (as the run directory
    does), maps every other id to one zero row, and int8 stores the table per row in int8."""
    from textclass import api

    model = {"family": "small", "arch": "fasttext", "embedding_dim": 16, "buckets": 200_000, "word_ngrams": 2, "minn": 2, "maxn": 3}
    run_dir = _train({"data": {k: str(v) for k, v in _files(tmp_path).items()}, "model": model,
                      "training": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 16}})
    record = api.export(run_dir, int8=True)
    weights = (run_dir / "model.safetensors").stat().st_size
    fp32, int8 = ((run_dir / "onnx" / f).stat().st_size for f in ("model.onnx", "model.int8.onnx"))
    assert fp32 < 2 * weights < 200_000 * 16 * 4 / 10, (fp32, weights)  # the dense table alone: 12.8 MB
    assert int8 < 0.6 * fp32, (int8, fp32)
    assert record["quantization"]["per_channel"] and record["parity"]["int8_agreement"] == 1.0
    # Unseen words and n-grams (ids of rows not in the file) among seen ones, any batch size.
    texts = PROBE + ["zqx vwk match", "qqq", "goal zzzzzz team"] + make_texts(37, seed=5)["text"].tolist()
    ref = _probs(run_dir, "torch", texts)
    for bs in (1, 7, 64):
        assert np.abs(_probs(run_dir, "onnx", texts, variant="fp32", batch_size=bs) - ref).max() <= 1e-4
        assert np.abs(_probs(run_dir, "onnx", texts, variant="int8", batch_size=bs) - ref).max() <= 1e-2


def test_export_needs_only_the_run_directory(tiny_bert: Path, tmp_path: Path) -> None:
    """Training saves a parity sample, so export works after the data files are gone (pairs and labels too)."""
    import pandas as pd

    from textclass import api

    (tmp_path / "data").mkdir()
    files = _files(tmp_path / "data", pairs=True)
    cfg = tiny_config(tiny_bert, files, tmp_path / "run", epochs=1)
    cfg["data"]["text_pair_column"] = "text_pair"
    run_dir = _train(cfg)
    valid = pd.read_csv(files["valid"])
    shutil.rmtree(tmp_path / "data")  # no training, validation or test file left
    record = api.export(run_dir)
    parity = record["parity"]
    assert "saved validation sample" in parity["source"] and parity["samples"] == len(valid)
    assert parity["fp32_max_abs_diff"] <= 1e-4 and parity["torch_accuracy"] is not None  # labels came along
    sample = pd.read_json(run_dir / "parity_sample.jsonl", lines=True)
    assert sorted(sample["text"]) == sorted(valid["text"]) and sorted(sample["text_pair"]) == sorted(valid["text_pair"])
