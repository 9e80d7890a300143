"""Optimizers for models with sparse embedding gradients (fastText's hashed table).

fastText's table has (vocabulary + 2M buckets) rows, and a batch uses a few thousand of them. A dense
optimizer step would touch all ~200M values, so the table is built with `sparse=True` and trained by
`RowWiseAdagrad`, which updates only the rows of the batch; the rest of the model keeps the Trainer's AdamW.
`CombinedOptimizer` presents both to the Trainer, its scheduler, accelerate and checkpointing as one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from textclass.errors import UserError
from textclass.table_rows import gather_rows, scatter_rows


def sparse_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Trainable weights of embeddings built with `sparse=True`: their gradients are sparse tensors."""
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad
    ]


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """`grad.coalesce()`, free when the row ids are already strictly increasing.

    fastText's backward (models/small/fasttext.py) emits sorted unique rows, but autograd stores the
    gradient as a new tensor flagged "not coalesced", and `coalesce()` would sort and sum it again. Strictly
    increasing ids are the definition of coalesced, and checking them is one pass over the ids.
    """
    if grad.is_coalesced() or grad.sparse_dim() != 1:
        return grad.coalesce()
    rows = grad._indices()[0]
    if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
        return grad.coalesce()
    return torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True, check_invariants=False)


def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (L2) that also accepts sparse gradients: same global norm, same scaling."""
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)  # a row used twice in a batch appears twice until coalesced
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
    if max_norm < math.inf:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.detach().mul_(coef.to(g.device, g.dtype))
    return total


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise AdaGrad for embedding tables with sparse gradients (FBGEMM/TorchRec's "rowwise adagrad").

    One accumulator per row holds the sum over steps of the row's mean squared gradient; a step updates
    only the rows in the batch: `G[r] += mean(g[r]**2)`, `w[r] -= lr * g[r] / (sqrt(G[r]) + eps)`.
    Hand-written because torch has no row-wise variant. Chosen over torch's SparseAdam after measuring
    both on chinese-reviews and bbc-news (benchmarks/small_vs_fasttext.py): equal or better accuracy,
    about half the step time (one pass over the batch's rows instead of SparseAdam's `sparse_mask` and
    sparse `add_` over two moment tables), and a state of one float per row, so a checkpoint of
    fastText's 2M-row table carries 8 MB of optimizer state instead of two table-sized moments.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-2, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowWiseAdagrad takes sparse gradients only; build the embedding with sparse=True")
                grad = coalesced(p.grad)  # one entry per row: duplicates summed
                rows, g = grad._indices()[0], grad._values()
                state = self.state[p]
                if not state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                # mean(g**2) per row as norm**2 / dim: no (rows, dim) temporary, 0.04 vs 0.14 ms for 5,000 rows.
                mean_sq = torch.linalg.vector_norm(g.float(), dim=1).square_().div_(g.shape[1])
                acc = gather_rows(state["sum"], rows).add_(mean_sq)
                scatter_rows(state["sum"], rows, acc)
                scale = acc.sqrt_().add_(group["eps"]).reciprocal_().unsqueeze(1).to(g.dtype)
                # Rows are unique after coalesce, so gather-add-scatter equals index_add_, which was slower on
                # a 2M-row table (2.0 vs 1.3 ms for 3,800 random rows of 100 floats, one thread).
                scatter_rows(p, rows, gather_rows(p, rows).addcmul_(g, scale, value=-group["lr"]))
        return loss


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped, zeroed, saved and restored as one.

    Hand-written because torch and transformers have none, and the Trainer, its LR scheduler, accelerate and
    checkpointing all want a single `torch.optim.Optimizer`. As accelerate's `AcceleratedOptimizer` does, it
    skips `Optimizer.__init__`: `param_groups` and `state` are views of the children, rebuilt on each access
    because a child's `load_state_dict` replaces its group dicts (the scheduler must set lr on the live ones).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:  # noqa: D107 - no super().__init__ on purpose
        self.optimizers = optimizers
        self.defaults = optimizers[0].defaults

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise UserError("checkpoint: optimizer state does not match this model's optimizers; train without --resume")
        for o, s in zip(self.optimizers, saved, strict=True):
            o.load_state_dict(s)


def param_groups(
    named: list[tuple[str, nn.Parameter]],
    decay_names: set[str],
    weight_decay: float,
    lr: float,
    scale: Callable[[str], float] | None = None,
) -> list[dict[str, Any]]:
    """The Trainer's decay / no-decay groups, split further by each weight's learning-rate multiple
    (`scale(name)`: the head's `head_lr_scale`, a layer's decay factor); empty groups left out. The group at
    the base rate comes first (the Trainer logs the first group's rate); the scheduler scales every group's own lr.
    """
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for n, p in named:
        grouped.setdefault((scale(n) if scale else 1.0, n in decay_names), []).append(p)
    order = sorted(grouped, key=lambda k: (k[0] != 1.0, -k[0], not k[1]))
    return [{"params": grouped[k], "weight_decay": weight_decay if k[1] else 0.0, "lr": lr * k[0]} for k in order]


_LAYER = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_decay_scale(names: list[str], decay: float, head: set[str], head_lr_scale: float) -> Callable[[str], float]:
    """Layer-wise learning-rate decay over a pretrained transformer's numbered blocks.

    Block i of L (`layer.i`, `layers.i`, `h.i`, `block.i` in Hugging Face names) trains at decay^(L-1-i),
    the embeddings at decay^L, other body weights (final norm, pooler) at 1, the head at `head_lr_scale`.
    """
    layers = {int(m.group(1)) for n in names if n not in head and (m := _LAYER.search(n))}
    if not layers:
        raise UserError(
            "training.layer_lr_decay: this model has no numbered transformer layers (a model trained from "
            "scratch?); leave layer_lr_decay unset"
        )
    top = max(layers)

    def scale(name: str) -> float:
        if name in head:
            return head_lr_scale
        m = _LAYER.search(name)
        if m:
            return decay ** (top - int(m.group(1)))
        return decay ** (top + 1) if "embed" in name else 1.0

    return scale


def adamw_with_sparse_rows(
    model: nn.Module,
    decay_names: set[str],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> CombinedOptimizer | None:
    """AdamW for dense weights (the Trainer's parameter groups) plus `RowWiseAdagrad` for sparse tables.

    None when the model has no sparse embedding: the Trainer's stock optimizer is used then. The dense
    optimizer comes first because the Trainer logs `param_groups[0]`'s learning rate. The table gets no
    weight decay (nor does fastText's).
    """
    sparse = sparse_parameters(model)
    if not sparse:
        return None
    skip = {id(p) for p in sparse}
    dense = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]
    groups = param_groups(dense, decay_names, weight_decay, lr)
    optimizers: list[torch.optim.Optimizer] = []
    if groups:
        optimizers.append(torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps))
    optimizers.append(RowWiseAdagrad(sparse, lr=lr, eps=eps))
    return CombinedOptimizer(optimizers)
