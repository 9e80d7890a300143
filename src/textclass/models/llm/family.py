"""The llm family: decoder LLMs as classifiers (full fine-tuning, LoRA through PEFT, or head only) and zero-shot.

What a run directory holds depends on `model.finetune`:
- `full`: every weight (`model.safetensors`) and the network's config: it stands alone.
- `lora`: the adapter in PEFT's format (`adapter/`) and the head (`head.safetensors`), never the base
  model: `llm.json` names it and records a content hash of its weights, checked at load.
- `head`: the head only, with the same base reference.
Zero-shot runs (`head: lm`) hold no weights at all: the base model scores the label words.

The head is always saved by us, whatever PEFT's `modules_to_save` would have done, and the pad token is set
in the tokenizer and in the model config (eos when the model has none), the two walls scripts hit most.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from textclass.config import Config, LLMModelConfig
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.fileio import write_json
from textclass.models.base import OnnxSpec, TextModel
from textclass.models.llm.network import (
    HFHeadLLM,
    LabelWordScorer,
    LLMClassifier,
    add_lora,
    build_head,
    linear_layer_names,
    load_lora,
    quiet_peft,
)
from textclass.models.llm.pretrained import BaseModel, check_causal_lm, fingerprint, resolve
from textclass.models.llm.prompt import PromptEncoder
from textclass.models.pretrained import load_pretrained
from textclass.models.registry import Family, register
from textclass.models.surgery import load_structure, save_structure
from textclass.rundir import ADAPTER_DIR, HEAD_FILE, LLM_FILE, WEIGHTS_FILE


@dataclass(eq=False)
class LLMModel(TextModel):
    """A decoder LLM with its head (or label words), tokenizer and prompt."""

    record: dict[str, Any] = field(default_factory=dict)  # what `llm.json` holds: base model, hash, counts

    @property
    def mcfg(self) -> LLMModelConfig:
        assert isinstance(self.cfg.model, LLMModelConfig)
        return self.cfg.model

    @cached_property
    def prompt(self) -> PromptEncoder:
        words = self.mcfg.label_words or {}
        labels_text = ", ".join(words.get(name, name) for name in self.labels.names)
        return PromptEncoder(self.tokenizer, self.mcfg.prompt, labels_text, self.mcfg.max_length)

    def encode(self, texts: list[str], pairs: list[str] | None) -> dict[str, list]:
        return self.prompt(texts, pairs)

    def _pad(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad(features, padding=True, return_tensors="pt"))

    @property
    def body(self) -> Any:
        """The pretrained part of the network (with its adapters, if any)."""
        return getattr(self.network, "body", None)

    def save_weights(self, run_dir: Path) -> None:
        self.tokenizer.save_pretrained(run_dir)
        record = dict(self.record)
        all_params, trainable = TextModel.parameter_counts(self)  # of the network as trained (ours reads the record)
        record.setdefault("parameters", {"all": all_params, "trainable": 0 if self.mcfg.head == "lm" else trainable})
        if self.mcfg.head != "lm":
            if self.mcfg.finetune == "full":
                record["config"] = self.body.config.to_dict()
                save_structure(self.network, run_dir)  # a pruned LLM's per-layer shapes (none otherwise)
                state = {k: v.contiguous() for k, v in self.network.state_dict().items()}
                save_file(state, str(run_dir / WEIGHTS_FILE), metadata={"format": "pt"})
            else:
                if self.mcfg.finetune == "lora":
                    self.body.save_pretrained(str(run_dir / ADAPTER_DIR))
                head = {k: v.contiguous() for k, v in _head_of(self.network).state_dict().items()}
                save_file(head, str(run_dir / HEAD_FILE), metadata={"format": "pt"})
        write_json(run_dir / LLM_FILE, record)

    def parameter_counts(self) -> tuple[int, int]:
        """(all, trainable) as trained: a loaded adapter is frozen, but it is what training changed."""
        counts = self.record.get("parameters")
        return (int(counts["all"]), int(counts["trainable"])) if counts else super().parameter_counts()

    def replace_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.__dict__.pop("prompt", None)  # the cached prompt encoder holds the old tokenizer

    def prepare_surgery(self) -> None:
        """Surgery changes the base model's own weights, so the run must save them all: a LoRA run is merged,
        a head-only run becomes a full fine-tune (its body trainable, for a recovery fine-tune)."""
        if self.mcfg.head == "lm":
            raise UserError("a zero-shot run (head: lm) has no trained weights to prune; train a head first")
        if self.mcfg.finetune == "lora":
            self.merge_adapter()
        self.mcfg.finetune = "full"
        self.record["finetune"] = "full"
        self.body.requires_grad_(True)
        self.record.pop("parameters", None)  # counted again from the network when saved

    def merge_adapter(self) -> None:
        """Fold LoRA adapters into the weights (`merge_and_unload`): the same function, plain layers, and the
        model becomes a full fine-tune (what `export --merge` writes and what ONNX export traces)."""
        if self.mcfg.head == "lm":
            raise UserError("a zero-shot run (head: lm) trains nothing: there is no adapter to merge")
        if self.mcfg.finetune != "lora":
            raise UserError(f"model.finetune is {self.mcfg.finetune}: there is no adapter to merge (only lora runs have one)")
        with quiet_peft():
            self.network.body = self.body.merge_and_unload()
        self.mcfg.finetune = "full"
        self.record["finetune"] = "full"

    # -- ONNX -------------------------------------------------------------------------------------------
    def onnx_spec(self, sample_batch: dict[str, torch.Tensor]) -> OnnxSpec:
        spec = super().onnx_spec(sample_batch)
        spec.pad_id = int(self.tokenizer.pad_token_id)
        spec.padding_side = getattr(self.tokenizer, "padding_side", "right")
        return spec

    def onnx_module(self, int8: bool = False) -> nn.Module:
        if self.mcfg.head == "lm":
            raise UserError("zero-shot runs (head: lm) are not exported to ONNX; train a head, then export")
        if self.mcfg.finetune == "lora":
            self.merge_adapter()  # the graph of plain layers (adapters merged), not PEFT's extra matmuls
        return super().onnx_module(int8)

    def onnx_text_encoding(self) -> str:
        return "family"  # the prompt and its text-only truncation are ours, not the tokenizer.json's


def _head_of(network: nn.Module) -> nn.Module:
    assert isinstance(network, (LLMClassifier, HFHeadLLM, LabelWordScorer)), type(network)
    return network.head_module()


@register("llm")
class LLMFamily(Family[LLMModelConfig]):
    """Decoder LLMs through AutoModel / AutoModelForSequenceClassification / AutoModelForCausalLM and PEFT."""

    def create(self, cfg: Config, labels: LabelSet, train_texts: list[str]) -> LLMModel:
        mcfg = _section(cfg)
        if mcfg.head == "lm":
            raise UserError(
                "model.head: lm scores label words without training; run `textclass zero-shot`, or train a linear, mlp or hf head"
            )
        tokenizer, body, record = _pretrained(mcfg, labels)
        return LLMModel(self, _assemble(body, mcfg, labels, fresh=True), tokenizer, labels, cfg, record)

    def zero_shot(self, cfg: Config, labels: LabelSet) -> LLMModel:
        """The zero-shot model of `cfg` (`head: lm`): the LLM scores each label's words after the prompt."""
        mcfg = _section(cfg)
        tokenizer, body, record = _pretrained(mcfg, labels)
        return LLMModel(self, _scorer(body, mcfg, labels, tokenizer), tokenizer, labels, cfg, record)

    def load(self, run_dir: Path, cfg: Config, labels: LabelSet, network: bool = True) -> LLMModel:
        from transformers import AutoTokenizer

        mcfg = _section(cfg)
        tokenizer = AutoTokenizer.from_pretrained(run_dir)
        record = json.loads((run_dir / LLM_FILE).read_text(encoding="utf-8"))
        if not network:
            return LLMModel(self, nn.Module(), tokenizer, labels, cfg, record)
        if mcfg.head != "lm" and mcfg.finetune == "full":
            from transformers import AutoConfig

            body = _body_class(mcfg).from_config(AutoConfig.for_model(**record["config"]))
            net = _assemble(body, mcfg, labels, fresh=False)
            load_structure(net, run_dir)
            net.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
            return LLMModel(self, net.eval(), tokenizer, labels, cfg, record)
        base = resolve(mcfg)
        body = _load_body(base, mcfg, labels, tokenizer)
        if fingerprint(body.base_model) != record.get("fingerprint"):
            raise UserError(
                f"{run_dir}: its base model {mcfg.name!r} has changed since training (content hash differs); "
                "restore the weights it was trained on, or train again"
            )
        if mcfg.head == "lm":
            return LLMModel(self, _scorer(body, mcfg, labels, tokenizer).eval(), tokenizer, labels, cfg, record)
        if mcfg.finetune == "lora":
            body = load_lora(body, str(run_dir / ADAPTER_DIR))
        net = _assemble(body, mcfg, labels, fresh=False)
        _head_of(net).load_state_dict(load_file(str(run_dir / HEAD_FILE)))
        return LLMModel(self, net.eval(), tokenizer, labels, cfg, record)

    def default_learning_rate(self, cfg: LLMModelConfig) -> float:
        """Full fine-tuning moves every weight and wants a small rate; LoRA's fresh low-rank matrices and a
        lone head (linear probe) train from zero and want larger ones (the PEFT docs' and probes' usual rates)."""
        return {"full": 2e-5, "lora": 2e-4, "head": 1e-3}[cfg.finetune]

    def default_batch_size(self, cfg: LLMModelConfig) -> int:
        return 8


def _section(cfg: Config) -> LLMModelConfig:
    assert isinstance(cfg.model, LLMModelConfig)
    return cfg.model


def _pretrained(mcfg: LLMModelConfig, labels: LabelSet) -> tuple[Any, Any, dict[str, Any]]:
    """For a new model: the checked base model's tokenizer, its loaded body and the record naming it."""
    base = resolve(mcfg)
    check_causal_lm(base)
    tokenizer = _tokenizer(base.path, base.name)
    body = _load_body(base, mcfg, labels, tokenizer)
    return tokenizer, body, _base_record(base, mcfg, fingerprint(body.base_model))


def _base_record(base: BaseModel, mcfg: LLMModelConfig, digest: str) -> dict[str, Any]:
    return {
        "base_model": base.name,
        "gguf_file": base.gguf_file,
        "fingerprint": digest,
        "finetune": mcfg.finetune,
        "head": mcfg.head,
    }


def _tokenizer(path: str | Path, name: str) -> Any:
    """The model's tokenizer with a pad token: eos when the model has none (decoder LLMs rarely do)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, str(path), name, "tokenizer")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"model.name {name!r}: its tokenizer has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _body_class(mcfg: LLMModelConfig) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"hf": AutoModelForSequenceClassification, "lm": AutoModelForCausalLM}.get(mcfg.head, AutoModel)


def _load_body(base: BaseModel, mcfg: LLMModelConfig, labels: LabelSet, tokenizer: Any) -> Any:
    """The pretrained model in `model.dtype` (float32 by default: master weights, autocast does the low
    precision), the pad id in its config."""
    kwargs: dict[str, Any] = {"dtype": getattr(torch, mcfg.dtype), "pad_token_id": tokenizer.pad_token_id}
    if mcfg.head == "hf":
        kwargs |= {
            "num_labels": labels.num_labels,
            "id2label": labels.id2label,
            "label2id": labels.label2id,
            "problem_type": "multi_label_classification" if labels.multi_label else "single_label_classification",
        }
    body = load_pretrained(_body_class(mcfg), base.path, base.name, "model", **kwargs)
    body.config.pad_token_id = tokenizer.pad_token_id
    return body


def _assemble(body: Any, mcfg: LLMModelConfig, labels: LabelSet, fresh: bool) -> nn.Module:
    """Freeze, add LoRA (`fresh`: new adapters; else `body` already carries the loaded ones) and put the head on."""
    score = _hf_score(body) if mcfg.head == "hf" else None
    if mcfg.finetune == "head":
        body.requires_grad_(False)
    elif mcfg.finetune == "lora" and fresh:
        body = add_lora(body, _lora_targets(body, mcfg), mcfg.lora.r, mcfg.lora.alpha, mcfg.lora.dropout)
    if score is not None:
        score.requires_grad_(True)  # PEFT and head-only freeze everything else; the head always trains
        return HFHeadLLM(body, score)
    std = float(getattr(body.config, "initializer_range", 0.02))
    head = build_head(mcfg.head, body.config.hidden_size, labels.num_labels, mcfg.dropout, mcfg.mlp_hidden, std)
    return LLMClassifier(body, head, mcfg.pooling, mcfg.multisample_dropout)


def _hf_score(model: Any) -> nn.Module:
    """AutoModelForSequenceClassification's head: its one child module outside the base transformer."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    heads = [m for m in inner.children() if m is not inner.base_model and any(True for _ in m.parameters())]
    if len(heads) != 1:
        raise UserError(f"model.head: hf: cannot tell the classification head of {type(inner).__name__}; use head: linear")
    return heads[0]


def _lora_targets(body: Any, mcfg: LLMModelConfig) -> list[str]:
    """`model.lora.target_modules`, checked against the transformer's linear layers; default: all of them."""
    available = linear_layer_names(body.base_model)
    wanted = mcfg.lora.target_modules or available
    missing = [t for t in wanted if t not in available]
    if missing:
        raise UserError(
            f"model.lora.target_modules: {', '.join(missing)} not in {mcfg.name}; its linear layers are {', '.join(available)}"
        )
    return list(wanted)


def _scorer(body: Any, mcfg: LLMModelConfig, labels: LabelSet, tokenizer: Any) -> LabelWordScorer:
    """Token ids of each label's words as they follow the prompt (a leading space unless the prompt ends in one)."""
    words = mcfg.label_words or {}
    unknown = sorted(set(words) - set(labels.names))
    if unknown:
        raise UserError(f"model.label_words: {', '.join(unknown)} not among the labels ({', '.join(labels.names)})")
    space = "" if (mcfg.prompt or "{text}").endswith((" ", "\n")) else " "
    ids = [tokenizer(space + words.get(n, n), add_special_tokens=False)["input_ids"] for n in labels.names]
    if any(not x for x in ids):
        raise UserError("model.label_words: a label's words are empty; give every label at least one word")
    return LabelWordScorer(body, ids, int(tokenizer.pad_token_id))
