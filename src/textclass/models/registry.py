"""One registry that builds, saves and loads every model family.

A family bundles what differs between encoders, LLMs and small models: how text becomes ids (its
tokenizer), how ids become batches (its collator), how the network is built, and how it is written to and
read from a run directory. Everything else (data, losses, Trainer, evaluation, prediction) is shared and
talks to models only through this interface.

Contract for models built here: `model(**batch)` (batch without `labels`) returns the logits tensor of
shape (batch, num_labels). Losses are computed outside the model by the one loss factory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from safetensors import SafetensorError
from torch import nn

from textclass.errors import UserError

Collator = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
# What reading a damaged or mismatched model folder raises: missing files, bad JSON, truncated or 0-byte
# safetensors (SafetensorError), shapes that do not fit. Loaders turn these into one-line UserErrors.
MODEL_FILE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


class Family(ABC):
    """Hooks a model family implements; the shared code does the rest."""

    name: ClassVar[str]
    # `precision: auto` on a CPU with native bf16: autocast makes a transformer's step ~1.5x faster;
    # embedding-bound families gain nothing from it and only pay the casts.
    cpu_autocast: ClassVar[bool] = True
    # With `final_model: best`, write only the checkpoints that improve the best metric: for families whose
    # checkpoints are large next to a training epoch (fastText's hashed table).
    save_only_improving: ClassVar[bool] = False

    @abstractmethod
    def build_tokenizer(self, cfg: Any, train_texts: list[str]) -> Any:
        """Return the tokenizer for a new run (pretrained, or fitted on `train_texts`)."""

    @abstractmethod
    def encode(self, tokenizer: Any, cfg: Any, texts: list[str], pairs: list[str] | None) -> dict[str, list]:
        """Turn a batch of texts (and optional second texts) into unpadded model inputs.

        Must return `input_ids` (one list per text); its lengths are used for length grouping.
        """

    @abstractmethod
    def collator(self, tokenizer: Any, cfg: Any) -> Collator:
        """Return a function that pads a list of encoded examples into a batch of tensors.

        Keys other than model inputs (`labels`, `length`) are handled by the shared code.
        """

    @abstractmethod
    def build_model(
        self, cfg: Any, num_labels: int, tokenizer: Any, id2label: dict[int, str], multi_label: bool = False
    ) -> nn.Module:
        """Build a fresh model that returns logits (`multi_label` for families that record the task)."""

    @abstractmethod
    def save(self, model: nn.Module, tokenizer: Any, cfg: Any, run_dir: Path) -> None:
        """Write weights and tokenizer into `run_dir` (safetensors, no pickles)."""

    @abstractmethod
    def load(self, cfg: Any, run_dir: Path, num_labels: int, id2label: dict[int, str]) -> tuple[nn.Module, Any]:
        """Read back what `save` wrote: (model in eval mode, tokenizer)."""

    def default_learning_rate(self, cfg: Any) -> float:
        """`training.learning_rate` when the config leaves it unset: the fine-tuning rate of pretrained encoders.

        Families that train from scratch override this; they need rates orders of magnitude higher.
        """
        return 5e-5

    def default_batch_size(self, cfg: Any) -> int:
        """`training.batch_size` when the config leaves it unset: what fits fine-tuning an encoder on a laptop.

        Families whose steps are tiny override this: there a step's fixed cost outweighs its arithmetic.
        """
        return 16

    def default_final_model(self, cfg: Any) -> str:
        """`training.final_model` when unset: `last`, as a plain fine-tuning script keeps.

        A pretrained encoder fine-tuned for a few epochs on a decaying learning rate ends at its best more
        often than a small validation set can tell: on bbc-news (212 validation texts) picking the best epoch
        cost 0.7 test points over six seeds, and keeping the last epoch matched the plain Trainer script.
        Families that train from scratch and improve unevenly override this.
        """
        return "last"


_REGISTRY: dict[str, Callable[[], Family]] = {}


def register(name: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: make a family available under `model.family: name`."""

    def wrap(cls: type[Family]) -> type[Family]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_family(name: str) -> Family:
    """The family for `model.family`; imports the family modules lazily."""
    _import_families()
    if name not in _REGISTRY:
        raise UserError(f"model.family: unknown family {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def _import_families() -> None:
    # Imported here, not at module top, so that `import textclass` stays cheap.
    import textclass.models.encoder  # noqa: F401

    try:
        import textclass.models.small  # noqa: F401
    except ImportError:  # the small family is optional until it exists
        pass
