"""The llm family on conftest's tiny random Llama: pooling and padding, pad tokens, prompts, the fine-tuning
modes and what each saves, the base-model hash, gradient checkpointing, zero-shot, merging and bad input.

(The shared contract suite also runs every llm head through save/load, padding, ONNX and predict/evaluate.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_texts, tiny_llm_config

import textclass
from textclass.config import build_config
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.models.registry import get_family

LABELS = LabelSet(["food", "sport", "tech"], multi_label=False)
TEXTS = ["match goal team", "software chip computer phone internet data code robot", "soup", "the recipe of the chef"]


def _model(tiny_llama: Path, **model: object) -> object:
    cfg = build_config({"data": {"train": "x.csv"}, "model": {"family": "llm", "name": str(tiny_llama), "max_length": 48, **model}})
    torch.manual_seed(0)
    return get_family("llm").create(cfg, LABELS, [])


def _logits(m: object, texts: list[str], side: str) -> torch.Tensor:
    m.tokenizer.padding_side = side  # type: ignore[attr-defined]
    m.network.eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        batch = m.collate(m.features(texts))  # type: ignore[attr-defined]
        batch.pop("labels", None)
        return m.network(**batch)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("head", "pooling"), [("linear", "last"), ("mlp", "last"), ("linear", "mean"), ("hf", "last")])
def test_left_and_right_padding_give_the_same_logits(tiny_llama: Path, head: str, pooling: str) -> None:
    m = _model(tiny_llama, head=head, pooling=pooling, finetune="full")
    right, left = _logits(m, TEXTS, "right"), _logits(m, TEXTS, "left")
    batch = m.collate(m.features(TEXTS))  # type: ignore[attr-defined]
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding for this test to mean anything"
    assert torch.allclose(right, left, atol=1e-5), (right - left).abs().max()
    for i, text in enumerate(TEXTS):  # and each equals the text alone, unpadded
        assert torch.allclose(_logits(m, [text], "right")[0], right[i], atol=1e-5)


def test_pad_token_is_eos_in_the_tokenizer_and_the_model_config(tiny_llama: Path) -> None:
    m = _model(tiny_llama, head="hf", finetune="full")
    tok = m.tokenizer  # type: ignore[attr-defined]
    assert tok.pad_token == tok.eos_token == "</s>"  # the tiny Llama's tokenizer has no pad token of its own
    assert m.body.config.pad_token_id == tok.pad_token_id  # type: ignore[attr-defined]


def test_prompt_wraps_the_text_and_truncation_cuts_only_the_text(tiny_llama: Path) -> None:
    prompt = "read the text : {text} . which of {labels} fits ? answer :"
    m = _model(tiny_llama, prompt=prompt, max_length=24)
    tok = m.tokenizer  # type: ignore[attr-defined]
    short = m.encode(["match goal"], None)["input_ids"][0]  # type: ignore[attr-defined]
    assert tok.decode(short, skip_special_tokens=True).split() == "read the text : match goal . which of food , sport , tech fits ? answer :".split()
    long = m.encode(["match goal team " * 30], None)["input_ids"][0]  # type: ignore[attr-defined]
    assert len(long) == 24
    assert tok.decode(long[-12:], skip_special_tokens=True).split() == ". which of food , sport , tech fits ? answer :".split()

    pair_prompt = "{text} and {text_pair} ? answer :"
    m2 = _model(tiny_llama, prompt=pair_prompt, max_length=20)
    ids = m2.encode(["goal " * 40], ["soup"])["input_ids"][0]  # type: ignore[attr-defined]
    words = m2.tokenizer.decode(ids, skip_special_tokens=True).split()  # type: ignore[attr-defined]
    assert len(ids) == 20 and words[-4:] == ["soup", "?", "answer", ":"], words  # the long text gave way, not the short one


def test_prompt_that_leaves_no_room_for_text_is_refused(tiny_llama: Path) -> None:
    m = _model(tiny_llama, prompt="{text} " + "answer " * 30, max_length=16)
    with pytest.raises(UserError, match="leaves no room for the text"):
        m.encode(["goal"], None)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("{text} {label}", "unknown placeholder {label}"), ("no text here {labels}", "no {text} placeholder"), ("{text} {", "not a valid template")],
)
def test_bad_prompt_templates(prompt: str, message: str) -> None:
    with pytest.raises(UserError, match="model.prompt") as err:
        build_config({"data": {"train": "x.csv"}, "model": {"family": "llm", "prompt": prompt}})
    assert message in str(err.value)


def test_pair_data_needs_a_text_pair_placeholder(tiny_llama: Path) -> None:
    m = _model(tiny_llama, prompt="{text} answer :")
    with pytest.raises(UserError, match=r"no \{text_pair\} placeholder"):
        m.encode(["a"], ["b"])  # type: ignore[attr-defined]


def _train(tiny_llama: Path, toy_files: dict[str, Path], out: Path, model: dict, **training: object) -> Path:
    result = textclass.train(tiny_llm_config(tiny_llama, toy_files, out, model=model, **training))
    return Path(result.run_dir)


@pytest.mark.parametrize(
    ("finetune", "head", "saved", "absent"),
    [
        ("lora", "linear", {"adapter/adapter_model.safetensors", "head.safetensors"}, {"model.safetensors"}),
        ("lora", "hf", {"adapter/adapter_model.safetensors", "head.safetensors"}, {"model.safetensors"}),
        ("head", "mlp", {"head.safetensors"}, {"model.safetensors", "adapter"}),
        ("full", "linear", {"model.safetensors"}, {"head.safetensors", "adapter"}),
    ],
)
def test_finetune_modes_save_what_they_trained_and_reload_it(
    tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path, finetune: str, head: str, saved: set, absent: set
) -> None:
    run = _train(tiny_llama, toy_files, tmp_path / "run", {"finetune": finetune, "head": head}, epochs=1)
    for name in saved:
        assert (run / name).is_file(), name
    for name in absent:
        assert not (run / name).exists(), name
    record = json.loads((run / "llm.json").read_text())
    assert record["base_model"] == str(tiny_llama) and len(record["fingerprint"]) == 64
    texts = make_texts(20, seed=5)["text"].tolist()
    a = textclass.Classifier.load(run, backend="torch").predict_proba(texts)
    b = textclass.Classifier.load(run, backend="torch").predict_proba(texts)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.std(axis=0).max() > 1e-4, "a head that was not trained or not loaded scores every text alike"
    # The run's valid report was made from the weights as saved: evaluate on the same file agrees.
    report = textclass.evaluate(run, toy_files["valid"], output_dir=tmp_path / "eval", backend="torch")
    assert report["metrics"] == json.loads((run / "metrics.json").read_text())["valid"]
    total, trainable = record["parameters"]["all"], record["parameters"]["trainable"]
    if finetune == "lora":  # r=16 on every projection of the 2 blocks (in+out features each), plus the head
        projections = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]  # q k v o gate up down
        head_params = 64 * 3 + (3 if head == "linear" else 0)  # the hf head's `score` has no bias
        assert trainable == 2 * 16 * sum(i + o for i, o in projections) + head_params
    elif finetune == "head":
        assert trainable == sum(p.numel() for p in textclass.models.llm.network.build_head("mlp", 64, 3, 0.0, [512, 256]).parameters())
    else:
        assert trainable == total


def test_a_changed_base_model_is_refused_at_load(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    run = _train(base, toy_files, tmp_path / "run", {"finetune": "lora"}, max_steps=2)
    textclass.Classifier.load(run, backend="torch")  # the same base: loads
    from safetensors.torch import load_file, save_file

    weights = load_file(str(base / "model.safetensors"))
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[key] = weights[key] + 0.01
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="has changed since training"):
        textclass.Classifier.load(run, backend="torch")


def test_gradient_checkpointing_changes_memory_not_the_math(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    losses = {}
    for ckpt in (False, True):
        run = _train(tiny_llama, toy_files, tmp_path / f"run-{ckpt}", {"finetune": "lora"}, max_steps=6, logging_steps=1, gradient_checkpointing=ckpt)
        losses[ckpt] = [e["loss"] for e in json.loads((run / "training_log.json").read_text()) if "loss" in e]
    assert len(losses[True]) == 6
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_gradient_accumulation_and_bf16_autocast_train(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    run = _train(tiny_llama, toy_files, tmp_path / "run", {"finetune": "lora", "head": "mlp"}, max_steps=3, grad_accum=2, precision="bf16")
    report = textclass.evaluate(run, toy_files["valid"], output_dir=tmp_path / "eval", backend="torch")
    assert report["metrics"] == json.loads((run / "metrics.json").read_text())["valid"]  # reports in fp32 from the saved weights


def test_gradient_checkpointing_is_refused_for_small_models(toy_files: dict[str, Path], tmp_path: Path) -> None:
    cfg = {
        "data": {k: str(v) for k, v in toy_files.items()},
        "model": {"family": "small", "arch": "textcnn"},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "gradient_checkpointing": True},
    }
    with pytest.raises(UserError, match="training.gradient_checkpointing"):
        textclass.train(cfg)


def test_lora_target_modules_that_do_not_exist_are_listed(tiny_llama: Path) -> None:
    with pytest.raises(UserError, match="model.lora.target_modules: query not in") as err:
        _model(tiny_llama, finetune="lora", lora={"target_modules": ["q_proj", "query"]})
    assert "q_proj, up_proj, v_proj" in str(err.value)  # the layers that do exist


def test_default_lora_targets_every_block_projection(tiny_llama: Path) -> None:
    m = _model(tiny_llama, finetune="lora")
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in m.network.named_parameters() if "lora_A" in n}  # type: ignore[attr-defined]
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {n.split(".")[0] for n, p in m.network.named_parameters() if p.requires_grad and "lora_" not in n}  # type: ignore[attr-defined]
    assert trainable == {"head"}  # besides the adapters only the head trains


def test_an_encoder_is_not_a_causal_lm(tiny_bert: Path) -> None:
    cfg = build_config({"data": {"train": "x.csv"}, "model": {"family": "llm", "name": str(tiny_bert)}})
    with pytest.raises(UserError, match="not a causal .decoder. LLM; use model.family: encoder"):
        get_family("llm").create(cfg, LABELS, [])


def test_gguf_file_missing_or_not_gguf(tiny_llama: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    for gguf, message in [("missing.gguf", "no such file"), (str(fake), "not a GGUF file")]:
        cfg = build_config({"data": {"train": "x.csv"}, "model": {"family": "llm", "name": str(tiny_llama), "gguf_file": gguf}})
        with pytest.raises(UserError, match=message):
            get_family("llm").create(cfg, LABELS, [])


def test_head_lm_cannot_be_trained(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="textclass zero-shot"):
        textclass.train(tiny_llm_config(tiny_llama, toy_files, tmp_path / "run", model={"head": "lm"}))


def test_zero_shot_writes_a_run_directory_that_predicts_and_evaluates(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    from textclass.api import zero_shot

    out = tmp_path / "zs"
    result = zero_shot(["food", "sport", "tech"], data=toy_files["test"], model=str(tiny_llama), output=out, prompt="{text} topic :")
    assert Path(result["run_dir"]) == out and not (out / "checkpoints").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] == result["report"]["metrics"]
    clf = textclass.Classifier.load(out, backend="torch")
    texts = pd.read_csv(toy_files["test"])["text"].tolist()
    probs = clf.predict_proba(texts)
    assert probs.shape == (len(texts), 3)
    report = textclass.evaluate(out, toy_files["test"], output_dir=tmp_path / "eval", backend="torch")
    assert report["metrics"] == metrics["test"]

    # The scores are the LM's log-probabilities of the label words after the prompt, computed here directly.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, lm = AutoTokenizer.from_pretrained(tiny_llama), AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        ids = tok(texts[0] + " topic :", return_tensors="pt")["input_ids"]
        logp = torch.log_softmax(lm(ids).logits[0, -1], -1)
    expected = torch.softmax(logp[[tok.convert_tokens_to_ids(w) for w in ("food", "sport", "tech")]], -1).numpy()
    np.testing.assert_allclose(probs[0], expected, atol=1e-5)


def test_zero_shot_multi_token_label_words(tiny_llama: Path, tmp_path: Path) -> None:
    """A label of several words: the summed log-probability of its tokens, one after the other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from textclass.api import zero_shot

    words = {"food": "soup bread", "sport": "goal", "tech": "robot chip code"}
    out = tmp_path / "zs"
    zero_shot(["food", "sport", "tech"], model=str(tiny_llama), output=out, prompt="{text} answer :", config={"model": {"label_words": words}})
    probs = textclass.Classifier.load(out, backend="torch").predict_proba(["match goal", "the soup of the chef today"])
    tok, lm = AutoTokenizer.from_pretrained(tiny_llama), AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for row, text in zip(probs, ["match goal", "the soup of the chef today"], strict=True):
        scores = []
        for label in ("food", "sport", "tech"):
            prompt = tok(text + " answer :")["input_ids"]
            cont = tok(" " + words[label], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(lm(torch.tensor([prompt + cont])).logits[0], -1)
            scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont)))
        np.testing.assert_allclose(row, torch.softmax(torch.tensor(scores), -1).numpy(), atol=1e-5)


def test_merge_writes_a_standalone_full_run(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    from textclass.api import merge

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    run = _train(base, toy_files, tmp_path / "run", {"finetune": "lora", "head": "hf"}, max_steps=3)
    merged = Path(merge(run, tmp_path / "merged"))
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter").exists()
    texts = make_texts(12, seed=9)["text"].tolist()
    before = textclass.Classifier.load(run, backend="torch").predict_proba(texts)
    shutil.rmtree(base)  # the merged run needs no base model
    after = textclass.Classifier.load(merged, backend="torch").predict_proba(texts)
    np.testing.assert_allclose(after, before, atol=1e-5)
    with pytest.raises(UserError, match="no adapter"):
        merge(merged, tmp_path / "again")
    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    from textclass.api import export

    record = export(merged, int8=True)  # the merged run exports like any full fine-tune
    assert record["parity"]["fp32_max_abs_diff"] <= 1e-4 and record["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    onnx = textclass.Classifier.load(merged, backend="onnx").predict_proba(texts)  # int8 by default
    assert (onnx.argmax(1) == after.argmax(1)).mean() >= 0.9


def test_cli_zero_shot_and_merge(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    from test_cli import run as cli

    out = tmp_path / "zs"
    proc = cli("zero-shot", "--model", tiny_llama, "--labels", "food,sport,tech", "--data", toy_files["test"], "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accuracy" in proc.stdout and f"run directory: {out}" in proc.stdout
    proc = cli("predict", "--model", out, "--input", toy_files["test"], "--output", tmp_path / "p.csv", "--backend", "torch")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(pd.read_csv(toy_files["test"]))

    for args, message in [
        (["--labels", "food"], "two or more distinct label names"),
        (["--labels", "food,sport", "--data", str(toy_files["test"])], "not in the model's label set"),  # tech rows
        (["--labels", "food,sport,tech", "--prompt", "{txt} answer"], "unknown placeholder"),
        (["--labels", "food,sport,tech", "--set", "model.prompt={text}"], "quote the template"),  # YAML: a mapping
    ]:
        proc = cli("zero-shot", "--model", tiny_llama, "--output", tmp_path / "bad", *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()

    proc = cli("export", "--model", out, "--merge")  # a zero-shot run has no adapter
    assert proc.returncode == 2 and "no adapter to merge" in proc.stderr, proc.stderr
    assert not (tmp_path / "zs-merged").exists()


def test_lora_resume_reproduces_the_run_from_small_checkpoints(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    """Checkpoints hold only the trained weights (adapters, head); resuming from one continues exactly."""
    training = {"epochs": 2, "eval_steps": 4, "logging_steps": 1, "keep_checkpoints": True, "save_total_limit": 10}
    full = _train(tiny_llama, toy_files, tmp_path / "full", {"finetune": "lora"}, **training)
    ckpt = full / "checkpoints" / "checkpoint-4"
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all("lora_" in k or k.startswith("head.") for k in saved), sorted(saved)[:5]
    out = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints", out / "checkpoints")
    for later in (out / "checkpoints").glob("checkpoint-*"):
        if int(later.name.split("-")[1]) > 4:
            shutil.rmtree(later)
    resumed = textclass.train(tiny_llm_config(tiny_llama, toy_files, out, model={"finetune": "lora"}, **training), resume=True)
    losses = lambda run: {e["step"]: e["loss"] for e in json.loads((Path(run) / "training_log.json").read_text()) if "loss" in e}  # noqa: E731
    after = {s: v for s, v in losses(full).items() if s > 4}
    assert after and {s: losses(resumed.run_dir)[s] for s in after} == after
    texts = make_texts(10, seed=3)["text"].tolist()
    np.testing.assert_array_equal(
        textclass.Classifier.load(full, backend="torch").predict_proba(texts), textclass.Classifier.load(resumed.run_dir, backend="torch").predict_proba(texts)
    )


def test_serve_and_info_take_llm_runs(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("fastapi", reason="needs the serve extra")
    from fastapi.testclient import TestClient

    from textclass.inference.io import model_info
    from textclass.inference.load import load_predictor
    from textclass.serve import ServeSettings
    from textclass.serve.app import create_app

    run = _train(tiny_llama, toy_files, tmp_path / "run", {"finetune": "lora", "prompt": "{text} topic :"}, max_steps=3)
    predictor = load_predictor(run, backend="torch")
    texts = ["match goal team", "soup bread"]
    with TestClient(create_app(predictor, ServeSettings())) as c:
        r = c.post("/v1/classify", json={"texts": texts})
        assert r.status_code == 200 and r.json() == {"results": predictor.predict(texts)}
    info = model_info(run, repeats=1, backend="torch")
    record = json.loads((run / "llm.json").read_text())["parameters"]
    assert info["family"] == "llm" and info["model"] == str(tiny_llama)
    assert info["parameters"] == f"{record['all']:,}" and info["trainable parameters"] == f"{record['trainable']:,}"
    assert 0 < record["trainable"] < record["all"]


def test_a_bfloat16_base_trains_float32_adapters_and_head(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    m = _model(tiny_llama, finetune="lora", dtype="bfloat16")
    dtypes = {n.split(".")[0] + ("/lora" if "lora_" in n else ""): p.dtype for n, p in m.network.named_parameters() if p.requires_grad}  # type: ignore[attr-defined]
    assert dtypes == {"head": torch.float32, "body/lora": torch.float32}
    assert {p.dtype for n, p in m.network.named_parameters() if not p.requires_grad} == {torch.bfloat16}  # type: ignore[attr-defined]
    run = _train(tiny_llama, toy_files, tmp_path / "run", {"finetune": "lora", "dtype": "bfloat16"}, max_steps=3, precision="fp32")
    texts = make_texts(8, seed=4)["text"].tolist()
    a = textclass.Classifier.load(run, backend="torch").predict_proba(texts)
    np.testing.assert_allclose(a, textclass.Classifier.load(run, backend="torch").predict_proba(texts), atol=1e-6)
    for finetune, head in [("full", "linear"), ("lora", "hf")]:
        with pytest.raises(UserError, match="model.dtype"):
            build_config({"data": {"train": "x.csv"}, "model": {"family": "llm", "dtype": "bfloat16", "finetune": finetune, "head": head}})
