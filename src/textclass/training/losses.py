"""The one loss factory.

Models return logits; the loss is chosen here from `training.loss` and the label set: cross-entropy,
focal or poly-1 over a softmax (single-label) or independent sigmoids (multi-label), or ZLPR (multi-label).
Class weights and label smoothing are fixed here, once, and apply to every loss the same way; they are
never recomputed per batch (a weighted focal loss that overwrote its weights on the first batch is a bug
of the best-known peer).

Single-label losses follow torch's `cross_entropy` conventions exactly, so `focal` with gamma 0 and
`poly1` with epsilon 0 equal (weighted, smoothed) cross-entropy to float precision: per example
`(1-s) * w[y] * t(p_y) + s/C * sum_c w[c] * t(p_c)`, summed and divided by the sum of `w[y]`, where `t` is
`-log p` for cross-entropy and `-(1-p)^gamma log p` for focal. Written by hand because torch has no focal,
poly or ZLPR loss and torchvision's sigmoid focal loss has neither class weights nor smoothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from textclass.errors import UserError


def balanced_weights(labels: np.ndarray, num_labels: int, multi_label: bool) -> list[float]:
    """Inverse-frequency weights (sklearn's 'balanced' formula); for multi-label, BCE pos_weight = neg/pos."""
    if multi_label:
        pos = labels.sum(0)
        neg = len(labels) - pos
        return (neg / np.clip(pos, 1, None)).astype(float).tolist()
    counts = np.bincount(labels, minlength=num_labels)
    return (len(labels) / (num_labels * np.clip(counts, 1, None))).astype(float).tolist()


class SingleLabelLoss(nn.Module):
    """Softmax losses: `ce`, `focal`, `poly1`, with class weights and label smoothing."""

    weight: torch.Tensor  # empty: unweighted

    def __init__(self, kind: str, weight: torch.Tensor | None, smoothing: float, gamma: float, epsilon: float) -> None:
        super().__init__()
        self.kind, self.smoothing, self.gamma, self.epsilon = kind, smoothing, gamma, epsilon
        self.register_buffer("weight", weight if weight is not None else torch.empty(0))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "ce":
            w = self.weight if self.weight.numel() else None
            return F.cross_entropy(logits, target, weight=w, label_smoothing=self.smoothing)
        logp = F.log_softmax(logits.float(), dim=-1)
        n, c = logp.shape
        w = self.weight if self.weight.numel() else torch.ones(c, device=logp.device)
        per_class = -logp * ((1 - logp.exp()) ** self.gamma if self.kind == "focal" else 1.0)  # t(p_c)
        rows = torch.arange(n, device=logp.device)
        term = (1 - self.smoothing) * w[target] * per_class[rows, target] + self.smoothing / c * (per_class * w).sum(-1)
        loss = term.sum() / w[target].sum()
        if self.kind == "poly1":
            q = torch.full_like(logp, self.smoothing / c)
            q[rows, target] += 1 - self.smoothing
            p_true = (q * logp.exp()).sum(-1)  # the probability of the (smoothed) target
            loss = loss + self.epsilon * (w[target] * (1 - p_true)).sum() / w[target].sum()
        return loss


class MultiLabelLoss(nn.Module):
    """Sigmoid losses: `ce` (binary cross-entropy), `focal`, `poly1`, and `zlpr`; `pos_weight` per label."""

    pos_weight: torch.Tensor  # empty: unweighted

    def __init__(self, kind: str, pos_weight: torch.Tensor | None, smoothing: float, gamma: float, epsilon: float) -> None:
        super().__init__()
        self.kind, self.smoothing, self.gamma, self.epsilon = kind, smoothing, gamma, epsilon
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else torch.empty(0))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, y = logits.float(), target.float()
        pw = self.pos_weight if self.pos_weight.numel() else None
        if self.kind == "zlpr":
            return self._zlpr(logits, y > 0.5, pw)
        y = y * (1 - self.smoothing) + self.smoothing / 2
        if self.kind == "ce":
            return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw)
        logp, log1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
        p = logp.exp()
        pos = -(pw if pw is not None else 1.0) * y * logp
        neg = -(1 - y) * log1mp
        if self.kind == "focal":
            pos, neg = pos * (1 - p) ** self.gamma, neg * p**self.gamma
        loss = (pos + neg).mean()
        if self.kind == "poly1":
            loss = loss + self.epsilon * (1 - (y * p + (1 - y) * (1 - p))).mean()
        return loss

    @staticmethod
    def _zlpr(s: torch.Tensor, pos: torch.Tensor, pw: torch.Tensor | None) -> torch.Tensor:
        """log(1 + sum_neg e^s) + log(1 + sum_pos w e^-s) (Su et al.), per example, averaged; the zero logit
        is the decision boundary, i.e. probability 0.5 under the sigmoid the predictor applies."""
        zero = torch.zeros_like(s[:, :1])
        big = torch.finfo(s.dtype).max / 4
        log_w = torch.log(pw).expand_as(s) if pw is not None else torch.zeros_like(s)
        neg_terms = torch.where(pos, -big, s)
        pos_terms = torch.where(pos, -s + log_w, -big)
        return (torch.logsumexp(torch.cat([zero, neg_terms], 1), 1) + torch.logsumexp(torch.cat([zero, pos_terms], 1), 1)).mean()


def make_loss(
    multi_label: bool,
    num_labels: int,
    class_weights: Literal["none", "balanced"] | Sequence[float],
    train_labels: np.ndarray | None = None,
    kind: str = "ce",
    label_smoothing: float = 0.0,
    focal_gamma: float = 2.0,
    poly_epsilon: float = 1.0,
) -> nn.Module:
    """Build the training loss. Weights are fixed here, once, and never recomputed per batch."""
    if kind == "zlpr" and not multi_label:
        raise UserError("training.loss: zlpr is a multi-label loss and this run is single-label; use ce, focal or poly1")
    if kind == "zlpr" and label_smoothing:
        raise UserError("training.label_smoothing: zlpr ranks labels and has no targets to smooth; set it to 0")
    weights: list[float] | None = None
    if class_weights == "balanced":
        assert train_labels is not None
        weights = balanced_weights(train_labels, num_labels, multi_label)
    elif not isinstance(class_weights, str):
        weights = [float(w) for w in class_weights]
        if len(weights) != num_labels:
            raise UserError(f"training.class_weights: {len(weights)} weights given for {num_labels} labels; give one per label")
    w = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    if multi_label:
        return MultiLabelLoss(kind, w, label_smoothing, focal_gamma, poly_epsilon)
    return SingleLabelLoss(kind, w, label_smoothing, focal_gamma, poly_epsilon)


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """R-Drop's regulariser: (KL(p_a||p_b) + KL(p_b||p_a)) / 2 between two passes' predictions, summed over
    classes (multi-label: per-label Bernoulli KL, averaged over labels) and averaged over the batch."""
    a, b = a.float(), b.float()
    if multi_label:
        la, lb, na, nb = F.logsigmoid(a), F.logsigmoid(b), F.logsigmoid(-a), F.logsigmoid(-b)
        pa, pb = la.exp(), lb.exp()
        kl_ab = pa * (la - lb) + (1 - pa) * (na - nb)
        kl_ba = pb * (lb - la) + (1 - pb) * (nb - na)
        return ((kl_ab + kl_ba) / 2).mean()
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    kl_ab = (la.exp() * (la - lb)).sum(-1)
    kl_ba = (lb.exp() * (lb - la)).sum(-1)
    return ((kl_ab + kl_ba) / 2).mean()


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, multi_label: bool) -> torch.Tensor:
    """T² x the divergence of the student's softened predictions from the teacher's, averaged over the batch.

    Single-label: KL(softmax(t/T) || softmax(s/T)), summed over classes (Hinton et al. 2015). Multi-label:
    binary cross-entropy of sigmoid(s/T) against the teacher's sigmoid(t/T), averaged over labels (a softmax
    would make independent labels compete). T² keeps the gradients' scale as T changes: the gradient of
    either term in the logits is (p_s - p_t)/T, which shrinks like 1/T² for large T.
    """
    s, t = student.float() / temperature, teacher.float() / temperature
    if multi_label:
        soft = F.binary_cross_entropy_with_logits(s, torch.sigmoid(t), reduction="none").mean(-1)
    else:
        soft = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none", log_target=True).sum(-1)
    return soft.mean() * temperature**2


class DistillationLoss(nn.Module):
    """`alpha * hard + (1 - alpha) * T² * soft` (`soft_target_loss`), with the hard loss from `make_loss`.

    The teacher's logits come with the batch (`teacher_logits`, computed once before training); `labeled`
    marks the rows with a gold label (unlabeled texts learn from the teacher alone): the hard loss is the mean
    over the batch's labeled rows, the soft loss the mean over all rows. Called without teacher logits
    (validation) it is the hard loss, so validation loss means the same as in any run.
    """

    def __init__(self, hard: nn.Module, alpha: float, temperature: float, multi_label: bool) -> None:
        super().__init__()
        self.hard, self.alpha, self.temperature, self.multi_label = hard, alpha, temperature, multi_label

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        labeled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if teacher_logits is None:
            return self.hard(logits, target)
        rows = labeled.bool() if labeled is not None else torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        hard = self.hard(logits[rows], target[rows]) if rows.any() else logits.sum() * 0.0
        if self.alpha == 1.0:  # hard labels only: exactly the plain loss (the soft term is not even computed)
            return hard
        soft = soft_target_loss(logits, teacher_logits, self.temperature, self.multi_label)
        return self.alpha * hard + (1.0 - self.alpha) * soft
