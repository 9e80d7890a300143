"""Weight averaging: an exponential moving average (EMA) or stochastic weight averaging (SWA, Izmailov et al.
2018) of the trainable weights, kept beside the model while it trains.

Why not `torch.optim.swa_utils.AveragedModel`: it deep-copies the whole module, so a LoRA LLM would hold
its frozen base model twice; here only the weights that train are shadowed (in fp32). None of our networks
has batch norm, so SWA needs no `update_bn` pass.

How the Trainer uses it (`ClassifierTrainer`): `AveragingCallback` updates the average after optimizer
steps (EMA: every step; SWA: every epoch or N steps from its start); `evaluate` runs with the averaged
weights swapped in, so validation, best-checkpoint choice and early stopping judge the weights the run
will keep; each checkpoint stores the raw weights (training resumes from them) plus the average
(`AVERAGE_FILE`); at the end of training the average of the kept checkpoint (best or last) is copied into
the network, which the run then saves, reloads and reports on.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

log = logging.getLogger("textclass")
AVERAGE_FILE = "averaged_weights.safetensors"  # inside a Trainer checkpoint folder, beside its raw weights


class WeightAverage:
    """fp32 shadows of a network's trainable weights; subclasses say how a snapshot enters them."""

    def __init__(self, network: nn.Module) -> None:
        self.params = {n: p for n, p in network.named_parameters() if p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {}
        self.count = 0  # snapshots taken

    @torch.no_grad()
    def update(self) -> None:
        if not self.shadow:
            self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        else:
            for n, p in self.params.items():
                self._blend(self.shadow[n], p.detach().float())
        self.count += 1

    def _blend(self, shadow: torch.Tensor, value: torch.Tensor) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The network holds the average inside the block and its own weights again after it."""
        if not self.shadow:
            yield
            return
        raw = {n: p.detach().clone() for n, p in self.params.items()}
        self.copy_to_network()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(raw[n])

    @torch.no_grad()
    def copy_to_network(self) -> None:
        for n, p in self.params.items():
            p.copy_(self.shadow[n].to(p.dtype))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {n: t.contiguous() for n, t in self.shadow.items()}, str(folder / AVERAGE_FILE), metadata={"count": str(self.count)}
        )

    def load(self, folder: Path) -> None:
        """The average a checkpoint holds (none there: no snapshot had been taken when it was written)."""
        from safetensors import safe_open

        path = folder / AVERAGE_FILE
        if not path.is_file():
            self.shadow, self.count = {}, 0
            return
        with safe_open(str(path), framework="pt") as f:
            self.shadow = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
            self.count = int((f.metadata() or {}).get("count", "1"))


class EMA(WeightAverage):
    """shadow <- d * shadow + (1 - d) * weights after every optimizer step, d = min(decay, (1 + n) / (10 + n))
    at the n-th update (TensorFlow's `num_updates` warm-up): a fine-tuning run of a few hundred steps would
    otherwise keep a large share of its first steps' weights (0.99^100 = 37%). Decay 0: the weights."""

    def __init__(self, network: nn.Module, decay: float) -> None:
        super().__init__(network)
        self.decay = decay

    def decay_at(self, count: int) -> float:
        return min(self.decay, (1.0 + count) / (10.0 + count))

    def _blend(self, shadow: torch.Tensor, value: torch.Tensor) -> None:
        shadow.lerp_(value, 1.0 - self.decay_at(self.count))  # lerp with weight 1 returns `value` exactly


class SWA(WeightAverage):
    """The running mean of the snapshots: after n of them, shadow = (w_1 + ... + w_n) / n."""

    def _blend(self, shadow: torch.Tensor, value: torch.Tensor) -> None:
        shadow.add_(value - shadow, alpha=1.0 / (self.count + 1))


def swa_start_step(start: float, total_steps: int, steps_per_epoch: int) -> int:
    """The optimizer step from which SWA collects (and its learning rate applies): `start` below 1 is a
    fraction of training, from 1 up an epoch count."""
    return math.ceil(start * total_steps) if start < 1 else math.ceil(start * steps_per_epoch)


class AveragingCallback(TrainerCallback):
    """Feeds the average: EMA after every optimizer step; SWA from `start_step` on, at each epoch's end or
    every `every_steps` steps."""

    def __init__(self, average: WeightAverage, every_steps: int | None = None, start: float = 0.0) -> None:
        self.average, self.every_steps, self.start = average, every_steps, start
        self.start_step = 0  # SWA: from `start`, set by the trainer once the number of steps is known

    def _collect(self, state: Any) -> None:
        if state.global_step >= self.start_step:
            self.average.update()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if isinstance(self.average, EMA) or (self.every_steps and state.global_step % self.every_steps == 0):
            self._collect(state)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if isinstance(self.average, SWA) and not self.every_steps:
            self._collect(state)
