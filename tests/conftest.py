"""Shared fixtures: a tiny random BERT with a WordPiece vocabulary trained on the fly, and toy data.

Nothing here touches the network: the encoder is built from a BertConfig, the tokenizer is trained with
the `tokenizers` library on the toy corpus.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = {
    "sport": "match goal team player coach league season score win referee stadium",
    "tech": "software chip computer phone internet data code robot network startup",
    "food": "recipe bread cheese soup kitchen flavour dinner chef spice oven",
}
FILLER = "the a of and to in on with for today said new very this".split()


def make_texts(n: int, seed: int = 0, topics: dict[str, str] = TOPICS) -> pd.DataFrame:
    """Separable toy data: each text mixes words of its topic with filler words, in random lengths."""
    rng = random.Random(seed)
    rows = []
    names = sorted(topics)
    for i in range(n):
        label = names[i % len(names)]
        words = topics[label].split()
        k = rng.randint(3, 14)
        text = " ".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(FILLER) for _ in range(k))
        rows.append({"text": text, "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tokenization cache in a temp dir, so tests never read a stale cache from a previous run."""
    os.environ["TEXTCLASS_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT and its WordPiece tokenizer, saved as a local model folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    corpus = make_texts(300, seed=1)["text"].tolist() + ["我爱自然语言处理", "这本书很好看"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # The vocabulary is built, not trained: the WordPiece trainer breaks frequency ties in hash order, which
    # differs between processes, and a different vocabulary makes the tiny model (and the tests) differ.
    words = sorted({w for t in corpus for w in t.lower().split() if len(w) > 1 or not w.isascii()})
    chars = sorted({c for t in corpus for c in t.lower() if not c.isspace()})
    vocab = specials + words + [c for c in chars if c not in words] + [f"##{c}" for c in chars]
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    fast.save_pretrained(folder)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def toy_files(tmp_path: Path) -> dict[str, Path]:
    """train/valid/test CSVs of the toy topics."""
    paths = {}
    for split, (n, seed) in {"train": (120, 10), "valid": (30, 11), "test": (30, 12)}.items():
        p = tmp_path / f"{split}.csv"
        make_texts(n, seed).to_csv(p, index=False)
        paths[split] = p
    return paths


def no_dropout_copy(model_folder: Path, folder: Path) -> Path:
    """A copy of a tiny BERT folder with its dropout (hidden layers and attention) set to 0: for checks that
    compare losses or passes exactly."""
    import json
    import shutil

    shutil.copytree(model_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def logged_losses(run_dir: Path) -> list[float]:
    """The training losses a run logged, in order."""
    import json

    return [e["loss"] for e in json.loads((Path(run_dir) / "training_log.json").read_text()) if "loss" in e]


def tiny_config(tiny_bert: Path, files: dict[str, Path], out: Path, **training: object) -> dict:
    """A fast config for the tiny BERT on the toy files."""
    return {
        "data": {k: str(v) for k, v in files.items()},
        "model": {"family": "encoder", "name": str(tiny_bert), "max_length": 32},
        "training": {
            "output_dir": str(out),
            "epochs": 4,
            "batch_size": 16,
            "learning_rate": 3e-3,
            "logging_steps": 5,
            **training,
        },
    }


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (hidden 64) and a word-level tokenizer with BOS and EOS but no pad token, as a
    local model folder: the shape of a real decoder LLM at a size that trains in seconds."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    corpus = make_texts(300, seed=1)["text"].tolist() + ["我爱自然语言处理", "这本书很好看"]
    prompt_words = "text topic label labels answer is which of fits the read choose one : , . ? yes no".split()
    words = sorted({w for t in corpus for w in t.lower().split()} | set(prompt_words) | set(TOPICS))
    chars = sorted({c for t in corpus for c in t if not c.isascii()})
    vocab = ["<unk>", "<s>", "</s>"] + words + chars
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace, punctuation and each CJK character
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_llm_config(tiny_llama: Path, files: dict[str, Path], out: Path, model: dict | None = None, **training: object) -> dict:
    """A fast config for the tiny Llama on the toy files (LoRA unless `model` says otherwise)."""
    return {
        "data": {k: str(v) for k, v in files.items()},
        "model": {"family": "llm", "name": str(tiny_llama), "max_length": 48, "dropout": 0.0, **(model or {})},
        "training": {"output_dir": str(out), "epochs": 3, "batch_size": 16, "learning_rate": 3e-3, "logging_steps": 5, **training},
    }
