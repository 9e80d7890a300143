"""The one configuration schema.

The YAML file, `--set key=value` overrides on the command line and the Python API all build the same
pydantic model, so a value is validated in exactly one place. Unknown keys are rejected (`extra="forbid"`)
and every error names its dotted key path and what is allowed. The resolved config is written into every
run directory, which is how `predict`/`evaluate` know how the model was built.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from textclass.errors import UserError

if TYPE_CHECKING:  # what `type(BaseModel)` is, spelled so that mypy sees it (a private pydantic module)
    from pydantic._internal._model_construction import ModelMetaclass as _ModelMetaclass
else:
    _ModelMetaclass = type(BaseModel)

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT_FIELDS = ("text", "text_pair", "labels")  # the placeholders `model.prompt` may use


MultisampleDropout = Annotated[
    int,
    Field(
        ge=1,
        le=64,
        description="Multi-sample dropout: while training, the head runs on this many dropout masks of the same "
        "features and the loss is their mean (Inoue 2019); 1: off. Inference is unchanged.",
    ),
]
NoisyTune = Annotated[
    float,
    Field(
        ge=0.0,
        lt=1.0,
        description="NoisyTune: before training, add uniform noise of width noisytune x std to each trained "
        "pretrained weight (0.15 in its paper); 0: off.",
    ),
]


class _Section(BaseModel):
    # allow_inf_nan=False: `epochs: inf` or `learning_rate: nan` is refused here, not deep in training.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where the data is and how its columns map to text and labels."""

    dataset: str | None = Field(
        None,
        description="A built-in data set (`textclass data list`) or a Hugging Face hub data set name. "
        "Ignored when `train` is given.",
    )
    dataset_config: str | None = Field(None, description="Hub data set configuration name, if it has several.")
    train: str | None = Field(None, description="Training file or `save_to_disk` folder.")
    valid: str | None = Field(None, description="Validation file; if absent, split off `valid_ratio` of train.")
    test: str | None = Field(None, description="Test file, evaluated after training.")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "disk"] = Field(
        "auto", description="File format; `auto` decides by extension."
    )
    encoding: str = Field("utf-8", description="Text encoding of CSV/TSV/JSON files.")
    text_column: str = "text"
    text_pair_column: str | None = Field(None, description="Second text column for text-pair tasks.")
    label_column: str = "label"
    label_delimiter: str | None = Field(
        None, description="Split string labels on this delimiter into multi-label lists (e.g. ',' or '|')."
    )
    multi_label: Literal["auto"] | bool = Field("auto", description="`auto`: multi-label when labels are lists.")
    valid_ratio: float = Field(0.1, gt=0.0, lt=0.5, description="Share of train held out when no `valid`.")
    empty_texts: Literal["drop", "error"] = Field("drop", description="Empty/null texts: drop with a warning, or fail.")
    dedup: bool = Field(False, description="Drop exact (normalised) duplicates found by the leak audit.")
    seed: int = 42
    unlabeled: str | None = Field(
        None,
        description="Distillation only: texts without labels that the teacher labels softly; a file (its "
        "`text_column`, labels ignored) or a built-in data set's name (its training texts this run does not use).",
    )
    unlabeled_limit: int | None = Field(None, ge=1, description="Use at most this many unlabeled texts (a seeded sample).")


class EncoderModelConfig(_Section):
    """Any Hugging Face encoder (BERT, RoBERTa, DeBERTa, XLM-R, MiniLM, ...)."""

    family: Literal["encoder"] = "encoder"
    name: str = Field(DEFAULT_ENCODER, description="Hub name or local folder of the encoder.")
    head: Literal["linear", "hf"] = Field(
        "linear",
        description="`linear`: pooling + dropout + linear layer; `hf`: AutoModelForSequenceClassification, "
        "so the run directory also loads in `transformers.pipeline`.",
    )
    pooling: Literal["cls", "mean"] = Field("cls", description="`cls`: the CLS token of the last layer.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(256, ge=8, le=8192, description="Maximum tokens per example (truncated beyond).")
    noisytune: NoisyTune = 0.0
    multisample_dropout: MultisampleDropout = 1

    @model_validator(mode="after")
    def _multisample_needs_our_head(self) -> EncoderModelConfig:
        _check_multisample(self.multisample_dropout, self.dropout, self.head in ("linear",), self.head)
        return self


class LoraSettings(_Section):
    """LoRA adapters through PEFT (`model.finetune: lora`)."""

    r: int = Field(16, ge=1, description="Rank of the low-rank update.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None,
        description="Names of the linear layers to adapt (e.g. [q_proj, v_proj]); default: every linear "
        "projection of the blocks (q/k/v/o/gate/up/down in Llama-likes), never the output layer.",
    )


class LLMModelConfig(_Section):
    """A decoder LLM (Llama, Qwen, Mistral, Gemma, SmolLM, ...) as a classifier."""

    family: Literal["llm"] = "llm"
    name: str = Field(DEFAULT_LLM, description="Hub name or local folder of a causal language model.")
    gguf_file: str | None = Field(
        None, description="A GGUF file inside `name`'s folder (or a path): dequantised once, cached as safetensors."
    )
    head: Literal["linear", "mlp", "hf", "lm"] = Field(
        "linear",
        description="`linear`: last-token pooling + dropout + linear; `mlp`: the same with hidden layers "
        "(`mlp_hidden`); `hf`: AutoModelForSequenceClassification's `score` layer; `lm`: no head, the LM scores "
        "the label words (zero-shot, `textclass zero-shot`).",
    )
    mlp_hidden: list[int] = Field(default_factory=lambda: [512, 256], description="Hidden sizes of the `mlp` head.")
    pooling: Literal["last", "mean"] = Field("last", description="`last`: the state of the last real token.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout before (and inside) the head.")
    finetune: Literal["full", "lora", "head"] = Field(
        "lora", description="`full`: every weight; `lora`: PEFT adapters + the head; `head`: frozen LLM, head only."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="The dtype the LLM's weights are loaded in. float32: exact, and what full fine-tuning needs "
        "(fp32 master weights; `training.precision` does the low precision). bfloat16/float16 halve the memory "
        "of a frozen base (`finetune: lora` or `head`); the adapters and the head stay float32.",
    )
    prompt: str | None = Field(
        None,
        description="Template wrapping each text: placeholders {text}, {text_pair}, {labels} (the label "
        "names); unset: the text alone (a pair as text, newline, second text).",
    )
    label_words: dict[str, str] | None = Field(
        None,
        description="Words for each label (default: the label names): what {labels} shows in the prompt and, "
        "with `head: lm`, what the LM scores; e.g. {'0': negative, '1': positive}.",
    )
    max_length: int = Field(256, ge=8, le=131072, description="Maximum tokens per example, prompt included.")
    noisytune: NoisyTune = 0.0
    multisample_dropout: MultisampleDropout = 1

    @model_validator(mode="after")
    def _multisample_needs_our_head(self) -> LLMModelConfig:
        _check_multisample(self.multisample_dropout, self.dropout, self.head in ("linear", "mlp"), self.head)
        return self

    @field_validator("prompt", mode="before")
    @classmethod
    def _not_a_mapping(cls, v: Any) -> Any:
        if isinstance(v, dict):  # `--set model.prompt={text} ...` reads as a YAML mapping
            raise ValueError("was read as a mapping, not text; quote the template: --set 'model.prompt=\"{text} ...\"'")
        return v

    @field_validator("prompt")
    @classmethod
    def _known_placeholders(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import string

        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as err:
            raise ValueError(f"not a valid template ({err}); write a literal brace as {{{{ or }}}}") from None
        unknown = [f for f in fields if f not in PROMPT_FIELDS]
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; use {{text}}, {{text_pair}} and {{labels}}")
        if "text" not in fields:
            raise ValueError("has no {text} placeholder; the template must say where the text goes")
        return v

    @model_validator(mode="after")
    def _half_base_is_frozen(self) -> LLMModelConfig:
        if self.dtype != "float32" and self.finetune == "full":
            raise _combination_error(
                "dtype",
                f"{self.dtype} with finetune: full would train the weights in half precision; keep float32 "
                "(training.precision: bf16 gives the speed), or use finetune: lora",
            )
        if self.dtype != "float32" and self.head == "hf":
            raise _combination_error(
                "dtype", f"{self.dtype} with head: hf would train its `score` layer in half precision; use head: linear"
            )
        return self

    @field_validator("mlp_hidden")
    @classmethod
    def _mlp_sizes(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError(f"{v} must be a non-empty list of layer sizes >= 1, e.g. [512, 256]")
        return v


class _SmallConfigMeta(_ModelMetaclass):
    """`SmallModelConfig(arch=..., ...)` builds the config class of that arch (fastText when `arch` is absent)."""

    def __call__(cls, *args: Any, **data: Any) -> Any:
        target = _arch_class(data) if cls is SmallModelConfig else None
        return target(*args, **data) if target is not None else super().__call__(*args, **data)


def _arch_class(data: Any) -> type[SmallModelConfig] | None:
    """The config class of the arch a raw small section names (fastText without `arch`); None if unknown."""
    arch = data.get("arch", "fasttext") if isinstance(data, dict) else getattr(data, "arch", None)
    return SMALL_ARCHS.get(arch) if isinstance(arch, str) else None


class SmallModelConfig(_Section, metaclass=_SmallConfigMeta):
    """Small models trained from scratch (fastText, TextCNN, RNNs, small Transformer): the keys all archs read.

    Each arch has its own class with only the keys it reads (`FastTextConfig`, `TextCNNConfig`, ...), so a
    key another arch reads is refused as unknown instead of silently ignored. `SmallModelConfig(arch=...,
    ...)` and `SmallModelConfig.model_validate` return the class of that arch (fastText when `arch` is
    absent); `isinstance(x, SmallModelConfig)` holds for all of them.
    """

    family: Literal["small"] = "small"
    arch: Literal["fasttext", "textcnn", "textrnn", "textrcnn", "transformer"] = "fasttext"
    tokenizer: Literal["auto", "word", "char", "jieba"] = "auto"
    lowercase: bool = True
    min_freq: int = Field(1, ge=1)
    max_vocab: int | None = Field(50_000, ge=2)
    max_length: int = Field(256, ge=1, le=100_000)
    embedding_dim: int = Field(128, ge=2)
    pretrained_vectors: str | None = Field(None, description="word2vec text file to initialise embeddings.")

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
        """On `SmallModelConfig` itself: validates into the class of `obj`'s arch, like the constructor."""
        target = _arch_class(obj) if cls is SmallModelConfig else None
        if target is not None:
            return target.model_validate(obj, *args, **kwargs)
        return super().model_validate(obj, *args, **kwargs)


def _combination_error(key: str, message: str) -> PydanticCustomError:
    """A check across keys, reported at `key` (see `_format_validation_error`)."""
    return PydanticCustomError("key_combination", "{message}", {"key": key, "message": message})


def _check_multisample(samples: int, dropout: float, our_head: bool, head: str) -> None:
    """Multi-sample dropout needs a dropout to sample and a head of ours to run several times."""
    if samples > 1 and not our_head:
        raise _combination_error("multisample_dropout", f"needs textclass's own head, not head: {head}; use head: linear")
    if samples > 1 and dropout == 0:
        raise _combination_error("multisample_dropout", "with model.dropout 0 every sample is the same; raise the dropout")


class FastTextConfig(SmallModelConfig):
    """fastText: mean of word (+ hashed word n-gram / char n-gram) embeddings -> linear. No dropout."""

    arch: Literal["fasttext"] = "fasttext"
    word_ngrams: int = Field(2, ge=1, le=6)
    minn: int = Field(0, ge=0)
    maxn: int = Field(0, ge=0)
    buckets: int = Field(2_000_000, ge=1)

    @model_validator(mode="after")
    def _char_ngram_range(self) -> FastTextConfig:
        if self.maxn > 0 and self.minn > self.maxn:
            raise _combination_error("minn", f"{self.minn} is larger than model.maxn {self.maxn}; e.g. minn: 3, maxn: 6")
        return self


class _NeuralSmallConfig(SmallModelConfig):
    """The archs with dropout layers (all but fastText)."""

    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    multisample_dropout: MultisampleDropout = 1

    @model_validator(mode="after")
    def _multisample_needs_dropout(self) -> _NeuralSmallConfig:
        _check_multisample(self.multisample_dropout, self.dropout, True, "")
        return self


class TextCNNConfig(_NeuralSmallConfig):
    """TextCNN: parallel 1-D convolutions of several widths -> max over time -> linear."""

    arch: Literal["textcnn"] = "textcnn"
    filter_sizes: list[int] = Field(default_factory=lambda: [2, 3, 4])
    num_filters: int = Field(128, ge=1)

    @field_validator("filter_sizes")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError(f"{v} must be a non-empty list of widths >= 1, e.g. [2, 3, 4]")
        return v


class TextRNNConfig(_NeuralSmallConfig):
    """TextRNN: bidirectional LSTM/GRU -> max / mean / attention pooling -> linear."""

    arch: Literal["textrnn"] = "textrnn"
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(1, ge=1)
    rnn_type: Literal["lstm", "gru"] = "lstm"
    rnn_pooling: Literal["max", "mean", "attention"] = "max"


class TextRCNNConfig(_NeuralSmallConfig):
    """TextRCNN: bidirectional LSTM/GRU states joined with the embeddings -> max pooling -> linear."""

    arch: Literal["textrcnn"] = "textrcnn"
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(1, ge=1)
    rnn_type: Literal["lstm", "gru"] = "lstm"


class TransformerConfig(_NeuralSmallConfig):
    """A small Transformer encoder trained from scratch -> masked mean pooling -> linear."""

    arch: Literal["transformer"] = "transformer"
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(1, ge=1)
    num_heads: int = Field(4, ge=1)
    positional_encoding: Literal["sinusoidal", "learned"] = Field(
        "sinusoidal", description="Fixed sine/cosine positions, or a learned table of max_length rows."
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TransformerConfig:
        if self.hidden_size % self.num_heads:
            raise _combination_error(
                "num_heads",
                f"{self.num_heads} does not divide model.hidden_size {self.hidden_size}; "
                "pick num_heads that divides it (e.g. 4 for 128)",
            )
        return self


SMALL_ARCHS: dict[str, type[SmallModelConfig]] = {
    "fasttext": FastTextConfig,
    "textcnn": TextCNNConfig,
    "textrnn": TextRNNConfig,
    "textrcnn": TextRCNNConfig,
    "transformer": TransformerConfig,
}
"""The config class of each `model.arch` of the small family."""

SmallArchConfig = Annotated[
    FastTextConfig | TextCNNConfig | TextRNNConfig | TextRCNNConfig | TransformerConfig,
    Field(discriminator="arch"),
]
ModelConfig = Annotated[EncoderModelConfig | LLMModelConfig | SmallArchConfig, Field(discriminator="family")]
FAMILIES: dict[str, type[BaseModel]] = {"encoder": EncoderModelConfig, "llm": LLMModelConfig, "small": SmallModelConfig}


class SWAConfig(_Section):
    """Stochastic weight averaging: the run's model is the mean of weights collected late in training."""

    start: float = Field(
        0.75,
        gt=0.0,
        description="Where collecting starts: below 1 a fraction of training (0.75: the last quarter), from 1 up "
        "an epoch count (2: after two epochs).",
    )
    lr: float | None = Field(
        None, gt=0.0, description="Constant learning rate from `start` on (SWA's own schedule); unset: keep the schedule."
    )
    every_steps: int | None = Field(None, ge=1, description="Collect every N optimizer steps; unset: at each epoch's end.")


# `training.deepspeed` presets (their DeepSpeed configs: training/zero.py)
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")


class TrainingConfig(_Section):
    """How to train; maps onto Hugging Face `TrainingArguments`."""

    output_dir: str | None = Field(None, description="Run directory; default runs/<data>-<family>.")
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="If > 0, overrides epochs.")
    batch_size: int | None = Field(
        None, ge=1, description="Unset: the family's default (encoder 16, llm 8; small models by arch, see the README)."
    )
    eval_batch_size: int = Field(64, ge=1)
    learning_rate: float | None = Field(
        None,
        gt=0,
        description="Unset: the family's default (encoder 5e-5; llm full 2e-5, lora 2e-4, head 1e-3; small models by arch).",
    )
    weight_decay: float = Field(0.01, ge=0)
    head_lr_scale: float = Field(
        1.0,
        gt=0,
        description="Learning rate of a pretrained model's new classification head, as a multiple of "
        "`learning_rate` (the encoder keeps `learning_rate`). Ignored by small models, which are all new.",
    )
    layer_lr_decay: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Layer-wise learning-rate decay for pretrained transformers (encoders, LLMs): the top block "
        "trains at learning_rate, each block below at this factor times the one above, the embeddings lowest; "
        "unset: off.",
    )
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = Field(
        False, description="Recompute a transformer's activations in the backward pass: less memory, ~30% slower."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="`auto`: bf16 on GPUs that have it, else fp16 on GPU; on CPU bf16 autocast for transformer "
        "families where the CPU has native bf16 (AVX512-BF16/AMX), else fp32.",
    )
    eval_steps: int | None = Field(None, ge=1, description="Validate every N steps; default: every epoch.")
    best_metric: str = Field("macro_f1", description="Metric that picks the best checkpoint (or `loss`).")
    final_model: Literal["best", "last"] | None = Field(
        None,
        description="Which weights the run keeps: `best` (the validation step with the best `best_metric`) or "
        "`last` (the end of training). Unset: `best` with early stopping, else the family's default "
        "(encoders `last`, small models `best`).",
    )
    save_total_limit: int = Field(2, ge=1)
    keep_checkpoints: bool = Field(False, description="Keep checkpoints/ after a finished run (for inspection).")
    early_stopping_patience: int | None = Field(None, ge=1)
    class_weights: Literal["none", "balanced"] | list[float] = "none"
    loss: Literal["ce", "focal", "poly1", "zlpr"] = Field(
        "ce",
        description="`ce`: cross-entropy (multi-label: binary); `focal`: down-weights easy examples by (1-p)^gamma; "
        "`poly1`: cross-entropy + poly_epsilon * (1 - p_true); `zlpr`: multi-label only, ranks positives above "
        "negatives around logit 0.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Mix this share of the uniform distribution into the targets."
    )
    focal_gamma: float = Field(2.0, ge=0.0, description="`loss: focal`: the focusing exponent (0: cross-entropy).")
    poly_epsilon: float = Field(1.0, description="`loss: poly1`: weight of the (1 - p_true) term (0: cross-entropy).")
    adversarial: Literal["fgm", "pgd", "freelb", "awp"] | None = Field(
        None,
        description="Adversarial training: `fgm` (one adversarial pass), `pgd` (steps-1 probing ascent steps, then "
        "one adversarial pass), `freelb` (steps passes, gradients averaged) on the input embeddings; `awp` on the "
        "weights; unset: off.",
    )
    adversarial_epsilon: float | None = Field(
        None,
        ge=0.0,
        description="Size of the perturbation: its L2 norm over the batch's embeddings (fgm/pgd/freelb; unset: 1.0), "
        "or for awp each weight's largest relative change |dW|/|W| (unset: 0.01). 0 equals plain training.",
    )
    adversarial_alpha: float | None = Field(
        None,
        gt=0.0,
        description="Ascent step size: pgd/freelb in embedding L2 norm (unset: 0.3); awp relative to each weight "
        "matrix's norm (unset: 1.0, then clamped by epsilon). Not used by fgm.",
    )
    adversarial_steps: int | None = Field(
        None, ge=1, description="Ascent steps: pgd/freelb (unset: 3), awp (unset: 1); fgm takes exactly one."
    )
    adversarial_start_epoch: float | None = Field(
        None,
        ge=0.0,
        description="Epoch from which the adversarial passes run; unset: 1 for awp when training runs more than "
        "one epoch (its paper starts it after the first), else 0.",
    )
    rdrop_alpha: float = Field(
        0.0, ge=0.0, description="R-Drop: two forward passes (two dropout masks) and this weight on their symmetric KL; 0: off."
    )
    ema_decay: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Keep an exponential moving average of the weights (e.g. 0.999): it is what is validated, "
        "kept, saved and served; 0 equals plain training; unset: off.",
    )
    swa: SWAConfig | None = Field(
        None, description="Stochastic weight averaging (`{start, lr, every_steps}`): the average is the run's model."
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length to cut padding.")
    tensorboard: bool = Field(False, description="TensorBoard logs in the run directory (as `report_to: [tensorboard]`).")
    report_to: list[str] = Field(
        default_factory=list,
        description="Experiment trackers the Trainer logs to: `tensorboard` (into the run directory), `mlflow`, `wandb`, "
        "`comet_ml`, ... (configured by their own environment variables, e.g. MLFLOW_TRACKING_URI); the run "
        "directory is written as without them.",
    )
    deepspeed: str | None = Field(
        None,
        description="Train through DeepSpeed ZeRO: `zero2` (optimizer state and gradients partitioned across processes), "
        "`zero3` (the weights too), `zero3_offload` (zero3 with weights and optimizer state in CPU memory), or the "
        "path of a DeepSpeed JSON config (`auto` values are filled in from this section). See docs/scaling.md.",
    )
    logging_steps: int = Field(20, ge=1)
    seed: int = 42
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; default: torch's choice.")
    kfold: int | None = Field(
        None,
        description="Train K models on stratified folds of train+valid (each fold held out once) and keep them as one "
        "ensemble that predicts the mean of their probabilities; unset: off. See docs/kfold.md.",
    )

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_preset_or_file(cls, v: str | None) -> str | None:
        if v is not None and v not in DEEPSPEED_PRESETS and not v.endswith(".json"):
            raise ValueError(f"{v!r}: use {', '.join(DEEPSPEED_PRESETS)} or the path of a DeepSpeed config file (.json)")
        return v

    @field_validator("kfold")
    @classmethod
    def _at_least_two_folds(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise ValueError(f"{v} must be at least 2 (the number of folds; 5 is usual), or unset it to train one model")
        return v

    @model_validator(mode="after")
    def _early_stopping_keeps_best(self) -> TrainingConfig:
        if self.early_stopping_patience and self.final_model == "last":
            raise ValueError(
                "early_stopping_patience with final_model=last would keep weights that early stopping found "
                "worse than the best; use final_model=best or drop early_stopping_patience"
            )
        return self

    @model_validator(mode="after")
    def _averaging_settings(self) -> TrainingConfig:
        """SWA's average is the run's model: it cannot also keep a best checkpoint, nor share the run with EMA."""
        if self.swa is None:
            return self
        if self.ema_decay is not None:
            raise _combination_error("swa", "and training.ema_decay both average the weights; set one of them")
        if self.early_stopping_patience:
            raise _combination_error(
                "swa", "keeps the average of late weights, early stopping a best checkpoint; drop early_stopping_patience"
            )
        if self.final_model == "best":
            raise _combination_error(
                "final_model", "best picks a checkpoint, but with training.swa the average is the model; use last"
            )
        if self.final_model is None:  # (assignment re-runs the validators: set it only once)
            self.final_model = "last"
        if self.swa.start >= 1 and self.max_steps <= 0 and self.swa.start >= self.epochs:
            raise _combination_error(
                "swa.start",
                f"{self.swa.start:g} epochs is not before the end of training (epochs={self.epochs:g}), so nothing "
                "would be averaged; lower it (or give a fraction such as 0.75)",
            )
        return self

    @model_validator(mode="after")
    def _deepspeed_combinations(self) -> TrainingConfig:
        """Tricks that change or copy weights outside the DeepSpeed engine (which partitions them) cannot run
        under it; torchrun DDP runs them all."""
        if self.deepspeed is None:
            return self
        for key in ("adversarial", "ema_decay", "swa", "kfold"):
            if getattr(self, key) is not None:
                raise _combination_error(
                    key,
                    "cannot run under training.deepspeed (it works on weights DeepSpeed partitions); drop one of the "
                    "two (torchrun DDP without deepspeed supports both)",
                )
        return self

    @model_validator(mode="after")
    def _adversarial_settings(self) -> TrainingConfig:
        """Fill in the chosen method's defaults (so the saved config shows them) and refuse what it cannot do."""
        method = self.adversarial
        if method is None:
            return self
        if method == "fgm" and self.adversarial_steps not in (None, 1):
            raise _combination_error("adversarial_steps", "fgm takes exactly one step; use adversarial: pgd for several")
        awp = method == "awp"
        if self.adversarial_epsilon is None:
            self.adversarial_epsilon = 0.01 if awp else 1.0
        if self.adversarial_alpha is None:
            self.adversarial_alpha = 1.0 if awp else 0.3
        if self.adversarial_steps is None:
            self.adversarial_steps = 3 if method in ("pgd", "freelb") else 1
        if self.adversarial_start_epoch is None:
            self.adversarial_start_epoch = 1.0 if awp and self.epochs > 1 and self.max_steps <= 0 else 0.0
        elif self.max_steps <= 0 and self.adversarial_start_epoch >= self.epochs:
            raise _combination_error(
                "adversarial_start_epoch",
                f"{self.adversarial_start_epoch:g} is not before the end of training (epochs={self.epochs:g}), so "
                "no adversarial step would run; lower it",
            )
        return self

    @field_validator("best_metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        allowed = {"loss", "accuracy", "macro_f1", "micro_f1", "weighted_f1", "subset_accuracy", "hamming_loss"}
        if v not in allowed:
            raise ValueError(f"must be one of {sorted(allowed)}")
        return v


class StudentConfig(_Section):
    """Self-distillation: the student is the teacher with fewer layers, not a fresh model."""

    from_teacher: bool = Field(
        False, description="Copy the (first) teacher's embeddings, chosen layers and head into the student."
    )
    layers: int | list[int] | None = Field(
        None,
        description="The teacher layers to keep (0-based, in order), or how many (spread evenly, first and last "
        "kept: 4 of 12 keeps 0, 4, 7, 11).",
    )

    @model_validator(mode="after")
    def _layers_given(self) -> StudentConfig:
        if self.layers is not None and not self.from_teacher:
            raise _combination_error("layers", "chooses the teacher layers a student copies; set from_teacher: true too")
        if self.from_teacher and self.layers is None:
            raise _combination_error("layers", "from_teacher needs the layers to keep: a count (3) or indices ([0, 2, 5])")
        if isinstance(self.layers, int) and self.layers < 1:
            raise _combination_error("layers", f"{self.layers} keeps no layer; give at least 1")
        if isinstance(self.layers, list) and (
            not self.layers or any(i < 0 for i in self.layers) or self.layers != sorted(set(self.layers))
        ):
            raise _combination_error("layers", f"{self.layers}: give distinct 0-based layer indices in increasing order")
        return self


class DistillConfig(_Section):
    """Knowledge distillation: train this config's model (the student) on the soft labels of teacher runs."""

    teachers: list[str] = Field(
        default_factory=list,
        description="Teacher run directories (`textclass distill --teacher RUN`); several are averaged.",
    )
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="Weight of the hard-label loss; 1 - alpha goes to matching the teachers."
    )
    temperature: float = Field(2.0, gt=0.0, description="Softens both sides' logits; the soft loss is scaled by T².")
    student: StudentConfig = Field(default_factory=StudentConfig)
    hidden_matches: list[tuple[int, int]] | None = Field(
        None,
        description="Self-distillation: [student layer, teacher layer] pairs (0-based) whose outputs are pulled "
        "together by MSE (TextBrewer's intermediate matches); unset: each kept layer with its source layer.",
    )
    hidden_weight: float = Field(1.0, ge=0.0, description="Weight of the hidden-state MSE (0: logits only).")

    @model_validator(mode="after")
    def _matches_need_a_copied_student(self) -> DistillConfig:
        if self.hidden_matches and not self.student.from_teacher:
            raise _combination_error(
                "hidden_matches", "compares hidden states of a student built from the teacher; set student.from_teacher"
            )
        if self.hidden_matches and self.hidden_weight == 0:
            raise _combination_error("hidden_matches", "with hidden_weight 0 nothing is matched; give hidden_weight > 0")
        return self


class EvaluationConfig(_Section):
    """Evaluation and prediction options."""

    threshold: float = Field(0.5, gt=0, lt=1, description="Multi-label decision threshold.")
    tune_threshold: bool = Field(False, description="Multi-label: pick the threshold maximising valid micro-F1.")
    badcases: bool = True


class Config(_Section):
    """A whole textclass job: data, model, training, evaluation."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=EncoderModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    distill: DistillConfig | None = Field(None, description="Knowledge distillation (`textclass distill`); docs/distill.md.")

    @model_validator(mode="before")
    @classmethod
    def _default_family(cls, raw: Any) -> Any:
        # The model section is a union keyed by `family`, and the small family's by `arch`; a section without
        # them means the default family (encoder), a small section without `arch` means fastText.
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            model = raw["model"]
            if "family" not in model:
                model = {"family": "encoder", **model}
            if model["family"] == "small" and "arch" not in model:
                model = {**model, "arch": "fasttext"}
            if model is not raw["model"]:
                raw = {**raw, "model": model}
        return raw

    @model_validator(mode="after")
    def _has_data(self) -> Config:
        zero_shot = isinstance(self.model, LLMModelConfig) and self.model.head == "lm"  # scores, never trains
        if self.data.train is None and self.data.dataset is None and not zero_shot:
            raise ValueError("data: set `data.train` (a file) or `data.dataset` (built-in or hub name)")
        return self

    @model_validator(mode="after")
    def _distill_settings(self) -> Config:
        if self.data.unlabeled and self.distill is None:
            raise _combination_error("data.unlabeled", "texts are for distillation: run `textclass distill --teacher RUN`")
        if self.distill is not None and self.training.kfold:
            raise _combination_error(
                "training.kfold", "a distilled student is one model; distil a k-fold teacher into it instead"
            )
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    """One line: the first problem with its dotted key path (discriminator branches stripped)."""
    e = err.errors()[0]
    loc, sections = _walk([str(p) for p in e["loc"]])
    ctx = e.get("ctx", {})
    if e["type"] == "key_combination":  # a check across keys, reported at one of them
        loc, sections = loc + [ctx["key"]], sections + [None]
    key = ".".join(loc) or "(top level)"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        section = sections[-1] if sections else None
        allowed = sorted(section.model_fields) if section else []
        msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
        if section is not None and issubclass(section, SmallModelConfig) and section is not SmallModelConfig:
            msg += f" (the keys of arch {section.model_fields['arch'].default})"
    elif e["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be")
    elif e["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")  # our validators' own words
    elif e["type"] == "union_tag_invalid":  # model.family names no family, or model.arch no small arch
        what = str(ctx.get("discriminator", "family")).strip(chr(39))
        key = f"{key}.{what}"
        msg = f"unknown {what} {ctx.get('tag')!r}; must be one of {ctx.get('expected_tags')}"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: bad config key `{key}`: {msg}{more}"


def _walk(raw_loc: list[str]) -> tuple[list[str], list[type[BaseModel] | None]]:
    """An error location without the union tags pydantic inserts (`model.small.textcnn.x` -> `model.x`), and
    the config class each remaining key lives in (None past the schema's sections)."""
    loc: list[str] = []
    sections: list[type[BaseModel] | None] = []
    section: type[BaseModel] | None = Config
    i = 0
    while i < len(raw_loc):
        p = raw_loc[i]
        loc.append(p)
        sections.append(section)
        i += 1
        field = section.model_fields.get(p) if section is not None else None
        if field is None:
            section = None
        elif section is Config and p == "model":  # union keyed by family, then (small) by arch
            section = None
            if i < len(raw_loc) and raw_loc[i] in FAMILIES:
                section = FAMILIES[raw_loc[i]]
                i += 1
                if section is SmallModelConfig:
                    section = SMALL_ARCHS.get(raw_loc[i]) if i < len(raw_loc) else None
                    i += 1 if section is not None else 0
                    section = section or SmallModelConfig
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            section = field.annotation
        else:
            section = None
    return loc, sections


def upgrade_run_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A config.yaml written by an older textclass, made loadable by this one (`raw` itself is never changed).

    Before each small arch had its own keys, a run directory's resolved config listed every small key for
    every arch (e.g. `word_ngrams` and `buckets` for a TextCNN), which this schema refuses. Those keys were
    never read by that arch, so dropping them changes nothing about the model. Keys that no small arch has
    are kept, so a damaged file still fails with its key path.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        return raw
    model = raw["model"]
    if model.get("family") != "small":
        return raw
    own = _arch_class(model)
    if own is None:  # an unknown arch: left to validation to say so
        return raw
    every_small_key = {k for cls in SMALL_ARCHS.values() for k in cls.model_fields}
    kept = {k: v for k, v in model.items() if k in own.model_fields or k not in every_small_key}
    return {**raw, "model": kept}


def parse_value(text: str) -> Any:
    """Parse a `--set` value with YAML rules (numbers, booleans, null, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides to a raw config dict (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set training.epochs=2")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or parts[0] not in Config.model_fields:
            raise UserError(
                f"--set {key}: keys start with a section ({', '.join(Config.model_fields)}), e.g. --set training.epochs=2"
            )
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {key}: `{p}` is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return raw


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | None = None, source: str = "config") -> Config:
    """Validate a raw dict (+ overrides) into a Config, or raise a one-line UserError."""
    raw = apply_overrides(copy.deepcopy(raw or {}), overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file (optional) and apply overrides."""
    raw, source = read_config_file(path) if path is not None else ({}, "config")
    return build_config(raw, overrides, source)


def read_config_file(
    path: str | Path, what: str = "config", shape: str = "with sections data/model/training/evaluation"
) -> tuple[dict[str, Any], str]:
    """A YAML config file as a raw dict (not yet validated) and its name for messages. Other YAML mappings
    (tune's search space) are read the same way: `what` names the file, `shape` says what it must hold."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} file not found; check the path or copy one from configs/")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{p}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text; save the config as UTF-8") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise UserError(f"{p}: a {what} must be a mapping {shape}")
    return loaded, str(p)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), encoding="utf-8")
