"""Stratified folds for k-fold training (`training.kfold`).

Single-label data is split with scikit-learn's `StratifiedKFold`; multi-label data with iterative
stratification (Sechidis et al. 2011) from the `iterative-stratification` package, which keeps each label's
share about equal in every fold where a stratified split by label combination would fail (most
combinations are rare). Both shuffle with the seed, so the same data and seed give the same folds.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from textclass.data.labels import LabelSet
from textclass.errors import UserError

log = logging.getLogger("textclass")


def assign_folds(df: pd.DataFrame, labels: LabelSet, k: int, seed: int) -> np.ndarray:
    """The fold (0 .. k-1) that holds out each row of `df` (columns text, [text_pair], labels).

    Single-label: every class needs at least `k` examples, or some fold would hold none of it out (a
    one-line UserError naming the rarest class). Multi-label: labels with fewer than `k` examples are
    allowed, with a warning naming them: some folds then hold none of them.
    """
    from sklearn.model_selection import StratifiedKFold

    n = len(df)
    y = labels.encode_all(df["labels"])
    rows = np.zeros((n, 1))  # the splitters read only the labels
    if labels.multi_label:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        if n < 2 * k:
            raise UserError(
                f"training.kfold: {k} folds need at least {2 * k} texts in train+valid and there are {n}; lower training.kfold"
            )
        counts = y.sum(axis=0)
        rare = [f"{labels.names[j]!r} ({int(counts[j])})" for j in np.flatnonzero(counts < k)]
        if rare:
            log.warning(
                "training.kfold: %d folds, but label(s) %s have fewer examples in train+valid: some folds hold none "
                "of them out, and their per-fold metrics for them are undefined",
                k,
                ", ".join(rare[:10]),
            )
        splits = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(rows, y)
    else:
        counts = np.bincount(y, minlength=labels.num_labels)
        rarest = int(np.argmin(counts))
        if counts[rarest] < k:
            have = int(counts[rarest])
            fix = (
                f"lower training.kfold to {have} or fewer" if have >= 2 else "add examples of it (k-fold needs 2 of every class)"
            )
            raise UserError(
                f"training.kfold: {k} folds need at least {k} examples of every class, and label "
                f"{labels.names[rarest]!r} has {have} in train+valid; {fix}"
            )
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(rows, y)
    fold = np.full(n, -1, dtype=np.int64)
    for i, (_, held_out) in enumerate(splits):
        fold[held_out] = i
    assert (fold >= 0).all()  # the splitters hold every row out exactly once
    return fold
