"""One registry of model families; each builds (`create`) or reads (`load`) the one model object.

A family bundles what differs between encoders, LLMs and small models behind `TextModel`'s methods (how
text becomes ids, how ids become batches, how the network is saved and exported) plus its training
defaults. Everything else (data, losses, Trainer, evaluation, prediction, export) is shared and talks to
models only through the object. Adding a family is one module under `models/` and one line in
`_FAMILY_MODULES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from safetensors import SafetensorError

from textclass.config import Config
from textclass.data.labels import LabelSet
from textclass.errors import UserError

if TYPE_CHECKING:
    from textclass.models.base import TextModel

C = TypeVar("C")  # the family's config section (EncoderModelConfig, SmallModelConfig, ...)
# What reading a damaged or mismatched model folder raises: missing files, bad JSON, truncated or 0-byte
# safetensors (SafetensorError), shapes that do not fit. Loaders turn these into one-line UserErrors.
MODEL_FILE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


class Family(ABC, Generic[C]):
    """Builds and reads the model object of one family; hooks typed with the family's config section."""

    name: ClassVar[str]
    # `precision: auto` on a CPU with native bf16: autocast makes a transformer's step ~1.5x faster;
    # embedding-bound families gain nothing from it and only pay the casts.
    cpu_autocast: ClassVar[bool] = True
    # With `final_model: best`, write only the checkpoints that improve the best metric: for families whose
    # checkpoints are large next to a training epoch (fastText's hashed table).
    save_only_improving: ClassVar[bool] = False

    @abstractmethod
    def create(self, cfg: Config, labels: LabelSet, train_texts: list[str]) -> TextModel:
        """A fresh model for a new run (tokenizer pretrained, or fitted on `train_texts`: both columns of pairs)."""

    @abstractmethod
    def load(self, run_dir: Path, cfg: Config, labels: LabelSet, network: bool = True) -> TextModel:
        """Read back what `TextModel.save_weights` wrote; the network in eval mode.

        `network=False` reads only what encoding needs (the ONNX backend runs the graph, not the network).
        """

    def default_learning_rate(self, cfg: C) -> float:
        """`training.learning_rate` when the config leaves it unset: the fine-tuning rate of pretrained encoders.

        Families that train from scratch override this; they need rates orders of magnitude higher.
        """
        return 5e-5

    def default_batch_size(self, cfg: C) -> int:
        """`training.batch_size` when the config leaves it unset: what fits fine-tuning an encoder on a laptop.

        Families whose steps are tiny override this: there a step's fixed cost outweighs its arithmetic.
        """
        return 16

    def default_final_model(self, cfg: C) -> str:
        """`training.final_model` when unset: `last`, as a plain fine-tuning script keeps.

        A pretrained encoder fine-tuned for a few epochs on a decaying learning rate ends at its best more
        often than a small validation set can tell: on bbc-news (212 validation texts) picking the best epoch
        cost 0.7 test points over six seeds, and keeping the last epoch matched the plain Trainer script.
        Families that train from scratch and improve unevenly override this.
        """
        return "last"


# The family modules; each registers its family on import. Imported lazily so that `import textclass` and
# the torch-free ONNX backend stay cheap (the one accepted upward-looking import in the package).
_FAMILY_MODULES = ("textclass.models.encoder", "textclass.models.llm", "textclass.models.small")
_REGISTRY: dict[str, type[Family]] = {}


def register(name: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: make a family available under `model.family: name`."""

    def wrap(cls: type[Family]) -> type[Family]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_family(name: str) -> Family:
    """The family for `model.family`."""
    _import_families()
    if name not in _REGISTRY:
        raise UserError(f"model.family: unknown family {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def family_names() -> list[str]:
    """Every registered family (for the contract tests and `--help`)."""
    _import_families()
    return sorted(_REGISTRY)


def _import_families() -> None:
    import importlib

    for module in _FAMILY_MODULES:
        importlib.import_module(module)
