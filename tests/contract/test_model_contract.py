"""The model contract: what every (family, arch/head) x task must do, checked through the public API only.

Cases come from the config schema: each `model.family` of `textclass.Config`'s model section, crossed with the
values of the field that picks its network (`head` for encoders, `arch` for small models), crossed with
the three tasks (single-label, multi-label, text pair). A new arch or head joins by being added to the
config (with its family's tiny sizes, or its own in `TINY_VARIANT`); a new family also needs its entries in
`VARIANT_FIELD` and `TINY` here, and fails loudly (never skips) until it has them.

Each case is trained once (module-scoped fixture), on ~60 toy texts as ONE batch (batch_size = the whole
train set) for a few steps with `logging_steps=1`, so the training log doubles as the "a step on a fixed
batch lowers the loss" check. Then, per case:

1. save -> load: two loads give the same probabilities, and the run's own valid report equals
   `textclass.evaluate` on the valid file;
2. a text scores the same alone and padded in a batch with longer (truncated) texts;
3. the ONNX fp32 export matches PyTorch within 1e-4, batched and one text at a time;
4. `Classifier.predict`, `textclass predict` (CLI) and `textclass.evaluate` make the same decisions;
5. the logged training loss on the fixed batch goes down.

The checks use only `textclass.train`, `textclass.Classifier`, `textclass.evaluate`, `textclass.api.export`
and the CLI, so they survive refactors of the internals (one extra test reads the registry, to check that
its families are the config's).
"""

from __future__ import annotations

import json
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import make_texts, no_dropout_copy
from test_cli import run as cli

import textclass

# --------------------------------------------------------------------------------------------------------
# The cases: ONE place. Families and their variants are read from the config schema.

# The field of each family's model section that selects its network.
VARIANT_FIELD = {"encoder": "head", "llm": "head", "small": "arch"}

# Tiny settings per family (every variant gets them) and per (family, variant); only keys that variant reads,
# since a model section refuses keys its arch does not read. `{tiny_bert}`: conftest's tiny BERT, without
# dropout (see `encoder_folder`).
TINY: dict[str, dict[str, Any]] = {
    "encoder": {"name": "{tiny_bert}", "max_length": 32},
    "llm": {"name": "{tiny_llama}", "max_length": 32, "dropout": 0.0},
    "small": {"max_length": 32, "embedding_dim": 16},
}
# Dropout 0 everywhere: check 5 compares the loss of one fixed batch across steps, and dropout's noise is
# larger than what a few steps at the default learning rates (1e-3 for most small archs) take off it.
TINY_VARIANT: dict[tuple[str, str], dict[str, Any]] = {
    ("encoder", "linear"): {"dropout": 0.0},
    ("small", "fasttext"): {"buckets": 1000, "minn": 2, "maxn": 3},
    ("small", "textcnn"): {"num_filters": 8, "dropout": 0.0},
    ("small", "textrnn"): {"hidden_size": 16, "dropout": 0.0},
    ("small", "textrcnn"): {"hidden_size": 16, "dropout": 0.0},
    ("small", "transformer"): {"hidden_size": 16, "num_heads": 2, "dropout": 0.0},
}
# Training settings per family: encoders fine-tune at 5e-5 by default, far too slow for a few steps of a
# random tiny BERT; small models keep their per-arch defaults.
TINY_TRAINING: dict[str, dict[str, Any]] = {"encoder": {"learning_rate": 3e-3}, "llm": {"learning_rate": 3e-3}, "small": {}}

TASKS = ("single", "multi", "pair")
STEPS = 8  # training steps, each on the whole (one-batch) train set

# (family, variant) -> reason: networks that are not trained, and so have no place in this suite.
NOT_TRAINED: dict[tuple[str, str], str] = {("llm", "lm"): "zero-shot label-word scoring; tests/models/test_llm.py covers it"}

# (family, variant, task) -> reason: known failures, asserted as xfail(strict=True) so a fix shows up.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


def _model_sections(annotation: Any = None) -> list[type]:
    """The concrete classes of the `model` section: the leaves of its (nested, discriminated) unions."""
    annotation = textclass.Config.model_fields["model"].annotation if annotation is None else annotation
    if isinstance(annotation, type):
        return [annotation]
    return [leaf for arg in typing.get_args(annotation) for leaf in _model_sections(arg)]


def _literal_values(section: type, field: str) -> list[str]:
    info = section.model_fields.get(field)  # type: ignore[attr-defined]
    values = typing.get_args(info.annotation) if info is not None else ()
    assert values and all(isinstance(v, str) for v in values), f"{section.__name__}.{field} is not a Literal"
    return list(values)


def family_variants() -> list[tuple[str, str]]:
    """(family, head or arch) for every network the config can describe, in schema order."""
    out: dict[tuple[str, str], None] = {}
    for section in _model_sections():
        for family in _literal_values(section, "family"):
            field = VARIANT_FIELD.get(family)
            assert field is not None, f"family {family!r}: add the field that picks its network to VARIANT_FIELD"
            out.update(dict.fromkeys((family, v) for v in _literal_values(section, field)))
    return list(out)


@dataclass(frozen=True)
class Case:
    family: str
    variant: str
    task: str

    @property
    def id(self) -> str:
        return f"{self.family}-{self.variant}-{self.task}"


CASES = [Case(f, v, t) for f, v in family_variants() if (f, v) not in NOT_TRAINED for t in TASKS]


def _param(case: Case) -> Any:
    reason = KNOWN_FAILURES.get((case.family, case.variant, case.task))
    return pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=reason)] if reason else [])


# --------------------------------------------------------------------------------------------------------
# Toy data for each task.

LONG = [
    "software chip computer phone internet data code robot network startup " * 6,  # > max_length: truncated
    "the match was a goal for the team and the coach said the league season score " * 3,
    "recipe bread cheese soup kitchen flavour dinner chef spice oven today",
]
SHORT = ["goal", "soup bread", "qwertyuiop", "a"]  # a known word, two words, an unknown word, a filler word


def _frame(task: str, n: int, seed: int) -> pd.DataFrame:
    df = make_texts(n, seed)
    if task == "multi":  # every third text mixes two topics and carries both labels
        other = make_texts(n, seed + 100)
        labels, texts = [], []
        rows = zip(df["text"], df["label"], other["text"], other["label"], strict=True)
        for i, (text, label, text2, label2) in enumerate(rows):
            if i % 3 == 0 and label != label2:
                texts.append(f"{text} {text2}")
                labels.append(sorted([label, label2]))
            else:
                texts.append(text)
                labels.append([label])
        return pd.DataFrame({"text": texts, "label": labels})
    if task == "pair":  # does the second text have the first one's topic?
        other = make_texts(n, seed + 100).sample(frac=1.0, random_state=seed).reset_index(drop=True)
        return pd.DataFrame(
            {
                "text": df["text"],
                "text_pair": other["text"],
                "label": ["same" if a == b else "different" for a, b in zip(df["label"], other["label"], strict=True)],
            }
        )
    return df


def _write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        df.to_csv(path, index=False)
    return path


@dataclass
class Trained:
    case: Case
    run_dir: Path
    result: Any
    files: dict[str, Path]  # train, valid, test
    frames: dict[str, pd.DataFrame]

    def pairs(self, texts: list[str]) -> list[str] | None:
        """Second texts for a pair task (the texts reversed), else None."""
        return list(reversed(texts)) if self.case.task == "pair" else None


def _config(case: Case, files: dict[str, Path], n_train: int, out: Path, folders: dict[str, Path]) -> dict[str, Any]:
    assert case.family in TINY, f"family {case.family!r}: add its tiny settings to TINY in {__file__}"
    model = {k: (v.format(**folders) if isinstance(v, str) else v) for k, v in TINY[case.family].items()}
    model.update({"family": case.family, VARIANT_FIELD[case.family]: case.variant})
    model.update(TINY_VARIANT.get((case.family, case.variant), {}))  # a new arch without an entry: family sizes
    data: dict[str, Any] = {"train": str(files["train"]), "valid": str(files["valid"])}
    if case.task == "pair":
        data["text_pair_column"] = "text_pair"
    return {
        "data": data,
        "model": model,
        "training": {
            "output_dir": str(out),
            "max_steps": STEPS,
            "batch_size": n_train,  # one batch: every step sees the same examples
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "eval_steps": STEPS,  # validate once, at the end: the run's valid report is what the tests read
            "seed": 0,
            **TINY_TRAINING.get(case.family, {}),
        },
    }


@pytest.fixture(scope="module")
def encoder_folder(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny BERT with its dropout (0.1 in the hidden layers and attention) set to 0."""
    return no_dropout_copy(tiny_bert, tmp_path_factory.mktemp("tiny-bert-no-dropout") / "model")


@pytest.fixture(scope="module", params=[_param(c) for c in CASES])
def trained(
    request: pytest.FixtureRequest, encoder_folder: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    case: Case = request.param
    folder = tmp_path_factory.mktemp(case.id)
    ext = ".jsonl" if case.task == "multi" else ".csv"
    frames = {"train": _frame(case.task, 60, 1), "valid": _frame(case.task, 30, 2), "test": _frame(case.task, 30, 3)}
    files = {split: _write(df, folder / f"{split}{ext}") for split, df in frames.items()}
    folders = {"tiny_bert": encoder_folder, "tiny_llama": tiny_llama}
    result = textclass.train(_config(case, files, len(frames["train"]), folder / "run", folders))
    return Trained(case, Path(result.run_dir), result, files, frames)


# --------------------------------------------------------------------------------------------------------
# Helpers.


def _decisions(results: list[dict[str, Any]], multi_label: bool) -> list[tuple[str, ...]]:
    return [tuple(sorted(r["labels"])) if multi_label else (r["label"],) for r in results]


def _gold(df: pd.DataFrame, multi_label: bool) -> list[tuple[str, ...]]:
    return [tuple(sorted(v)) if multi_label else (v,) for v in df["label"]]


def _split(cell: str) -> tuple[str, ...]:
    return tuple(sorted(x for x in str(cell).split("|") if x))


def _badcases(path: Path) -> Counter:
    bad = pd.read_csv(path, keep_default_na=False, dtype=str)
    pairs = bad["text_pair"] if "text_pair" in bad.columns else [""] * len(bad)
    return Counter(zip(bad["text"], pairs, map(_split, bad["gold"]), map(_split, bad["predicted"]), strict=True))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# --------------------------------------------------------------------------------------------------------
# The contract.


def test_the_registry_and_the_config_know_the_same_families() -> None:
    """A family registered but missing from the config (or the reverse) would escape this suite."""
    from textclass.models import registry

    if hasattr(registry, "family_names"):
        registered = set(registry.family_names())
    else:  # before the registry listed its families
        registered = {f for f, _ in family_variants() if registry.get_family(f) is not None}
    assert registered == {f for f, _ in family_variants()}
    assert set(TINY) == registered, "every family needs tiny settings in TINY"


def test_1_save_load_round_trip(trained: Trained, tmp_path: Path) -> None:
    texts = trained.frames["valid"]["text"].tolist()
    pairs = trained.frames["valid"]["text_pair"].tolist() if trained.case.task == "pair" else None
    clf = textclass.Classifier.load(trained.run_dir, backend="torch")
    first = clf.predict_proba(texts, pairs)
    second = textclass.Classifier.load(trained.run_dir, backend="torch").predict_proba(texts, pairs)
    assert first.shape == (len(texts), len(clf.labels))
    assert _max_diff(first, second) <= 1e-6

    # The run's own valid report (made from the weights as saved) is what `evaluate` finds on the same file.
    report = textclass.evaluate(trained.run_dir, trained.files["valid"], output_dir=tmp_path / "eval", backend="torch")
    run_metrics = json.loads((trained.run_dir / "metrics.json").read_text())["valid"]
    assert report["metrics"] == run_metrics
    assert trained.result.metrics["valid"] == run_metrics
    assert json.loads((trained.run_dir / "eval" / "valid" / "metrics.json").read_text()) == run_metrics
    assert _badcases(tmp_path / "eval" / "badcases.csv") == _badcases(trained.run_dir / "eval" / "valid" / "badcases.csv")


def test_2_padding_does_not_change_a_texts_scores(trained: Trained) -> None:
    clf = textclass.Classifier.load(trained.run_dir, backend="torch", batch_size=64)
    batch = LONG[:2] + SHORT + LONG[2:]  # one batch: the short texts are padded to the longest
    pairs = trained.pairs(batch)
    together = clf.predict_proba(batch, pairs)
    for i, text in enumerate(batch):
        alone = clf.predict_proba([text], [pairs[i]] if pairs else None)
        assert _max_diff(alone[0], together[i]) <= 1e-5, f"{text[:30]!r} alone vs in a padded batch"


def test_3_onnx_fp32_matches_torch(trained: Trained) -> None:
    pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'textclass[onnx]'")
    from textclass import api

    record = api.export(trained.run_dir)
    assert record["parity"]["fp32_max_abs_diff"] <= 1e-4
    texts = SHORT + LONG + trained.frames["test"]["text"].tolist()[:13]  # 20 texts, one word to truncated
    pairs = trained.pairs(texts)
    torch_probs = textclass.Classifier.load(trained.run_dir, backend="torch").predict_proba(texts, pairs)
    onnx = textclass.Classifier.load(trained.run_dir, backend="onnx")
    assert onnx.backend == "onnx"
    assert _max_diff(onnx.predict_proba(texts, pairs), torch_probs) <= 1e-4
    one_by_one = textclass.Classifier.load(trained.run_dir, backend="onnx", batch_size=1).predict_proba(texts, pairs)
    assert _max_diff(one_by_one, torch_probs) <= 1e-4


def test_4_predict_cli_and_evaluate_agree(trained: Trained, tmp_path: Path) -> None:
    df = trained.frames["test"]
    texts = df["text"].tolist()
    pairs = df["text_pair"].tolist() if trained.case.task == "pair" else None
    clf = textclass.Classifier.load(trained.run_dir, backend="torch")
    multi = clf.multi_label
    assert multi == (trained.case.task == "multi")
    predicted = _decisions(clf.predict(texts, pairs), multi)

    out = tmp_path / "predictions.csv"
    proc = cli("predict", "--model", trained.run_dir, "--input", trained.files["test"], "--output", out, "--backend", "torch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert written["text"].tolist() == texts
    if pairs is not None:
        assert written["text_pair"].tolist() == pairs
    assert [_split(c) for c in written["labels" if multi else "label"]] == predicted

    report = textclass.evaluate(trained.run_dir, trained.files["test"], output_dir=tmp_path / "eval", backend="torch")
    gold = _gold(df, multi)
    wrong = Counter(
        (t, p or "", g, d) for t, p, g, d in zip(texts, pairs or [None] * len(texts), gold, predicted, strict=True) if g != d
    )
    assert _badcases(tmp_path / "eval" / "badcases.csv") == wrong
    assert report["num_errors"] == sum(wrong.values())
    assert report["metrics"]["num_examples"] == len(texts)
    assert report["metrics"]["accuracy"] == pytest.approx(np.mean([g == d for g, d in zip(gold, predicted, strict=True)]))
    if multi:
        names = clf.labels
        mismatches = sum(len(set(g) ^ set(d)) for g, d in zip(gold, predicted, strict=True))
        assert report["metrics"]["hamming_loss"] == pytest.approx(mismatches / (len(texts) * len(names)))


def test_5_training_steps_lower_the_loss_on_a_fixed_batch(trained: Trained) -> None:
    log = json.loads((trained.run_dir / "training_log.json").read_text())
    losses = {e["step"]: e["loss"] for e in log if "loss" in e and "step" in e}
    assert sorted(losses) == list(range(1, STEPS + 1)), log
    assert all(np.isfinite(v) for v in losses.values()), losses
    assert losses[STEPS] < losses[1], f"loss per step on the one fixed batch: {losses}"
