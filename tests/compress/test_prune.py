"""`textclass prune`: a pruned run is an ordinary run directory (loads, predicts, reports, exports with its
parity check, `info` shows before -> after); vocabulary pruning keeps the logits of the texts it covers
(WordPiece, WordLevel and byte-level BPE); importance picks the least important units; every bad input is
one line and exit 2 with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_texts, tiny_config, tiny_llm_config
from test_cli import assert_user_error
from test_cli import run as cli

from textclass import Classifier, api, train
from textclass.compress.importance import choose
from textclass.compress.vocab import prune_vocabulary
from textclass.models import surgery
from textclass.rundir import PRUNE_FILE, STRUCTURE_FILE, load_model

PROBE = ["goal team chip", "bread soup coach", "the new code", "stadium oven data win", "我爱自然语言处理"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prune-data")
    out = {}
    for split, (n, seed) in {"train": (90, 10), "valid": (30, 11), "test": (30, 12)}.items():
        out[split] = root / f"{split}.csv"
        make_texts(n, seed).to_csv(out[split], index=False)
    return out


@pytest.fixture(scope="module")
def bert_run(tiny_bert: Path, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained 4-layer, 4-head tiny BERT run (linear head)."""
    from surgery_helpers import widened

    root = tmp_path_factory.mktemp("prune-bert")
    folder = widened(tiny_bert, root / "bert4", num_hidden_layers=4, num_attention_heads=4)
    return Path(train(tiny_config(folder, files, root / "run", epochs=2)).run_dir)


def _logits(run: Path, texts: list[str]) -> np.ndarray:
    m = load_model(run)
    with torch.no_grad():
        return m.network(**{k: v for k, v in m.collate(m.features(texts)).items()}).numpy()


def test_choose_removes_the_least_important_units_globally_and_keeps_one_per_group() -> None:
    scores = [torch.tensor([0.1, 0.9, 0.2, 0.8]), torch.tensor([0.05, 0.06])]
    assert choose(scores, [1, 1], 3) == [[1, 3], [1]]  # 0.05, 0.1 and 0.2 go; layer 1 keeps one
    assert choose(scores, [2, 1], 3) == [[1, 3], [1]]  # grouped: the worst of each group (0.1, 0.2) leave together
    assert choose(scores, [2, 1], 2) == [[0, 1, 2, 3], [1]]  # ... or not at all
    assert choose(scores, [1, 1], 10) == [[1], [1]]


def test_a_pruned_encoder_is_a_full_run_directory(bert_run: Path, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    res = cli(
        "prune", "--model", bert_run, "--output", out, "--heads", "0.5", "--ffn", "0.5", "--layers", "3", "--iterations", "2"
    )
    assert res.returncode == 0, res.stderr
    assert "parameters:" in res.stdout and "test accuracy" in res.stdout
    record = json.loads((out / PRUNE_FILE).read_text())
    assert record["removed"]["kept_layers"] == [0, 2, 3] and record["removed"]["heads"] == 6  # half of 3 x 4
    assert record["removed"]["ffn_neurons"] == 96  # half of 3 x 64
    assert record["after"]["parameters"] < record["before"]["parameters"]
    assert (out / STRUCTURE_FILE).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] == record["after"]["metrics"]["test"]
    clf = Classifier.load(out, backend="torch")
    assert len(clf.predict(PROBE)) == len(PROBE)
    blocks = surgery.transformer_layers(load_model(out).network)
    assert len(blocks) == 3 and sum(surgery.num_heads(b) for b in blocks) == 6
    info = cli("info", "--model", out, "--backend", "torch")
    assert "params before->after" in info.stdout and "batch 32 before->after" in info.stdout
    pytest.importorskip("onnxruntime")
    export = api.export(out, optimize=True)  # pruned heads: the generic graph optimisation, not BERT fusion
    assert export["parity"]["fp32_max_abs_diff"] < 1e-4


def test_vocabulary_pruning_keeps_the_logits_of_the_covered_texts(bert_run: Path, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "vocab"
    record = api.prune(bert_run, out, vocab=files["valid"])
    texts = make_texts(30, 11)["text"].tolist()
    np.testing.assert_allclose(_logits(out, texts), _logits(bert_run, texts), atol=1e-5)
    before = surgery.find_transformer(load_model(bert_run).network).get_input_embeddings().weight.shape[0]
    after = load_model(out)
    rows = surgery.find_transformer(after.network).get_input_embeddings().weight.shape[0]
    assert rows < before and record["removed"]["vocabulary"] == before - rows
    assert len(after.tokenizer) == rows  # tokenizer and embedding shrink together
    assert after.tokenizer.convert_ids_to_tokens(after.tokenizer("goal")["input_ids"]) == ["[CLS]", "goal", "[SEP]"]
    # a word none of the texts has falls apart into kept characters, not into one [UNK]
    unseen = after.tokenizer.tokenize("dcba")  # its pieces ##c ##b ##a occur in no text of the file
    assert "[UNK]" not in unseen and "".join(t.removeprefix("##") for t in unseen) == "dcba"


def test_recovery_fine_tunes_the_pruned_model(bert_run: Path, tmp_path: Path) -> None:
    record = api.prune(bert_run, tmp_path / "rec", heads=0.5, recover=1)
    assert record["options"]["recover"] == 1 and not (tmp_path / "rec" / "checkpoints").exists()
    cfg = yaml.safe_load((tmp_path / "rec" / "config.yaml").read_text())
    assert cfg["training"]["epochs"] == 2  # the run's own config, not the recovery's
    assert Classifier.load(tmp_path / "rec").predict(PROBE)


def test_recovery_from_teacher_distils_the_unpruned_run(bert_run: Path, tmp_path: Path, monkeypatch) -> None:
    import textclass.compress.distill as distill_mod

    seen: list[tuple[str, int]] = []
    original = distill_mod.teacher_logits

    def spy(teachers, paths, columns, frame, batch_size):
        seen.append((str(paths[0]), len(frame)))
        return original(teachers, paths, columns, frame, batch_size)

    monkeypatch.setattr(distill_mod, "teacher_logits", spy)
    api.prune(bert_run, tmp_path / "rec", heads=0.5, recover=1, recover_from_teacher=True)
    assert seen and seen[0][0] == str(bert_run)  # the unpruned run taught the recovery, once
    assert Classifier.load(tmp_path / "rec").predict(PROBE)
    proc = cli("prune", "-m", bert_run, "-o", tmp_path / "no", "--heads", "0.5", "--recover-from-teacher")
    assert proc.returncode == 2 and "--recover" in proc.stderr and not (tmp_path / "no").exists()


def test_a_lora_llm_run_is_merged_pruned_and_reloads(tiny_llama: Path, files: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_llm_config(tiny_llama, files, tmp_path / "llm", epochs=1)
    run = Path(train(cfg).run_dir)
    out = tmp_path / "pruned"
    record = api.prune(run, out, heads=0.5, ffn=0.25, layers=1, vocab=files["train"])
    assert record["removed"]["heads"] == 2 and record["removed"]["layers"] == 1  # 4 heads over 2 KV heads: 1 per group
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["finetune"] == "full"
    model = load_model(out)
    block = surgery.transformer_layers(model.network)[0]
    assert surgery.num_heads(block) == 2 and surgery.kv_groups(block) == 1
    texts = make_texts(90, 10)["text"].tolist()[:12]
    assert np.isfinite(_logits(out, texts)).all()
    assert Classifier.load(out).predict(PROBE[:2])


def _bpe_llama(tiny_llama: Path, folder: Path) -> Path:
    """The tiny Llama with a byte-level BPE tokenizer trained on the toy corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(make_texts(200, seed=3)["text"].tolist(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    config = AutoConfig.from_pretrained(tiny_llama)
    config.vocab_size = tok.get_vocab_size()
    config.bos_token_id, config.eos_token_id = 0, 1
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def monkey_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the rounds `prune_vocabulary` needs (calls of `kept_ids`)."""
    import textclass.compress.vocab as vocab

    calls = [0]
    original = vocab.kept_ids

    def counting(*args: object) -> list[int]:
        calls[0] += 1
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(vocab, "kept_ids", counting)
    return calls


def test_bpe_vocabulary_pruning_keeps_encodings_and_logits(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from surgery_helpers import LABELS, logits, make

    m = make(_bpe_llama(tiny_llama, tmp_path / "bpe"), "llm", head="linear")
    texts = make_texts(6, seed=5)["text"].tolist() + ["Überraschung!"]
    expected = logits(m, texts)
    old_ids = [f["input_ids"] for f in m.features(texts)]  # type: ignore[attr-defined]
    first_pass = monkey_counter(monkeypatch)
    sizes = prune_vocabulary(m, texts)  # type: ignore[arg-type]
    assert first_pass == [1]  # the merge rule alone keeps the encodings: no fix-up round was needed
    assert sizes["after"] < sizes["before"]
    tokens = m.tokenizer.convert_ids_to_tokens  # type: ignore[attr-defined]
    new_ids = [f["input_ids"] for f in m.features(texts)]  # type: ignore[attr-defined]
    assert [len(a) for a in old_ids] == [len(b) for b in new_ids]
    assert "".join(tokens(new_ids[-1])).endswith("!")
    m.save_weights(tmp_path / "run")  # type: ignore[attr-defined]
    from textclass.rundir import load_model_parts

    reloaded = load_model_parts(tmp_path / "run", m.cfg, LABELS)  # type: ignore[attr-defined]
    assert torch.allclose(logits(reloaded, texts), expected, atol=1e-5)


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--heads", "1.0"], "--heads 1.0"),
        (["--ffn", "-0.1"], "--ffn -0.1"),
        (["--layers", "0"], "--layers 0"),
        (["--layers", "9"], "the model has 4 layers"),
        (["--vocab", "missing.csv"], "--vocab missing.csv: no such file"),
        ([], "nothing to do"),
    ],
)
def test_bad_options_are_one_line(bert_run: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    assert_user_error(cli("prune", "--model", bert_run, "--output", out, *args), needle)
    assert not out.exists()


def test_outputs_that_would_clobber_something_are_refused(bert_run: Path, tmp_path: Path) -> None:
    assert_user_error(cli("prune", "--model", bert_run, "--output", bert_run, "--heads", "0.5"), "source run")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    assert_user_error(cli("prune", "--model", bert_run, "--output", other, "--heads", "0.5"), "not a textclass run")
    assert_user_error(cli("prune", "--model", tmp_path, "--output", tmp_path / "o", "--heads", "0.5"), "not a textclass run")
    assert (other / "a.txt").read_text() == "mine"


def test_kfold_and_small_family_runs_are_refused(bert_run: Path, files: dict[str, Path], tmp_path: Path) -> None:
    fake = tmp_path / "kfold"
    shutil.copytree(bert_run, fake)
    cfg = yaml.safe_load((fake / "config.yaml").read_text())
    cfg["training"]["kfold"] = 3
    (fake / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_user_error(cli("prune", "--model", fake, "--output", tmp_path / "o", "--heads", "0.5"), "k-fold")
    small = {"family": "small", "arch": "fasttext", "embedding_dim": 16, "buckets": 500}
    cfg = {
        "data": {k: str(v) for k, v in files.items()},
        "model": small,
        "training": {"output_dir": str(tmp_path / "s"), "epochs": 1},
    }
    run = train(cfg).run_dir
    assert_user_error(cli("prune", "--model", run, "--output", tmp_path / "o", "--layers", "1"), "no Hugging Face transformer")
    assert not (tmp_path / "o").exists()
