"""Texts -> token ids of the prompt that wraps them, the same for train, evaluate, predict, serve and export.

Truncation cuts the texts, never the template: a prompt ending "... Answer:" keeps its end, so last-token
pooling and zero-shot scoring always read the position after the instruction. The whole rendered string
is tokenized in one piece (tokens at the joins are the ones the model saw in pretraining); when it is too
long, each text is cut at a token boundary of its own tokenization by the overflow and the string is
rendered again (a join can merge or split a token, so this repeats until it fits).
"""

from __future__ import annotations

import string
from typing import Any

from textclass.errors import UserError

PAIR_TEMPLATE = "{text}\n{text_pair}"  # no prompt, two text columns


class PromptEncoder:
    """Renders `template` for each text (and pair) and tokenizes it within `max_length` tokens."""

    def __init__(self, tokenizer: Any, template: str | None, labels_text: str, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.labels_text = labels_text
        self.max_length = max_length

    def _template(self, pairs: bool) -> str:
        template = self.template or (PAIR_TEMPLATE if pairs else "{text}")
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        if pairs and "text_pair" not in fields:
            raise UserError(
                "model.prompt has no {text_pair} placeholder but the data has a second text column "
                "(data.text_pair_column); add {text_pair} where the second text goes"
            )
        if not pairs and "text_pair" in fields:
            raise UserError("model.prompt uses {text_pair} but the data has one text column; set data.text_pair_column")
        return template

    def __call__(self, texts: list[str], pairs: list[str] | None) -> dict[str, list[list[int]]]:
        template = self._template(pairs is not None)
        fields: list[list[str]] = [list(texts)] + ([list(pairs)] if pairs is not None else [])
        self._check_room(template, pairs is not None)
        ids = self._tokenize(template, fields, range(len(texts)))
        for _ in range(8):
            long = [i for i, row in enumerate(ids) if len(row) > self.max_length]
            if not long:
                break
            for i in long:
                self._shorten([f[i] for f in fields], len(ids[i]) - self.max_length, fields, i)
            for i, row in zip(long, self._tokenize(template, fields, long), strict=True):
                ids[i] = row
        ids = [row[: self.max_length] for row in ids]  # never reached in practice: the loop above converges
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}

    def _render(self, template: str, fields: list[list[str]], i: int) -> str:
        pair = fields[1][i] if len(fields) > 1 else ""
        return template.format(text=fields[0][i], text_pair=pair, labels=self.labels_text)

    def _tokenize(self, template: str, fields: list[list[str]], rows: Any) -> list[list[int]]:
        rendered = [self._render(template, fields, i) for i in rows]
        return [list(x) for x in self.tokenizer(rendered, add_special_tokens=True)["input_ids"]] if rendered else []

    def _check_room(self, template: str, pairs: bool) -> None:
        """The template alone must leave room for text: else every example would be the prompt only."""
        empty = self._tokenize(template, [[""], [""]] if pairs else [[""]], [0])[0]
        if len(empty) >= self.max_length:
            raise UserError(
                f"model.max_length {self.max_length} leaves no room for the text: the prompt alone takes "
                f"{len(empty)} tokens; raise max_length or shorten model.prompt"
            )

    def _shorten(self, values: list[str], overflow: int, fields: list[list[str]], i: int) -> None:
        """Cut `overflow` tokens from the texts of row `i`, longest first, at token boundaries."""
        enc = [self._token_ends(v) for v in values]
        keep = [len(e) for e in enc]
        for _ in range(overflow):
            j = max(range(len(keep)), key=lambda k: keep[k])
            if keep[j] == 0:
                break
            keep[j] -= 1
        for j, (value, ends) in enumerate(zip(values, enc, strict=True)):
            if keep[j] < len(ends):
                fields[j][i] = value[: ends[keep[j] - 1]] if keep[j] > 0 else ""

    def _token_ends(self, text: str) -> list[int]:
        """Character offset where each of the text's own tokens ends (fast tokenizers give offsets; slow ones
        are approximated by an even split of the characters)."""
        if getattr(self.tokenizer, "is_fast", False):
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            return [end for _, end in offsets]
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return [round(len(text) * (k + 1) / n) for k in range(n)] if n else []
