"""Tokenizers, vocabulary and word2vec loading of the small family."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from textclass.errors import UserError
from textclass.text import PAD_ID, SEP, SEP_ID, SPECIALS, UNK_ID, TextTokenizer, Vocab, load_word2vec, resolve_kind

MIXED = "我爱NLP and 深度学习 2024!"
EMOJI = "good 👍🏽 day 😀"


def test_word_tokenizer_mixed_empty_emoji() -> None:
    tok = TextTokenizer.fit([MIXED], "word")
    assert tok.tokenize(MIXED) == ["我爱nlp", "and", "深度学习", "2024", "!"]
    assert tok.tokenize("") == []
    assert tok.tokenize(EMOJI) == ["good", "👍", "🏽", "day", "😀"]
    assert TextTokenizer.fit([MIXED], "word", lowercase=False).tokenize("NLP") == ["NLP"]


def test_char_tokenizer_cjk_mixed_empty_emoji() -> None:
    tok = TextTokenizer.fit([MIXED], "char")
    assert tok.tokenize("深度 学习") == ["深", "度", "学", "习"]
    assert tok.tokenize(MIXED) == list("我爱nlpand深度学习2024!")
    assert tok.tokenize("   ") == []
    assert tok.tokenize("😀a") == ["😀", "a"]


def test_jieba_tokenizer_segments_words() -> None:
    pytest.importorskip("jieba")
    tok = TextTokenizer.fit([MIXED], "jieba")
    assert tok.tokenize(MIXED) == ["我", "爱", "nlp", "and", "深度", "学习", "2024", "!"]
    assert tok.tokenize("") == []
    assert "😀" in tok.tokenize("开心😀")


def test_jieba_missing_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jieba", None)  # makes `import jieba` raise ImportError
    with pytest.raises(UserError, match="pip install jieba"):
        TextTokenizer.fit(["文本"], "jieba")


def test_auto_decides_once_and_saves_the_decision(tmp_path: Path) -> None:
    assert resolve_kind("auto", ["今天天气很好，我们去公园散步。", "深度学习"]) == "char"
    assert resolve_kind("auto", ["the weather is nice today", "deep learning"]) == "word"
    assert resolve_kind("auto", []) == "word"
    tok = TextTokenizer.fit(["今天天气很好"], "auto")
    tok.save(tmp_path / "tokenizer.json")
    back = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert (back.kind, back.requested) == ("char", "auto")
    assert back.tokenize("english words here") == list("englishwordshere")  # no re-decision at predict time


def test_second_texts_of_pairs_are_in_the_vocabulary() -> None:
    """Fitted on the first column alone, every word of a text pair's second column was <unk>."""
    first = ["good movie", "bad plot", "none"]
    second = ["这部电影很好看，演员表演非常出色", "剧情太差了，完全看不下去", None]  # a null cell is an empty text
    joined = TextTokenizer.fit(first + second, "word")  # what training passes: the first texts, then the second
    assert joined.vocab == TextTokenizer.fit(first, "word", pairs=second).vocab
    assert all(UNK_ID not in joined.encode(a, b) for a, b in zip(first[:2], second[:2]))
    assert "剧情太差了" in joined.vocab and "movie" in joined.vocab
    assert UNK_ID in TextTokenizer.fit(first, "word").encode(first[0], second[0])  # the old, first-column-only fit
    # auto looks at both columns: mostly CJK once the second texts are counted
    assert TextTokenizer.fit(first, "auto").kind == "word"
    assert TextTokenizer.fit(first, "auto", pairs=second).kind == TextTokenizer.fit(first + second, "auto").kind == "char"


def test_vocab_order_min_freq_max_vocab() -> None:
    vocab = Vocab.build([["b", "a", "c", "c"], ["a", "b", "d", "<pad>"]], min_freq=2)
    assert vocab.tokens == [*SPECIALS, "a", "b", "c"]  # ties (all 2) alphabetical; d below min_freq
    assert (vocab.find("<pad>"), vocab.find("<unk>"), vocab.find(SEP)) == (PAD_ID, UNK_ID, SEP_ID) == (0, 1, 2)
    capped = Vocab.build([["z", "z", "z", "y", "y", "x"]], max_vocab=2)
    assert capped.tokens == [*SPECIALS, "z", "y"]
    assert capped.ids(["z", "x", "never"]) == [3, UNK_ID, UNK_ID]


def test_tokenizer_round_trip_gives_identical_ids(tmp_path: Path) -> None:
    texts = [MIXED, EMOJI, "", "深度学习很有趣"]
    tok = TextTokenizer.fit(texts, "char", max_vocab=10)
    tok.save(tmp_path / "tokenizer.json")
    back = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert back.vocab == tok.vocab and back.name_or_path == tok.name_or_path
    assert [back.encode(t) for t in texts + ["unseen 字"]] == [tok.encode(t) for t in texts + ["unseen 字"]]
    assert tok.encode("") == [UNK_ID]


def test_pairs_are_joined_with_sep_and_truncated_longest_first() -> None:
    tok = TextTokenizer.fit(["a b c d e f", "x y"], "word")
    assert tok.tokens("a b", "x y") == ["a", "b", SEP, "x", "y"]
    assert tok.tokens("a b c d e f", "x y", max_length=6) == ["a", "b", "c", SEP, "x", "y"]
    assert tok.encode("a", "x")[1] == SEP_ID


def test_bad_tokenizer_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="tokenizer file missing"):
        TextTokenizer.load(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        TextTokenizer.load(tmp_path / "tokenizer.json")


def test_word2vec_rows_header_and_case(tmp_path: Path) -> None:
    vocab = Vocab.build([["cat", "dog", "fish"]])
    path = tmp_path / "vec.txt"
    path.write_text("3 2\ncat 1 2\nDog 3 4\nbird 5 6\n<pad> 9 9\n", encoding="utf-8")
    ids, vectors = load_word2vec(path, vocab, 2, lowercase=True)
    assert dict(zip(ids.tolist(), vectors.tolist())) == {vocab.find("cat"): [1.0, 2.0], vocab.find("dog"): [3.0, 4.0]}
    no_header = tmp_path / "plain.txt"
    no_header.write_text("fish 0.5 -1\n", encoding="utf-8")
    ids, vectors = load_word2vec(no_header, vocab, 2)
    assert ids.tolist() == [vocab.find("fish")] and np.allclose(vectors, [[0.5, -1.0]])


def test_word2vec_dim_mismatch_and_missing_file(tmp_path: Path) -> None:
    vocab = Vocab.build([["cat"]])
    path = tmp_path / "vec.txt"
    path.write_text("cat 1 2 3\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"vec\.txt line 1: vectors have 3 dimensions but model\.embedding_dim is 8"):
        load_word2vec(path, vocab, 8)
    with pytest.raises(UserError, match="not found"):
        load_word2vec(tmp_path / "nope.txt", vocab, 8)
