"""Hugging Face Trainer, adapted to textclass models.

We subclass `Trainer` only where our models differ from HF's: they return logits and the loss comes from
our loss factory. Everything else (schedules, accumulation, clipping, mixed precision, checkpoints with
optimizer/scheduler/RNG state, best-model selection, early stopping, distributed engines) is the
Trainer's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalPrediction

from textclass.config import Config
from textclass.data.frames import text_columns
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.fileio import cache_dir
from textclass.models.base import TextModel, probabilities
from textclass.models.registry import Family
from textclass.rundir import TENSORBOARD_DIR
from textclass.training import distributed, zero
from textclass.training.averaging import EMA, SWA, AveragingCallback, WeightAverage, swa_start_step
from textclass.training.losses import symmetric_kl
from textclass.training.optim import adamw_with_sparse_rows, clip_grad_norm_, layer_decay_scale, param_groups, sparse_parameters

log = logging.getLogger("textclass")

LOWER_IS_BETTER = {"loss", "hamming_loss"}


def _from_step(schedule: Callable[[int], float], start: int, value: float) -> Callable[[int], float]:
    """A LambdaLR factor that follows `schedule` before `start` and is `value` from it on (SWA's constant rate)."""
    return lambda step: schedule(step) if step < start else value


class ClassifierTrainer(Trainer):
    """Trainer whose loss is textclass's loss factory applied to the model's logits."""

    # Distillation's extras (see `ExtraTargets`); none in a plain run.
    target_keys: tuple[str, ...] = ()
    auxiliary_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None

    def __init__(
        self,
        *args: Any,
        loss_fn: nn.Module,
        head_lr_scale: float = 1.0,
        rdrop_alpha: float = 0.0,
        multi_label: bool = False,
        layer_lr_decay: float | None = None,
        adversarial: Any = None,
        adversarial_start_epoch: float = 0.0,
        averaging: AveragingCallback | None = None,
        swa_lr: float | None = None,
        target_keys: tuple[str, ...] = (),
        auxiliary_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.target_keys, self.auxiliary_loss = target_keys, auxiliary_loss
        self.averaging, self.swa_lr = averaging, swa_lr
        if averaging is not None:
            self.add_callback(averaging)
        self.loss_fn = loss_fn
        self.head_lr_scale = head_lr_scale
        self.rdrop_alpha = rdrop_alpha
        self.multi_label = multi_label
        self.layer_lr_decay = layer_lr_decay
        self.adversarial = adversarial
        self.adversarial_start_epoch = adversarial_start_epoch
        self._loss_scale = 1.0
        # Our loss is a plain mean over the batch, so the Trainer must scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        labels = inputs.pop("labels")
        logits, loss = self._forward_loss(model, inputs, labels)
        if self.rdrop_alpha and model.training:
            # R-Drop: a second pass with other dropout masks; both passes' losses and their disagreement. Two
            # passes rather than one over a doubled batch: some layouts (fastText's flat bags) cannot be stacked.
            second, second_loss = self._forward_loss(model, inputs, labels)
            loss = (loss + second_loss) / 2 + self.rdrop_alpha * symmetric_kl(logits, second, self.multi_label)
        loss = loss * (self._loss_scale if model.training else 1.0)
        return (loss, {"logits": logits}) if return_outputs else loss

    def _forward_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and their loss. Multi-sample dropout returns (batch, samples, labels) while training
        (models/heads.py): the loss is the mean of the samples' losses, the logits their mean.

        Batch entries named in `target_keys` (distillation's teacher logits) go to the loss, not the network;
        an `auxiliary_loss` (distillation's hidden-state matching) is added while training, right after the
        forward pass whose hidden states it reads.
        """
        targets = {k: inputs[k] for k in self.target_keys if k in inputs}
        logits = model(**{k: v for k, v in inputs.items() if k not in targets})
        loss_fn = self.loss_fn.to(logits.device)
        if logits.dim() == 3:
            loss = torch.stack([loss_fn(logits[:, k].float(), labels, **targets) for k in range(logits.size(1))]).mean()
            logits = logits.mean(1)
        else:
            loss = loss_fn(logits.float(), labels, **targets)
        if self.auxiliary_loss is not None and model.training:
            loss = loss + self.auxiliary_loss(inputs)
        return logits, loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's step; with adversarial training, the method's passes (see `training.adversarial`), each
        backpropagated by the Trainer's own machinery, and one optimizer step after them as usual."""
        adv = self.adversarial
        if adv is None or (self.state.epoch or 0.0) < self.adversarial_start_epoch:
            return super().training_step(model, inputs, num_items_in_batch)

        def step(scale: float) -> torch.Tensor:
            self._loss_scale = scale
            try:  # a copy of the batch each time: compute_loss pops the labels
                return super(ClassifierTrainer, self).training_step(model, dict(inputs), num_items_in_batch) / scale
            finally:
                self._loss_scale = 1.0

        def loss() -> torch.Tensor:
            # The unwrapped network: a probing forward has no backward, which a DDP wrapper would wait for.
            with self.compute_loss_context_manager():
                return self.compute_loss(self.accelerator.unwrap_model(model), self._prepare_inputs(dict(inputs)))

        return adv.train_step(step, loss)  # the clean loss, as logged without adversarial training

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, ignore_keys_for_eval: Any = None) -> Any:
        """The Trainer's loop; with weight averaging, the average resumes from the checkpoint and the network
        ends holding the average of the kept checkpoint (best or last), which is what the run saves."""
        average = self.averaging.average if self.averaging is not None else None
        if average is not None and isinstance(resume_from_checkpoint, str):
            average.load(Path(resume_from_checkpoint))
        result = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        if average is not None:
            best = self.state.best_model_checkpoint
            if self.args.load_best_model_at_end and best:  # the Trainer loaded that checkpoint's raw weights
                average.load(Path(best))
            if average.shadow:
                average.copy_to_network()
            else:
                log.warning("weight averaging: training ended before the first snapshot; keeping the plain weights")
        return result

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Validation judges the averaged weights when there is an average: the weights the run will keep."""
        if self.averaging is None:
            return super().evaluate(*args, **kwargs)
        with self.averaging.average.swapped_in():
            return super().evaluate(*args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # The average goes in first: the Trainer writes trainer_state.json last, which marks the folder complete.
        # Written by the process that writes checkpoints (rank 0 under DDP): every rank's average is the same.
        if self.averaging is not None and self.averaging.average.shadow and self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self.averaging.average.save(folder)
        super()._save_checkpoint(model, trial)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The configured schedule; with SWA, its start step is fixed here and from it a constant `swa.lr`."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.averaging is None or not isinstance(self.averaging.average, SWA):
            return scheduler
        start = self.averaging.start_step = swa_start_step(self.averaging.start, num_training_steps, self._steps_per_epoch())
        if self.swa_lr is not None and isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            ratio = self.swa_lr / self.args.learning_rate
            inner = list(scheduler.lr_lambdas)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                scheduler.optimizer, [_from_step(f, start, ratio) for f in inner]
            )
        return self.lr_scheduler

    def _steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch, as the Trainer counts them."""
        batches = math.ceil(len(self.train_dataset) / self.args.train_batch_size)  # type: ignore[arg-type]
        return max(1, batches // self.args.gradient_accumulation_steps)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Models that store a sparse form of a large table (fastText) write checkpoints in that form;
        # their `load_state_dict` reads it back, so best-model loading and --resume are unchanged.
        # (Only the process that writes: under DDP the others skip the scan of the table.)
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None and self.args.should_save and hasattr(model, "compact_state_dict"):
            state_dict = model.compact_state_dict()
        super()._save(output_dir, state_dict=state_dict)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A compact checkpoint leaves the frozen weights out on purpose (they are already in the model): only
        # a missing weight that trains is worth a warning. (The Trainer's own check also assumes a PreTrainedModel.)
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "compact_state_dict"):
            return super()._issue_warnings_after_load(load_result)
        expected = set(model.compact_state_dict())
        missing = [k for k in load_result.missing_keys if k in expected]
        if missing or load_result.unexpected_keys:
            log.warning("checkpoint load: missing %s, unexpected %s", missing[:5], load_result.unexpected_keys[:5])

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        # Groups of what one optimizer step sees, over all processes: every rank draws the same order and
        # accelerate hands consecutive per-device batches to the ranks in turn, so N processes at batch B/N
        # train on the same batches, in the same order, as one process at batch B.
        batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, PackedRows):
            # Lengths from the packed `length` column: for a dataset that is not a `datasets.Dataset` the
            # Trainer's sampler would build every row to measure its `input_ids`.
            return ShuffledLengthGroupedSampler(batch_size, lengths=dataset.lengths, seed=self.args.data_seed or 0)
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):  # any other dataset: the same shuffled grouping
            # `list()`: datasets >= 4 returns `dataset["length"]` as a lazy `Column`, read through Arrow once
            # per example and epoch it cost ~0.2 ms each (14 of 30 s in a fastText run).
            lengths = list(sampler.lengths)
            return ShuffledLengthGroupedSampler(batch_size, lengths=lengths, seed=self.args.data_seed or 0)
        return sampler

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        """Longest examples first: the least padding. (The Trainer's own choice under group_by_length is its
        randomised training sampler.) The metrics do not depend on the order."""
        if isinstance(eval_dataset, PackedRows) and eval_dataset.lengths:
            return np.argsort(-np.asarray(eval_dataset.lengths), kind="stable").tolist()
        return super()._get_eval_sampler(eval_dataset)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's AdamW, plus `RowWiseAdagrad` for sparse embeddings (fastText's hashed table).

        AdamW cannot take sparse gradients, and a dense step over fastText's ~1 GB table costs seconds.
        A pretrained model's new head gets `head_lr_scale` times the learning rate. Other models get the
        stock optimizer.
        """
        opt_model = self.model if model is None else model
        assert opt_model is not None  # build_trainer always passes the model object's network
        head = head_parameter_names(opt_model) if self.head_lr_scale != 1.0 or self.layer_lr_decay else set()
        if self.optimizer is None and self.layer_lr_decay:
            names = [n for n, _ in opt_model.named_parameters()]
            self.optimizer = self._adamw_with_scaled_groups(
                opt_model, layer_decay_scale(names, self.layer_lr_decay, head, self.head_lr_scale)
            )
        if self.optimizer is None and head:
            self.optimizer = self._adamw_with_scaled_groups(opt_model, lambda n: self.head_lr_scale if n in head else 1.0)
        if self.optimizer is None:
            self.optimizer = adamw_with_sparse_rows(
                opt_model,
                set(self.get_decay_parameter_names(opt_model)),
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer if self.optimizer is not None else super().create_optimizer(model)

    def _adamw_with_scaled_groups(self, model: nn.Module, scale: Callable[[str], float]) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and settings over `param_groups`, each weight at `scale(name)` times the rate."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = set(self.get_decay_parameter_names(model))
        groups = param_groups(named, decay, self.args.weight_decay, self.args.learning_rate, scale)
        # any nn.Module works (transformers annotates PreTrainedModel; it only reads the model for a few optimizers)
        opt_cls, opt_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)  # type: ignore[arg-type]
        return opt_cls(groups, **opt_kwargs)

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        # torch's clip_grad_norm_ rejects sparse gradients; clip the same global norm with our own helper.
        # (A private Trainer hook: the only place where the Trainer clips.)
        if not sparse_parameters(model):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # fp16: clip the true gradients, as accelerate's clip_grad_norm_ does
        return clip_grad_norm_(model.parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is None and sparse_parameters(model):  # max_grad_norm=0: norm for the log only
            grad_norm = clip_grad_norm_(model.parameters(), math.inf)
        return super()._get_grad_norm(model, grad_norm=grad_norm)


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters a pretrained model did not bring: its classification head.

    Models say so with `head_parameter_names()`; models without it (small ones, trained from scratch) have
    no pretrained body to tell apart, and get the empty set.
    """
    fn = getattr(model, "head_parameter_names", None)
    return set(fn()) if callable(fn) else set()


class ShuffledLengthGroupedSampler(LengthGroupedSampler):
    """Hugging Face's length grouping with each epoch's batches in random order.

    HF's sampler sorts mega-batches of 50 batches by length and emits their batches in that order, so
    training sweeps from long to short texts 50 batches at a time. Where length predicts the label (in
    chinese-reviews 64% of the longest quarter are positive, 42-43% of the rest) every sweep is also a
    sweep through the labels: on 2,000 chinese-reviews rows (MiniLM, 2 epochs) HF's order reached 0.654
    test accuracy, random batches 0.670, these shuffled groups 0.665. Shuffling the finished batches keeps
    the padding savings and removes the sweeps. The longest batch stays first (an out-of-memory error
    shows at once) and a short last batch stays last (the DataLoader cuts the flat index list into
    consecutive batches, so it must sit at the end).

    Also mixing the labels inside each batch (every label at the same within-label length quantile) was
    tried and dropped: 0.6655 mean test accuracy over three seeds, against 0.6688 for these groups and
    0.6736 for random batches, for 15% more padding than these groups.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate) before each epoch, also the one a --resume re-enters."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # Each epoch's order is a function of (seed, epoch) alone, never of the global RNG: a run resumed
        # mid-epoch replays exactly the batches the uninterrupted run saw (HF's sampler draws from the global
        # RNG, whose state at a resumed epoch's start differs from the uninterrupted run's).
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint64)
        generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        indices = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        last = [batches.pop()] if len(batches) > 1 and len(batches[-1]) < self.batch_size else []
        middle = torch.randperm(len(batches) - 1, generator=generator).tolist() if batches else []
        order = batches[:1] + [batches[1 + i] for i in middle] + last
        return iter([i for batch in order for i in batch])


class PackedRows(torch.utils.data.Dataset):
    """A tokenized split read from its Arrow columns as numpy arrays, for the training and validation DataLoaders.

    `datasets.Dataset.__getitems__` turns each batch's Arrow rows into Python lists and the collator turns
    them back into arrays: 1.4 ms of a ~8 ms fastText step on chinese-reviews. Here a row's list columns
    are slices of the columns' flat values (zero-copy views of the memory-mapped cache file where Arrow
    allows), scalars come from numpy arrays, and `labels` (ints or multi-hot lists) from one Python list.
    `lengths` (the `length` column tokenize() writes) is what the length-grouped sampler reads.
    """

    def __init__(self, ds: Any) -> None:
        import pyarrow as pa

        table = ds.flatten_indices().data.table if getattr(ds, "_indices", None) is not None else ds.data.table
        self.n = table.num_rows
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.scalars: dict[str, Any] = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if name == "labels":
                self.scalars[name] = column.to_pylist()
            elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                self.lists[name] = (column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy())
            else:
                self.scalars[name] = column.to_numpy(zero_copy_only=False)
        self.lengths: list[int] = self.scalars["length"].tolist() if "length" in self.scalars else []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = {name: values[offsets[i] : offsets[i + 1]] for name, (values, offsets) in self.lists.items()}
        return row | {name: column[i] for name, column in self.scalars.items()}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]


# Bump when the way texts become ids changes in a way the version and the family's source would not show.
ENCODING_VERSION = 2


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer's full state as text: vocabulary, normalisation, special tokens, truncation rules.

    A path or hub name is not enough: a model folder can be replaced in place, and then cached ids are stale.
    """
    if hasattr(tokenizer, "to_dict"):  # our small-model tokenizer
        return json.dumps(tokenizer.to_dict(), ensure_ascii=False, sort_keys=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # every fast (Rust) HF tokenizer
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = {k: str(getattr(tokenizer, k, None)) for k in ("padding_side", "truncation_side", "all_special_tokens")}
    return state + json.dumps(extra, sort_keys=True)


def encoding_code_version(model: TextModel) -> str:
    """textclass's version, ENCODING_VERSION and the model class's module source, so changed code re-tokenizes."""
    import inspect

    from textclass.version import __version__

    try:
        source = inspect.getsource(inspect.getmodule(type(model)))  # type: ignore[arg-type]
    except (OSError, TypeError):
        source = ""
    return f"{__version__}/{ENCODING_VERSION}/{hashlib.sha256(source.encode()).hexdigest()}"


def tokenize(model: TextModel, df: pd.DataFrame, with_labels: bool = True) -> Any:
    """Tokenize a split once into an Arrow-backed `datasets.Dataset`, cached on disk by content.

    The cache key covers the model section (tokenizer and max length), the texts, the tokenizer's own
    state and the version of the encoding code, so a changed vocabulary, length, model folder or textclass
    never reuses stale ids.
    """
    import datasets

    texts, pairs = text_columns(df)
    h = hashlib.sha256()
    h.update(model.cfg.model.model_dump_json().encode())
    h.update(encoding_code_version(model).encode())
    h.update(tokenizer_fingerprint(model.tokenizer).encode())
    h.update(json.dumps([texts, pairs], ensure_ascii=False).encode())
    folder = cache_dir() / "tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    data = {"text": texts} | ({"text_pair": pairs} if pairs is not None else {})
    ds = datasets.Dataset.from_dict(data)

    def enc(batch: dict[str, list]) -> dict[str, list]:
        out = model.encode(batch["text"], batch.get("text_pair"))
        out["length"] = [len(x) for x in out["input_ids"]]
        return out

    ds = ds.map(
        enc,
        batched=True,
        batch_size=1000,
        remove_columns=list(data),
        cache_file_name=str(folder / f"{h.hexdigest()[:32]}.arrow"),
        desc="Tokenizing",
    )
    if with_labels:
        ds = ds.add_column("labels", model.labels.encode_all(df["labels"]).tolist())
    return ds


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX).

    Elsewhere torch emulates bf16 on CPU and autocast is slower than fp32, so `auto` must not pick it.
    """
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the guarded lookup
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


class PrecisionFlags(TypedDict, total=False):
    """The TrainingArguments precision flags `resolve_precision` sets (absent: False)."""

    bf16: bool
    fp16: bool
    use_cpu: bool


def resolve_precision(precision: str, cpu_autocast: bool = True, deepspeed: bool = False) -> PrecisionFlags:
    """TrainingArguments flags for the requested precision, checked against the hardware.

    `auto` on CPU picks bf16 autocast for families with `cpu_autocast` when the CPU has native bf16: a
    MiniLM training step is ~1.5x faster on such a CPU (AVX512-BF16) with fp32 master weights. Under
    DeepSpeed without a GPU it is fp32: the Trainer has no CPU bf16 for a DeepSpeed run.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
        precision = "bf16" if cpu_autocast and cpu_has_native_bf16() and not deepspeed else "fp32"
    if precision == "bf16" and deepspeed and not cuda:
        raise UserError("training.precision=bf16 with training.deepspeed needs a GPU; use fp32 (or bf16 without deepspeed)")
    if precision == "fp16" and not cuda:
        raise UserError("training.precision=fp16 needs a CUDA GPU and none is visible; use fp32 or bf16")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("training.precision=bf16: this GPU has no bf16; use fp16")
    if precision == "bf16":
        # TrainingArguments refuses bf16 without a bf16 GPU unless told the run is on CPU on purpose.
        return {"bf16": True} if cuda else {"bf16": True, "use_cpu": True}
    return {"fp16": True} if precision == "fp16" else {}


def training_arguments(
    cfg: Config, family: Family, output_dir: Path, has_valid: bool, deepspeed: dict[str, Any] | None = None
) -> TrainingArguments:
    """Map our training section onto TrainingArguments (one place). `deepspeed`: the DeepSpeed config of
    `training.deepspeed` (`zero.deepspeed_config`)."""
    t = cfg.training
    precision = resolve_precision(t.precision, family.cpu_autocast, deepspeed is not None)
    precision |= {"use_cpu": True} if distributed.needs_cpu_flag() else {}
    if deepspeed is not None:
        # DeepSpeed picks its device itself (its CPU accelerator where there is no GPU); accelerate would not
        # start the DeepSpeed engine at all when told the run is on CPU.
        precision.pop("use_cpu", None)
    engine = zero.configured_state() if deepspeed is not None else {}
    assert t.batch_size is not None and t.learning_rate is not None  # filled in by run.resolve_defaults
    strategy = "steps" if t.eval_steps else "epoch"
    keep_best = has_valid and t.final_model == "best"
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler if t.scheduler != "constant" else "constant_with_warmup",
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of total steps in transformers 5
        gradient_accumulation_steps=t.grad_accum,
        max_grad_norm=t.max_grad_norm,
        eval_strategy=strategy if has_valid else "no",
        # Writing only improving evaluations spares fastText's ~1 GB table most rewrites. A --resume then
        # restarts from the best checkpoint and replays the later steps with the saved RNG/optimizer state,
        # so the result is the same.
        save_strategy="best" if keep_best and family.save_only_improving else strategy,
        eval_steps=t.eval_steps,
        save_steps=t.eval_steps,  # type: ignore[arg-type]  # None (epoch strategy) is handled; transformers annotates float
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=keep_best,
        metric_for_best_model=t.best_metric,  # tracked (and reported) with final_model=last too
        greater_is_better=t.best_metric not in LOWER_IS_BETTER,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # TensorBoard is attached as a callback writing into the run directory (`build_trainer`), the others here
        report_to=[name for name in t.report_to if name != "tensorboard"] or "none",
        run_name=output_dir.parent.name,  # the run directory's name, as the trackers' run name
        deepspeed=deepspeed,
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Under DDP (torchrun): our loss is a mean over each process's batch and DDP averages the gradients,
        # which is the mean over the global batch; the Trainer's token averaging across devices would
        # scale it again by the number of processes for a model whose forward takes **kwargs.
        average_tokens_across_devices=False,
        **precision,
        **engine,
    )


def check_trackers(names: list[str]) -> None:
    """`training.report_to` names the Trainer knows (checked when training starts, not when a config is read:
    the list lives in transformers, which an ONNX predictor reading the same config never imports)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    unknown = [name for name in names if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
        raise UserError(f"training.report_to: unknown tracker {unknown[0]!r}; use some of {known}")


def tensorboard_callback(log_dir: Path) -> Any:
    """TensorBoard logs in the run directory (HF's default puts them under checkpoints/, which we delete)."""
    from transformers.integrations import TensorBoardCallback

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("training.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def metrics_fn(labels: LabelSet, threshold: float) -> Any:
    """`compute_metrics` for the Trainer: our metric names, computed by scikit-learn."""
    from textclass.evaluation import compute_metrics

    def fn(pred: EvalPrediction) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        probs = probabilities(torch.as_tensor(logits), labels.multi_label).numpy()
        y_true = np.asarray(pred.label_ids).astype(int)
        y_pred = labels.decide(probs, threshold)
        return compute_metrics(y_true, y_pred, multi_label=labels.multi_label, num_labels=labels.num_labels)

    return fn


@dataclass
class ExtraTargets:
    """What a training run learns from besides the labels (distillation): per-row `columns` added to the
    training split and handed to the loss with each batch (e.g. `teacher_logits`, `labeled`), and an
    `auxiliary_loss` computed from each training batch's inputs."""

    columns: dict[str, np.ndarray]
    auxiliary_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None


def collate_with_targets(collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]], keys: tuple[str, ...]) -> Any:
    """`collate` for rows that also carry target columns (training rows; validation rows have none): those
    are stacked into tensors of their own."""

    def fn(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate([{k: v for k, v in f.items() if k not in keys} for f in features])
        for k in (k for k in keys if k in features[0]):
            batch[k] = torch.as_tensor(np.stack([np.asarray(f[k]) for f in features]))
        return batch

    return fn


def build_trainer(
    model: TextModel,
    train_ds: Any,
    valid_ds: Any,
    output_dir: Path,
    loss_fn: nn.Module,
    extra: ExtraTargets | None = None,
    trainer_class: type[ClassifierTrainer] = ClassifierTrainer,
    deepspeed: dict[str, Any] | None = None,
) -> ClassifierTrainer:
    """Assemble the Trainer around the model object: our loss, metrics, collator and callbacks.

    `trainer_class`: a subclass for a Trainer with a role of its own (a tune trial, `training.tune`).
    `deepspeed`: the DeepSpeed config of `training.deepspeed` (`zero.deepspeed_config`, made by the caller,
    which checks it before it writes anything)."""
    cfg = model.cfg
    keys: tuple[str, ...] = tuple(extra.columns) if extra is not None else ()
    for name, values in extra.columns.items() if extra is not None else ():
        train_ds = train_ds.add_column(name, values.tolist())
    if cfg.training.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    callbacks: list[Any] = []
    if cfg.training.early_stopping_patience and valid_ds is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience))
    if cfg.training.tensorboard or "tensorboard" in cfg.training.report_to:
        callbacks.append(tensorboard_callback(output_dir.parent / TENSORBOARD_DIR))
    return trainer_class(
        model=model.network,
        args=training_arguments(cfg, model.family, output_dir, valid_ds is not None, deepspeed),
        train_dataset=PackedRows(train_ds),
        eval_dataset=None if valid_ds is None else PackedRows(valid_ds),  # numpy rows, as for training
        data_collator=collate_with_targets(model.collate, keys) if keys else model.collate,
        compute_metrics=metrics_fn(model.labels, cfg.evaluation.threshold),
        callbacks=callbacks,
        loss_fn=loss_fn,
        head_lr_scale=cfg.training.head_lr_scale,
        rdrop_alpha=cfg.training.rdrop_alpha,
        multi_label=model.multi_label,
        layer_lr_decay=cfg.training.layer_lr_decay,
        adversarial=_adversary(model, cfg),
        adversarial_start_epoch=cfg.training.adversarial_start_epoch or 0.0,
        averaging=_averaging(model, cfg),
        swa_lr=cfg.training.swa.lr if cfg.training.swa else None,
        target_keys=keys,
        auxiliary_loss=extra.auxiliary_loss if extra is not None else None,
    )


def _averaging(model: TextModel, cfg: Config) -> AveragingCallback | None:
    """The callback of `training.ema_decay` or `training.swa`, or None."""
    t = cfg.training
    average: WeightAverage
    if t.ema_decay is not None:
        average = EMA(model.network, t.ema_decay)
    elif t.swa is not None:
        average = SWA(model.network)
    else:
        return None
    return AveragingCallback(average, every_steps=t.swa.every_steps if t.swa else None, start=t.swa.start if t.swa else 0.0)


def _adversary(model: TextModel, cfg: Config) -> Any:
    """The adversarial method of `training.adversarial` on the model's network, or None."""
    t = cfg.training
    if t.adversarial is None:
        return None
    from textclass.training.adversarial import make_adversary

    eps, alpha, steps = t.adversarial_epsilon, t.adversarial_alpha, t.adversarial_steps
    assert eps is not None and alpha is not None and steps is not None  # filled in by the config's validator
    return make_adversary(t.adversarial, model.network, eps, alpha, steps)
