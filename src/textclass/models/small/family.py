"""The `small` family: models trained from scratch on our own tokenizers.

Architectures (`model.arch`): fasttext, textcnn, textrnn, textrcnn, transformer. All share one
tokenizer/vocabulary (`textclass.text`), one id layout (vocabulary rows first, `<pad>`=0, `<unk>`=1,
`<sep>`=2) and a module attribute `embedding` whose first rows are the vocabulary, which is where
`pretrained_vectors` are written.

Batches: the sequence models get right-padded `input_ids` + `attention_mask`; fastText gets a flat id
tensor + `offsets` for its EmbeddingBag (vocabulary ids then hashed n-gram rows, no padding). Text pairs are
joined as `text <sep> pair` by the tokenizer.

Run directory: `textclass_tokenizer.json` (kind, lowercase, vocabulary; JSON; runs saved before read as
`tokenizer.json`, a name Hugging Face tools take for theirs) and `model.safetensors` (the state dict). `load`
rebuilds the network from the saved config and never reads `pretrained_vectors` again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from textclass.config import (
    Config,
    FastTextConfig,
    SmallModelConfig,
    TextCNNConfig,
    TextRCNNConfig,
    TextRNNConfig,
    TransformerConfig,
)
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.models.base import OnnxSpec, TextModel
from textclass.models.registry import Family, register
from textclass.models.small.cnn import TextCNN
from textclass.models.small.common import DropoutHead, pad_batch
from textclass.models.small.fasttext import FastText, batch_hashed_features, collate_bags, uses_buckets
from textclass.models.small.rnn import TextRCNN, TextRNN
from textclass.models.small.transformer import TransformerClassifier
from textclass.rundir import LEGACY_SMALL_TOKENIZER_FILE, SMALL_TOKENIZER_FILE, WEIGHTS_FILE
from textclass.text import UNK_ID, TextTokenizer, load_word2vec

log = logging.getLogger("textclass")


def _fasttext(c: FastTextConfig, v: int, n: int) -> nn.Module:
    # Sparse gradients: a step touches only the rows of the batch's features, not the ~1 GB table (the
    # Trainer gives such embeddings row-wise AdaGrad, training/optim.py).
    return FastText(v, n, c.embedding_dim, c.buckets if uses_buckets(c.word_ngrams, c.maxn) else 0, sparse=True)


def _textcnn(c: TextCNNConfig, v: int, n: int) -> nn.Module:
    return TextCNN(v, n, c.embedding_dim, c.filter_sizes, c.num_filters, c.dropout)


def _textrnn(c: TextRNNConfig, v: int, n: int) -> nn.Module:
    return TextRNN(v, n, c.embedding_dim, c.hidden_size, c.num_layers, c.rnn_type, c.rnn_pooling, c.dropout)


def _textrcnn(c: TextRCNNConfig, v: int, n: int) -> nn.Module:
    return TextRCNN(v, n, c.embedding_dim, c.hidden_size, c.num_layers, c.rnn_type, c.dropout)


def _transformer(c: TransformerConfig, v: int, n: int) -> nn.Module:
    return TransformerClassifier(
        v, n, c.embedding_dim, c.hidden_size, c.num_layers, c.num_heads, c.max_length, c.positional_encoding, c.dropout
    )


# Each builder takes the config class of its arch (`SMALL_ARCHS`), which `cfg.arch` selects: hence `Any`.
_Builder = Callable[[Any, int, int], nn.Module]
_BUILDERS: dict[str, _Builder] = {
    "fasttext": _fasttext,
    "textcnn": _textcnn,
    "textrnn": _textrnn,
    "textrcnn": _textrcnn,
    "transformer": _transformer,
}


# Default `training.learning_rate` per arch (models trained from scratch), measured on chinese-reviews and
# bbc-news with AdamW (row-wise AdaGrad for fastText's table) and the default linear schedule; see
# benchmarks/small_vs_fasttext.py.
DEFAULT_LEARNING_RATES = {"fasttext": 4e-2, "textcnn": 1e-3, "textrnn": 1e-3, "textrcnn": 1e-3, "transformer": 5e-4}
# Default `training.batch_size` per arch. fastText's step is a few sparse row updates, so the Trainer's
# fixed per-step cost (clipping, scheduler, callbacks, the dense head's AdamW) is a large share of it: fewer,
# larger batches train faster. Row-wise AdaGrad moves a row about `lr` per step, so the rate grows with the
# batch (64 at 1e-2 before). 5 epochs, 1 thread, this machine, test / valid accuracy, train s:
#   batch 64, lr 1e-2:  chinese-reviews 0.8433 / -,      3.3 s;     bbc-news 0.9434 / -,      1.8 s
#   batch 256, lr 4e-2: chinese-reviews 0.8508 / 0.8508, 2.3-2.5 s; bbc-news 0.9670 / 0.9623, 1.8-1.9 s
#   batch 512, lr 8e-2: chinese-reviews 0.8531 / 0.8531, 2.2 s;     bbc-news 0.9623 / 0.9623, 1.2 s
# 256 keeps 7 steps an epoch on bbc-news' 1,557 training texts; 512 would leave small data sets 2-3. The
# other archs keep 16 until measured.
DEFAULT_BATCH_SIZES = {"fasttext": 256, "textcnn": 16, "textrnn": 16, "textrcnn": 16, "transformer": 16}


def make_model(cfg: SmallModelConfig, vocab_size: int, num_labels: int) -> nn.Module:
    """The network for `cfg.arch`, freshly initialised (the config's own validators checked its key combinations)."""
    network = _BUILDERS[cfg.arch](cfg, vocab_size, num_labels)
    if isinstance(network, DropoutHead):
        network.samples = getattr(cfg, "multisample_dropout", 1)
    return network


def init_from_vectors(model: nn.Module, tokenizer: TextTokenizer, cfg: SmallModelConfig) -> int:
    """Copy word2vec vectors into the vocabulary rows of `model.embedding`; returns how many were found."""
    if not cfg.pretrained_vectors:
        return 0
    ids, vectors = load_word2vec(cfg.pretrained_vectors, tokenizer.vocab, cfg.embedding_dim, cfg.lowercase)
    if len(ids):
        weight = model.get_parameter("embedding.weight")
        with torch.no_grad():
            weight[torch.from_numpy(ids)] = torch.from_numpy(vectors).to(weight.dtype)
    return len(ids)


class SmallModel(TextModel):
    """A small network over textclass's own tokenizer (fastText, TextCNN, TextRNN, TextRCNN, Transformer)."""

    @property
    def small_cfg(self) -> SmallModelConfig:
        """`cfg.model`, which in this family is always the config of a small arch."""
        cfg = self.cfg.model
        assert isinstance(cfg, SmallModelConfig)
        return cfg

    @property
    def _bags(self) -> bool:
        return self.small_cfg.arch == "fasttext"

    def encode(self, texts: list[str], pairs: list[str] | None) -> dict[str, list]:
        """`input_ids`: vocabulary ids of the first `max_length` tokens (never empty).

        For fastText the hashed n-gram rows follow the vocabulary ids in the same list. One column keeps
        the Arrow cache schema fixed: a separate n-gram column can be empty for a whole batch (one-word
        texts), `datasets` then infers a null type and fails on the next batch.
        """
        cfg, tokenizer = self.small_cfg, self.tokenizer
        tokens = [tokenizer.tokens(t, pairs[i] if pairs is not None else None, cfg.max_length) for i, t in enumerate(texts)]
        ids = [tokenizer.vocab.ids(ts) or [UNK_ID] for ts in tokens]
        if isinstance(cfg, FastTextConfig) and uses_buckets(cfg.word_ngrams, cfg.maxn):  # `_bags`, narrowed
            hashed = batch_hashed_features(tokens, len(tokenizer.vocab), cfg.word_ngrams, cfg.minn, cfg.maxn, cfg.buckets)
            ids = [row + extra for row, extra in zip(ids, hashed, strict=True)]
        return {"input_ids": ids}

    def _pad(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self._bags:
            return collate_bags(features)
        input_ids, attention_mask = pad_batch([f["input_ids"] for f in features])
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def save_weights(self, run_dir: Path) -> None:
        self.tokenizer.save(run_dir / SMALL_TOKENIZER_FILE)
        compact = getattr(self.network, "compact_state_dict", None)  # fastText: its sparse table form, rows from a full scan
        state = compact(scan=True) if compact is not None else self.network.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, str(run_dir / WEIGHTS_FILE), metadata={"format": "pt", "arch": self.small_cfg.arch})

    def onnx_spec(self, sample_batch: dict[str, torch.Tensor]) -> OnnxSpec:
        if self._bags:
            return OnnxSpec(["input_ids", "offsets"], layout="bags")
        # The TorchScript trace of nn.MultiheadAttention bakes the example's batch x heads into a Reshape.
        spec = super().onnx_spec(sample_batch)
        spec.dynamo = self.small_cfg.arch == "transformer"
        return spec

    def onnx_module(self, int8: bool = False) -> nn.Module:
        lean = getattr(self.network, "onnx_module", None)  # fastText: only the table rows in use
        return lean(int8=int8) if lean is not None else super().onnx_module(int8)

    @property
    def quantizes_itself(self) -> bool:
        return hasattr(self.network, "onnx_module")


@register("small")
class SmallFamily(Family[SmallModelConfig]):
    """fastText, TextCNN, TextRNN, TextRCNN and a small Transformer over our own tokenizers."""

    cpu_autocast = False  # their cost is embedding lookups, which autocast does not speed up
    save_only_improving = True  # fastText's table with 2M buckets is ~0.8 GB at dimension 100

    def default_learning_rate(self, cfg: SmallModelConfig) -> float:
        return DEFAULT_LEARNING_RATES[cfg.arch]

    def default_batch_size(self, cfg: SmallModelConfig) -> int:
        return DEFAULT_BATCH_SIZES[cfg.arch]

    def default_final_model(self, cfg: SmallModelConfig) -> str:
        """`best`: trained from scratch for many epochs at high rates, small models improve unevenly."""
        return "best"

    def create(self, cfg: Config, labels: LabelSet, train_texts: list[str]) -> SmallModel:
        mcfg = cfg.model
        assert isinstance(mcfg, SmallModelConfig)
        tokenizer = TextTokenizer.fit(train_texts, mcfg.tokenizer, mcfg.lowercase, mcfg.min_freq, mcfg.max_vocab)
        network = make_model(mcfg, len(tokenizer.vocab), labels.num_labels)
        init_from_vectors(network, tokenizer, mcfg)
        return SmallModel(self, network, tokenizer, labels, cfg)

    def load(self, run_dir: Path, cfg: Config, labels: LabelSet, network: bool = True) -> SmallModel:
        mcfg = cfg.model
        assert isinstance(mcfg, SmallModelConfig)
        run_dir = Path(run_dir)
        tok_file = run_dir / SMALL_TOKENIZER_FILE
        tokenizer = TextTokenizer.load(tok_file if tok_file.is_file() else run_dir / LEGACY_SMALL_TOKENIZER_FILE)
        if not network:
            return SmallModel(self, nn.Module(), tokenizer, labels, cfg)
        weights = run_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise UserError(f"{weights}: weights missing; the run directory is incomplete, train again")
        # Built on the meta device and then allocated uninitialised: no throw-away random init of fastText's
        # ~1 GB table. The weights are copied in (not assigned), so the model never aliases the file's mmap.
        with torch.device("meta"):
            net = make_model(mcfg, len(tokenizer.vocab), labels.num_labels)
        net = net.to_empty(device="cpu")
        try:
            net.load_state_dict(load_file(str(weights)))
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise UserError(f"{weights}: does not match config.yaml (model.{mcfg.arch}): {first[:200]}") from None
        return SmallModel(self, net.eval(), tokenizer, labels, cfg)
