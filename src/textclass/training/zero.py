"""DeepSpeed ZeRO through the Trainer (`training.deepspeed`): the presets, the checks, and the weights to save.

The Trainer does the DeepSpeed work itself (`TrainingArguments(deepspeed=...)`: the engine, partitioning,
checkpoints with sharded optimizer state, loading the best checkpoint). What is ours:
- the presets `zero2`, `zero3`, `zero3_offload`: DeepSpeed configs with `auto` values the Trainer fills in from
  the training section (batch size, accumulation, clipping, precision), so the user never writes one twice;
- a user's own JSON config, read and checked here so a mistake is one line naming the key;
- the refusal of what ZeRO cannot partition (the config refuses the tricks that touch weights outside the
  engine: `TrainingConfig._deepspeed_combinations`);
- the setup accelerate lacks on a machine without GPU, and for one process without a launcher;
- after ZeRO-3 training, every weight gathered in full onto rank 0 so the run directory holds a plain model
  that loads in one process (`full_network`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from textclass.config import DEEPSPEED_PRESETS
from textclass.errors import UserError
from textclass.training.optim import sparse_parameters

log = logging.getLogger("textclass")

KEY = "training.deepspeed"
_COMMON: dict[str, Any] = {
    # (no `train_batch_size`: DeepSpeed derives it from these two and the world size; the Trainer would fill an
    # `auto` one before it knows the world size, with 1)
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "steps_per_print": 10**9,  # the Trainer logs the loss; DeepSpeed's own line every N steps would repeat it
    "wall_clock_breakdown": False,
}
_ZERO3: dict[str, Any] = {
    "stage": 3,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    # the run directory must hold whole weights, not shards (see `full_network`)
    "stage3_gather_16bit_weights_on_model_save": True,
}
_OFFLOAD = {"device": "cpu", "pin_memory": True}
PRESETS: dict[str, dict[str, Any]] = {
    "zero2": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"},
    "zero3": _ZERO3,
    "zero3_offload": {**_ZERO3, "offload_optimizer": _OFFLOAD, "offload_param": _OFFLOAD},
}
assert tuple(PRESETS) == DEEPSPEED_PRESETS  # the names the config accepts
_HIDDEN_SIZE_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def deepspeed_config(value: str, network: nn.Module) -> dict[str, Any]:
    """The DeepSpeed config of `training.deepspeed` (a preset or a JSON file), ready for `TrainingArguments`."""
    if value in PRESETS:
        config = copy.deepcopy(_COMMON) | {"zero_optimization": copy.deepcopy(PRESETS[value])}
        if value == "zero3_offload":
            # Keep the Trainer's torch AdamW (with our parameter groups) for the offloaded optimizer state;
            # DeepSpeed would otherwise insist on its CPUAdam, which compiles C++ on first use (~2 min).
            config["zero_force_ds_cpu_optimizer"] = False
    else:
        config = read_config(Path(value))
    if config.get("train_batch_size") == "auto":
        del config["train_batch_size"]  # see _COMMON
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        log.info("%s: setting stage3_gather_16bit_weights_on_model_save, so the run directory holds whole weights", KEY)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    _fill_hidden_size(zero, network)
    return config


def read_config(path: Path) -> dict[str, Any]:
    """A user's DeepSpeed JSON config, checked enough that a mistake is one line here, not a traceback later."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        presets = ", ".join(PRESETS)
        raise UserError(f"{KEY}: {path} not found; give an existing DeepSpeed JSON file or a preset ({presets})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{KEY}: cannot read {path} ({err}); give a UTF-8 DeepSpeed JSON file") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{KEY}: {path} line {err.lineno}: not valid JSON ({err.msg}); fix the file") from None
    if not isinstance(config, dict):
        raise UserError(f"{KEY}: {path} must hold a JSON object (a DeepSpeed config), not {type(config).__name__}")
    stage = config.get("zero_optimization", {}).get("stage", 0) if isinstance(config.get("zero_optimization"), dict) else None
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{KEY}: {path}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    return config


def _fill_hidden_size(zero: dict[str, Any], network: nn.Module) -> None:
    """The Trainer fills the bucket sizes' `auto` from `model.config.hidden_size`, which only a bare Hugging
    Face model has: ours wrap one (or none, small models). Fill them from the wrapped transformer's hidden
    size the way the Trainer would, or leave them to DeepSpeed's defaults where there is no transformer."""
    auto = [k for k in _HIDDEN_SIZE_KEYS if zero.get(k) == "auto"]
    if not auto:
        return
    sizes = (getattr(getattr(m, "config", None), "hidden_size", None) for m in network.modules())
    hidden = next((int(h) for h in sizes if h), None)
    for k in auto:
        if hidden is None:
            del zero[k]
        else:
            zero[k] = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)}.get(
                k, 10 * hidden
            )


def configured_state() -> dict[str, Any]:
    """`TrainingArguments` settings that make the Trainer start DeepSpeed on a machine without an accelerator.

    accelerate (1.16) starts a DeepSpeed run's state without a backend where no GPU is found, so it counts one
    process and its gathers fail on the second. Under torchrun on such a machine the state is configured
    here instead, the same way but with gloo, and the Trainer is told to use it (`use_configured_state`);
    elsewhere (GPUs, one process) the Trainer's own setup is left alone.
    """
    from textclass.training import distributed

    if not distributed.launched():
        _single_process_group()
    if not distributed.needs_cpu_flag():
        return {}

    from accelerate.state import AcceleratorState, PartialState  # type: ignore[import-untyped]

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets for this call, too
    try:
        PartialState(backend="gloo", timeout=distributed.TIMEOUT)
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"accelerator_config": {"use_configured_state": True}}


def _single_process_group() -> None:
    """DeepSpeed always trains in a process group; in a plain single process (no launcher) it would look for
    MPI to start one. The environment of a one-process group on the loopback interface instead (what the
    `deepspeed` launcher would set for one GPU)."""
    import socket

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def zero_stage(config: dict[str, Any] | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0: none)."""
    return int(config.get("zero_optimization", {}).get("stage", 0)) if config else 0


def check_supported(network: nn.Module) -> None:
    """Refuse, in one line and before anything is written, a network DeepSpeed cannot partition. (Tricks
    that cannot run under it are refused by the config: `TrainingConfig._deepspeed_combinations`.)"""
    if sparse_parameters(network):
        raise UserError(
            f"{KEY}: fastText's sparse embedding table cannot be partitioned by DeepSpeed; train it without "
            "training.deepspeed (torchrun DDP handles it: textclass train --nproc N)"
        )


def full_network(trainer: Any) -> nn.Module:
    """The trained network with every weight whole on rank 0: under ZeRO-3 each process holds a shard of each
    weight, so they are gathered (a collective: every rank calls this) through the engine's 16-bit gather
    (`stage3_gather_16bit_weights_on_model_save`, one layer at a time onto rank 0) and put back into rank 0's
    module, which the family then saves as it saves any network. Other stages: the network as it is."""
    network = trainer.model
    if not trainer.is_deepspeed_enabled or zero_stage(trainer.accelerator.deepspeed_config) != 3:
        return network
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # whole tensors on rank 0, {} elsewhere
    if state:
        for name, param in network.named_parameters(remove_duplicate=False):
            param.data = state[name]
    return network


def release() -> None:
    """Forget the DeepSpeed config the Trainer registered globally: with it, a model loaded later in this
    process (the saved run read back for its reports) would be partitioned by `zero.Init` on rank 0 alone."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
