"""The small family: fastText hashing, every architecture's shape, padding invariance, learning, save/load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from textclass.config import SMALL_ARCHS, SmallModelConfig
from textclass.errors import UserError
from textclass.models.registry import get_family
from textclass.config import Config, build_config
from textclass.data.labels import LabelSet
from textclass.models.small.family import SmallFamily, SmallModel, make_model
from textclass.models.small.fasttext import (
    batch_word_ngram_buckets,
    char_ngram_buckets,
    fnv1a_32,
    hashed_features,
    word_ngram_buckets,
)
from textclass.text import SEP_ID, TextTokenizer
from textclass.training.optim import adamw_with_sparse_rows, sparse_parameters

ARCHS = ["fasttext", "textcnn", "textrnn", "textrcnn", "transformer"]
# 8 short texts, 3 classes; class 2 differs from class 0 only by word order, so fastText needs its bigrams.
TEXTS = ["good movie", "great film", "bad movie", "awful film", "movie good", "film great", "plot dull", "dull plot"]
LABELS = [0, 0, 1, 1, 2, 2, 1, 1]
FAMILY = SmallFamily()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(arch: str, **over: Any) -> SmallModelConfig:
    """The arch's config from shared small sizes; keys the arch has not (`buckets` for a TextCNN) are left out."""
    base = {"embedding_dim": 16, "hidden_size": 16, "num_filters": 8, "buckets": 1000, "dropout": 0.1, "max_length": 32}
    own = SMALL_ARCHS[arch].model_fields
    return SmallModelConfig(arch=arch, **{k: v for k, v in {**base, **over}.items() if k in own})


def full(cfg: SmallModelConfig) -> Config:
    """The whole config a model object holds, around a small-model section."""
    return build_config({"data": {"train": "x.csv"}, "model": cfg.model_dump()})


def as_model(tok: TextTokenizer, cfg: SmallModelConfig, network: torch.nn.Module | None = None, n_labels: int = 3) -> SmallModel:
    """The model object for a tokenizer, config and network built separately in a test."""
    labels = LabelSet([str(i) for i in range(n_labels)], multi_label=False)
    return SmallModel(FAMILY, network if network is not None else torch.nn.Module(), tok, labels, full(cfg))


def load(cfg: SmallModelConfig, folder: Path, n_labels: int = 3) -> SmallModel:
    return FAMILY.load(folder, full(cfg), LabelSet([str(i) for i in range(n_labels)], multi_label=False))


def batch(tok: TextTokenizer, cfg: SmallModelConfig, texts: list[str], pairs: list[str] | None = None) -> dict:
    m = as_model(tok, cfg)
    return m.collate(m.features(texts, pairs))


def built(arch: str, n_labels: int = 3, texts: list[str] = TEXTS, **over: Any) -> tuple[Any, SmallModelConfig, Any]:
    torch.manual_seed(0)
    cfg = small_cfg(arch, **over)
    made = FAMILY.create(full(cfg), LabelSet([str(i) for i in range(n_labels)], multi_label=False), texts)
    tok, model = made.tokenizer, made.network
    if arch == "fasttext":  # fastText starts with a zero output layer; randomise it so scores differ
        torch.nn.init.normal_(model.fc.weight)
    return tok, cfg, model


def test_registered() -> None:
    assert isinstance(get_family("small"), SmallFamily)


def test_fnv1a_matches_reference_values() -> None:
    assert fnv1a_32("") == 0x811C9DC5
    assert fnv1a_32("a") == 0xE40C292C
    assert fnv1a_32("foobar") == 0xBF9CF968
    assert fnv1a_32("学") == 747258563  # fastText sign-extends bytes >= 0x80; fixed across processes


def test_hashed_feature_ids_are_fixed() -> None:
    # Expected values from a C++ transcription of fastText's dictionary.cc (hash + addWordNgrams).
    assert word_ngram_buckets(["hello", "world", "学习", "x"], 3, 1000) == [20, 384, 789, 494, 651]
    assert hashed_features(["hello", "world"], 10, 2, 0, 0, 1000) == [10 + 20]  # rows after the vocabulary
    expected = tuple(fnv1a_32(g) % 1000 for g in ["<a", "a", "ab", "b", "b>"])  # no lone boundary markers
    assert char_ngram_buckets("ab", 1, 2, 1000) == expected


def _ngram_buckets_loop(tokens: list[str], n: int, buckets: int) -> list[int]:
    """dictionary.cc's addWordNgrams, transcribed loop for loop (int32 hashes widened to uint64)."""
    u64 = (1 << 64) - 1
    hashes = [(h - (1 << 32) if h >= (1 << 31) else h) & u64 for h in map(fnv1a_32, tokens)]
    out = []
    for i in range(len(hashes)):
        h = hashes[i]
        for j in range(i + 1, min(i + n, len(hashes))):
            h = (h * 116049371 + hashes[j]) & u64
            out.append(h % buckets)
    return out


@pytest.mark.parametrize("n", [2, 3, 5])
def test_vectorised_ngram_hashing_equals_the_loop(n: int) -> None:
    import random

    rng = random.Random(n)
    words = ["a", "学", "习", "hello", "😀", "xxxxx", "é"]
    texts = [[rng.choice(words) for _ in range(rng.choice([0, 1, 2, 3, 7, 20]))] for _ in range(200)]
    texts = [[], *texts, []]  # empty texts first and last: nothing shifts into a neighbour
    got = batch_word_ngram_buckets(texts, n, 2_000_000)
    assert [g.tolist() for g in got] == [_ngram_buckets_loop(t, n, 2_000_000) for t in texts]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_ngram_hashing_of_texts_shorter_than_n(n: int) -> None:
    """A batch with fewer tokens in all than n (a lone one-word text under word_ngrams 4) crashed `serve`."""
    texts = [["w", "学", "x", "😀", "y", "z"][:length] for length in range(n + 1)]
    for text in texts:  # each alone
        assert [g.tolist() for g in batch_word_ngram_buckets([text], n, 1000)] == [_ngram_buckets_loop(text, n, 1000)]
    for group in (texts, texts[::-1], texts[:2], [texts[1], texts[0], texts[1]]):  # and in batches
        got = batch_word_ngram_buckets(group, n, 1000)
        assert [g.tolist() for g in got] == [_ngram_buckets_loop(t, n, 1000) for t in group]
    tok, cfg, model = built("fasttext", word_ngrams=n)  # what `serve` runs for one short request
    for text in ["good", "", "good movie"]:
        assert model(**batch(tok, cfg, [text])).shape == (1, 3)


def test_word_ngrams_see_word_order() -> None:
    def features(word_ngrams: int) -> tuple[list[int], list[int]]:
        tok, cfg, _ = built("fasttext", word_ngrams=word_ngrams)
        ab, ba = as_model(tok, cfg).encode(["good movie", "movie good"], None)["input_ids"]
        return sorted(ab), sorted(ba)

    ab, ba = features(1)
    assert ab == ba
    ab, ba = features(2)
    assert ab != ba and max(ab) >= 3 + 2  # a bucket row after the vocabulary


def test_char_ngrams_give_unknown_words_features() -> None:
    tok, cfg, _ = built("fasttext", word_ngrams=1, minn=2, maxn=3)
    (ids,) = as_model(tok, cfg).encode(["moviez"], None)["input_ids"]
    assert ids[0] == 1 and len(ids) > 1 and min(ids[1:]) >= len(tok.vocab)  # <unk> + hashed char n-grams


def test_default_buckets_work() -> None:
    tok, cfg, model = built("fasttext", embedding_dim=4, buckets=SmallModelConfig().buckets, maxn=5, minn=3)
    assert model.embedding.weight.shape == (len(tok.vocab) + 2_000_000, 4)
    assert sparse_parameters(model) == [model.embedding.weight]  # trained row-wise, not with a dense step
    assert model(**batch(tok, cfg, ["a long text with words never seen", ""])).shape == (2, 3)



def test_fasttext_table_is_stored_as_its_nonzero_rows(tmp_path: Path) -> None:
    """Buckets start at zero, so the saved table holds only rows with data, and loads back bit for bit."""
    tok, cfg, model = built("fasttext", embedding_dim=4, buckets=50_000)
    weight = model.embedding.weight
    vocab = len(tok.vocab)
    assert bool(weight[:vocab].ne(0).all()) and not bool(weight[vocab:].ne(0).any())  # words random, buckets 0
    with torch.no_grad():
        weight[vocab + 7] = torch.tensor([1.0, -2.0, 0.0, 3.0])
        weight[vocab + 49_999] = torch.tensor([0.0, -0.0, 0.0, 0.0])  # negative zero is data too
        weight[3] = 0.0  # a zeroed word row must come back as zero
    assert "embedding.weight" in model.state_dict()  # the usual dense form for tracing and engines
    state = model.compact_state_dict(scan=True)  # edits outside training are found by scanning the table
    assert "embedding.weight" not in state
    assert state["embedding.row_ids"].tolist() == [i for i in range(vocab) if i != 3] + [vocab + 7, vocab + 49_999]
    as_model(tok, cfg, model).save_weights(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size < 10_000  # the dense table alone is 800 kB
    loaded = load(cfg, tmp_path).network
    got = loaded.embedding.weight.detach()
    assert torch.equal(got.view(torch.int32), weight.detach().view(torch.int32))  # bit-exact, -0.0 included
    other = make_model(small_cfg("fasttext", embedding_dim=4, buckets=50_000), len(tok.vocab), 3)
    other.load_state_dict(state)  # also into a model that already holds other values
    assert torch.equal(other.embedding.weight, weight)
    with pytest.raises(RuntimeError, match="size mismatch"):  # a table too small for the stored rows
        make_model(small_cfg("fasttext", embedding_dim=4, buckets=10), len(tok.vocab), 3).load_state_dict(state)


def test_fasttext_tracked_rows_cover_every_row_training_changed() -> None:
    """Checkpoints take the rows from the rows training fed instead of a scan: they must miss none."""
    from textclass.training.optim import RowWiseAdagrad

    tok, cfg, model = built("fasttext", embedding_dim=4, buckets=50_000)
    model.train()
    opt = RowWiseAdagrad([model.embedding.weight], lr=0.5)
    for texts in (["good film", "bad plot twist"], ["a good twist", "dull"]):
        b = batch(tok, cfg, texts)
        model(**b).sum().backward()
        opt.step()
        opt.zero_grad()
    scanned = model.compact_state_dict(scan=True)["embedding.row_ids"]
    state = model.compact_state_dict()
    tracked = state["embedding.row_ids"]
    assert len(scanned) > len(tok.vocab)  # training wrote hashed n-gram rows
    assert set(scanned.tolist()) <= set(tracked.tolist())
    other = make_model(small_cfg("fasttext", embedding_dim=4, buckets=50_000), len(tok.vocab), 3)
    other.load_state_dict(state)
    assert torch.equal(other.embedding.weight, model.embedding.weight)
    assert torch.equal(other.touched_rows.nonzero().squeeze(1), tracked)  # a compact load knows its rows
    dense = make_model(small_cfg("fasttext", embedding_dim=4, buckets=50_000), len(tok.vocab), 3)
    dense.load_state_dict(model.state_dict())  # a dense table: rows unknown, so saving scans
    assert torch.equal(dense.compact_state_dict()["embedding.row_ids"], scanned)


RNN_VARIANTS = [
    ("textrnn", {"rnn_type": "gru", "rnn_pooling": "attention"}),
    ("textrnn", {"rnn_pooling": "mean"}),
    ("textrcnn", {"rnn_type": "gru", "num_layers": 2}),
    ("transformer", {"positional_encoding": "learned"}),
    ("fasttext", {"minn": 2, "maxn": 4}),
    ("textcnn", {"filter_sizes": [1, 5]}),
]


@pytest.mark.parametrize("arch,over", [(a, {}) for a in ARCHS] + RNN_VARIANTS)
def test_shape_and_padding_invariance(arch: str, over: dict) -> None:
    texts = [
        "good",
        "我爱NLP and 深度学习 2024! 😀",
        "",
        "a much longer text that pads the others a lot " * 3,
        "dull plot",
    ]
    tok, cfg, model = built(arch, texts=texts + TEXTS, **over)
    model.eval()
    with torch.no_grad():
        together = model(**batch(tok, cfg, texts))
        alone = torch.cat([model(**batch(tok, cfg, [t])) for t in texts])
    assert together.shape == (len(texts), 3) and torch.isfinite(together).all()
    assert torch.allclose(together, alone, atol=1e-5)


def fit(arch: str, labels: torch.Tensor, multi_label: bool, steps: int = 150, **over: Any) -> torch.Tensor:
    """The Trainer's optimizer (AdamW; row-wise AdaGrad for fastText's table) on the tiny set; final predictions."""
    tok, cfg, model = built(arch, n_labels=3, dropout=0.0, **over)
    inputs = batch(tok, cfg, TEXTS)
    opt = adamw_with_sparse_rows(model, set(), lr=0.02, weight_decay=0.0) or torch.optim.AdamW(model.parameters(), lr=0.02)
    model.train()
    for _ in range(steps):
        logits = model(**inputs)
        loss = F.binary_cross_entropy_with_logits(logits, labels) if multi_label else F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(**inputs)
    return (logits > 0).float() if multi_label else logits.argmax(-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_single_label(arch: str) -> None:
    labels = torch.tensor(LABELS)
    assert torch.equal(fit(arch, labels, multi_label=False), labels)


def test_fasttext_overfits_multi_label_with_bce() -> None:
    labels = torch.tensor(
        [[1, 0, 0], [1, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 1, 0]]
    ).float()
    assert torch.equal(fit("fasttext", labels, multi_label=True, steps=200), labels)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch: str, tmp_path: Path) -> None:
    tok, cfg, model = built(arch, minn=2, maxn=3)
    as_model(tok, cfg, model).save_weights(tmp_path)
    back = load(cfg, tmp_path)
    loaded, tok2 = back.network, back.tokenizer
    assert not loaded.training and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "textclass_tokenizer.json"]
    texts, pairs = ["good movie", "", "unseen words 😀"], ["film", "great", ""]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch(tok, cfg, texts, pairs)), loaded(**batch(tok2, cfg, texts, pairs)))


def test_pairs_are_joined_with_sep() -> None:
    tok, cfg, _ = built("textcnn")
    ids = as_model(tok, cfg).encode(["good movie"], ["bad film"])["input_ids"][0]
    assert ids == tok.vocab.ids(["good", "movie"]) + [SEP_ID] + tok.vocab.ids(["bad", "film"])
    assert (
        len(as_model(tok, small_cfg("textcnn", max_length=3)).encode(["good movie"], ["bad film"])["input_ids"][0]) == 3
    )


def test_word2vec_initialises_vocabulary_rows(tmp_path: Path) -> None:
    path = tmp_path / "vectors.txt"
    path.write_text("2 4\nmovie 1 2 3 4\nplot -1 0 0.5 2\n", encoding="utf-8")
    for arch in ["fasttext", "textcnn"]:
        tok, _, model = built(arch, embedding_dim=4, pretrained_vectors=str(path))
        weight = model.embedding.weight.detach()
        assert weight[tok.vocab.find("movie")].tolist() == [1, 2, 3, 4]
        assert weight[tok.vocab.find("plot")].tolist() == [-1, 0, 0.5, 2]
    with pytest.raises(UserError, match="embedding_dim"):
        built("textcnn", embedding_dim=8, pretrained_vectors=str(path))


def test_config_and_run_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_heads"):  # pydantic's ValidationError: the config class checks it
        built("transformer", hidden_size=10, num_heads=4)
    with pytest.raises(ValueError, match="minn"):
        built("fasttext", minn=5, maxn=3)
    tok, cfg, model = built("textcnn")
    as_model(tok, cfg, model).save_weights(tmp_path)
    with pytest.raises(UserError, match="does not match"):
        load(small_cfg("textcnn", num_filters=4), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="weights missing"):
        load(cfg, tmp_path)


def test_trains_end_to_end_through_the_shared_trainer(toy_files: dict[str, Path], tmp_path: Path) -> None:
    """fastText's flat ids + offsets go through the Trainer, the Arrow cache, the run dir and Classifier."""
    from textclass import Classifier, train

    cfg = {
        "data": {k: str(v) for k, v in toy_files.items()},
        "model": {"family": "small", "arch": "fasttext", "embedding_dim": 16, "buckets": 5000, "minn": 2, "maxn": 4},
        "training": {"output_dir": str(tmp_path / "run"), "epochs": 5, "batch_size": 16, "learning_rate": 1e-2},
    }
    result = train(cfg)
    assert result.metrics["test"]["accuracy"] >= 0.9
    assert (result.run_dir / "textclass_tokenizer.json").is_file() and (result.run_dir / "model.safetensors").is_file()
    assert not (result.run_dir / "tokenizer.json").exists()  # the name Hugging Face tools read as theirs
    clf = Classifier.load(result.run_dir)
    preds = clf.predict(["match goal team referee", "", "😀"])
    assert len(preds) == 3 and preds[0]["label"] == "sport"
