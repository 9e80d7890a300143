"""Vocabulary pruning: keep the tokens some texts use (plus every special and added token), shrink the
embedding matrix and rewrite the tokenizer's files to match, so those texts encode to the same tokens.

The tokenizer is rewritten at the level of its saved files (transformers 5 saves `tokenizer.json` and
`tokenizer_config.json`; older layouts may add `vocab.txt`), since no library shrinks a trained tokenizer:
- WordPiece / WordLevel: the vocabulary keeps the used tokens (WordPiece: and every one-character piece,
  so other texts degrade to characters, not [UNK]). WordPiece's greedy longest match then picks the same
  pieces for the given texts (the pieces it picked are kept; longer ones were absent before too).
- BPE: every used token, recursively the parts of every merge that produces a kept token, every
  single-character token (the byte-level base alphabet), and the merges whose parts and result are kept,
  in their old order. BPE applies the lowest-ranked applicable merge; every merge it applied is kept and
  none is added, so it applies the same ones.
Ids are renumbered in their old order: the new id of a kept token is its rank among the kept ids, in the
model vocabulary, the added tokens, the post-processor's special tokens and `added_tokens_decoder` alike.
A final check encodes the texts with both tokenizers; a text whose encoding differs (WordPiece words that
became [UNK] through another path) gets every vocabulary token that is a substring of it, until none differs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from textclass.errors import UserError
from textclass.models import surgery
from textclass.models.base import TextModel

MODELS = ("WordPiece", "WordLevel", "BPE")


def _tokenizer_json(model: TextModel) -> dict[str, Any]:
    backend = getattr(model.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("--vocab: this run's tokenizer is not a fast Hugging Face tokenizer; its vocabulary cannot be pruned")
    data: dict[str, Any] = json.loads(backend.to_str())
    kind = data["model"]["type"]
    if kind not in MODELS:
        raise UserError(f"--vocab: {kind} tokenizers are not supported (only {', '.join(MODELS)}); leave --vocab out")
    return data


def check_tokenizer(model: TextModel) -> None:
    """Refuse, with one line, a tokenizer whose vocabulary this module cannot prune."""
    _tokenizer_json(model)


def used_ids(model: TextModel, texts: list[str], pairs: list[str] | None) -> set[int]:
    """Token ids the model's encoding of `texts` uses (prompts and special tokens included)."""
    ids: set[int] = set()
    for f in model.features(texts, pairs):
        ids.update(int(i) for i in f["input_ids"])
    return ids


def _with_merge_parts(data: dict[str, Any], keep: set[str]) -> set[str]:
    """BPE: the kept tokens, every single character, and recursively the parts of merges producing a kept token."""
    vocab = data["model"]["vocab"]
    keep = keep | {t for t in vocab if len(t) == 1}
    produced: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merges(data):
        produced.setdefault(a + b, []).append((a, b))
    todo = list(keep)
    while todo:
        for a, b in produced.get(todo.pop(), []):
            for part in (a, b):
                if part not in keep and part in vocab:
                    keep.add(part)
                    todo.append(part)
    return keep


def _merges(data: dict[str, Any]) -> list[tuple[str, str]]:
    """BPE merges as pairs (tokenizer.json writes "a b" strings or [a, b] lists, by version)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in data["model"].get("merges", [])]  # type: ignore[misc]


def kept_ids(model: TextModel, data: dict[str, Any], used: set[int]) -> list[int]:
    """The old ids to keep: used ones, special and added tokens, and (BPE) what the merges need."""
    keep = set(used) | {int(t["id"]) for t in data.get("added_tokens", [])}
    keep |= set(getattr(model.tokenizer, "all_special_ids", []))
    vocab: dict[str, int] = data["model"]["vocab"]
    unk = data["model"].get("unk_token")
    if unk in vocab:
        keep.add(vocab[unk])
    if data["model"]["type"] == "BPE":
        names = {t for t, i in vocab.items() if i in keep}
        keep |= {vocab[t] for t in _with_merge_parts(data, names)}
    if data["model"]["type"] == "WordPiece":
        keep |= {i for t, i in vocab.items() if _is_character(t, data["model"].get("continuing_subword_prefix", "##"))}
    return sorted(keep)


def _is_character(token: str, prefix: str) -> bool:
    """A WordPiece token of one character (`a`, `##a`): kept whatever the texts, so that a word of other
    texts whose pieces were pruned still splits into characters instead of becoming [UNK] as a whole
    (WordPiece gives up on a word with any piece it cannot match). About 2,000 rows in BERT's vocabulary."""
    return len(token) == 1 or (token.startswith(prefix) and len(token) == len(prefix) + 1)


def rewrite(data: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """tokenizer.json with only the `keep` ids, renumbered in their old order."""
    new_id = {old: new for new, old in enumerate(keep)}
    model = data["model"]
    vocab = {t: new_id[i] for t, i in model["vocab"].items() if i in new_id}
    model["vocab"] = vocab
    if model["type"] == "BPE":
        model["merges"] = [[a, b] for a, b in _merges(data) if a in vocab and b in vocab and a + b in vocab]
    for t in data.get("added_tokens", []):
        t["id"] = new_id[int(t["id"])]
    _remap_processor(data.get("post_processor"), new_id)
    return data


def _remap_processor(proc: dict[str, Any] | None, new_id: dict[int, int]) -> None:
    """Special-token ids inside a post-processor (TemplateProcessing, Bert/RobertaProcessing, Sequence)."""
    if not proc:
        return
    for sub in proc.get("processors", []):
        _remap_processor(sub, new_id)
    for spec in proc.get("special_tokens", {}).values():
        spec["ids"] = [new_id[int(i)] for i in spec["ids"]]
    for key in ("sep", "cls"):
        if isinstance(proc.get(key), list):
            proc[key] = [proc[key][0], new_id[int(proc[key][1])]]


def _save_rewritten(model: TextModel, data: dict[str, Any], keep: list[int], folder: Path) -> Any:
    """The tokenizer saved, its files rewritten to the kept ids, and loaded back."""
    from transformers import AutoTokenizer

    new_id = {old: new for new, old in enumerate(keep)}
    model.tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(rewrite(json.loads(json.dumps(data)), keep)), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in config["added_tokens_decoder"].items()}
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    vocab_txt = folder / "vocab.txt"
    if vocab_txt.is_file():  # a slow WordPiece file: one token per line, in id order
        old = vocab_txt.read_text(encoding="utf-8").splitlines()
        vocab_txt.write_text("".join(old[i] + "\n" for i in keep if i < len(old)), encoding="utf-8")
    for stale in ("vocab.json", "merges.txt"):  # a slow BPE tokenizer's copies: tokenizer.json is the one read
        (folder / stale).unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for attr in ("padding_side", "truncation_side"):
        setattr(tokenizer, attr, getattr(model.tokenizer, attr))
    return tokenizer


def prune_vocabulary(model: TextModel, texts: list[str], pairs: list[str] | None = None) -> dict[str, int]:
    """Shrink the tokenizer and the embedding rows to the tokens `texts` need, in place; returns the sizes."""
    data = _tokenizer_json(model)
    before = int(surgery.find_transformer(model.network).get_input_embeddings().weight.shape[0])
    old_features = model.features(texts, pairs)
    used = used_ids(model, texts, pairs)
    vocab: dict[str, int] = data["model"]["vocab"]
    for _ in range(4):
        keep = kept_ids(model, data, used)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = _save_rewritten(model, data, keep, Path(tmp))
        old_tokenizer = model.tokenizer
        model.replace_tokenizer(tokenizer)
        new_features = model.features(texts, pairs)
        model.replace_tokenizer(old_tokenizer)
        mapped = {old: new for new, old in enumerate(keep)}
        differ = [
            i
            for i, (a, b) in enumerate(zip(old_features, new_features, strict=True))
            if [mapped.get(t, -1) for t in a["input_ids"]] != list(b["input_ids"])
        ]
        if not differ:
            break
        for i in differ:  # every vocabulary token that could be tried on this text
            text = (texts[i] + " " + (pairs[i] if pairs else "")).lower()
            used |= {v for t, v in vocab.items() if t.removeprefix("##") in text}
    else:
        raise UserError(
            f"--vocab: the pruned vocabulary still encodes {len(differ)} of the texts differently; "
            "leave --vocab out (and please report this tokenizer)"
        )
    surgery.slice_vocabulary(model.network, keep)
    model.replace_tokenizer(tokenizer)
    return {"before": before, "after": len(keep)}
