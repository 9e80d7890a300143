"""Reading the prepared columns of a split frame (`text`, optional `text_pair`, `labels`): one helper each,
so training, evaluation, prediction and export agree on them."""

from __future__ import annotations

import pandas as pd


def text_columns(df: pd.DataFrame) -> tuple[list[str], list[str] | None]:
    """The texts, and the second texts of a pair task (None otherwise), as strings."""
    texts = df["text"].astype(str).tolist()
    return texts, df["text_pair"].astype(str).tolist() if "text_pair" in df.columns else None
