"""The llm family's networks: a decoder LLM with a classification head, or scoring label words (zero-shot).

Every network takes `input_ids` and `attention_mask` and returns logits (batch, num_labels). Positions are
counted from the attention mask, so a left-padded text gets the same positions (and logits) as the same
text right-padded; pooling reads the last real token wherever the padding is.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from textclass.models.heads import multisample


class _TrainedOnly:
    """Checkpoints of the weights that train: with LoRA or a frozen LLM a few MB instead of the whole model.

    The Trainer calls `compact_state_dict` when it writes a checkpoint and reads checkpoints back with
    `load_state_dict(strict=False)`, so the frozen weights (already in the model) are simply not replaced.
    """

    def new_parameter_names(self) -> list[str]:
        """Weights the pretrained checkpoint did not bring: the head and LoRA's adapters."""
        head = set(self.head_parameter_names())  # type: ignore[attr-defined]
        assert isinstance(self, nn.Module)
        return [n for n, _ in self.named_parameters() if n in head or "lora_" in n]

    def compact_state_dict(self) -> dict[str, torch.Tensor]:
        assert isinstance(self, nn.Module)
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in trained}


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row, whichever side the padding is on."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def decoder_forward(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """A Hugging Face decoder's forward as every network here runs it: positions from the mask, no KV cache."""
    return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """The index of each row's last real token (right or left padding)."""
    steps = torch.arange(mask.size(1), device=mask.device)
    return (steps * mask.long()).argmax(-1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """`last`: the last real token's state (a decoder's summary of everything before it); `mean`: masked mean."""
    if method == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last_token_index(mask)]


def build_head(
    kind: str, hidden_size: int, num_labels: int, dropout: float, mlp_hidden: list[int], init_std: float = 0.02
) -> nn.Sequential:
    """`linear`: dropout + linear; `mlp`: (linear, GELU, dropout) per hidden size, then a linear layer.

    Weights start as transformers initialises a new head (normal with the model's `initializer_range`, zero
    bias), not as torch's default (uniform, with a random bias). Measured on SmolLM2-135M + LoRA, bbc-news
    (400 texts, 50 steps, seed 42): torch's init started at loss 2.15 (chance: 1.61) and reached 0.53 test
    accuracy; this init starts at 1.31 and reaches 0.72 (transformers' own `score` head: 0.69).
    """
    layers: list[nn.Module] = [nn.Dropout(dropout)]
    width = hidden_size
    for size in mlp_hidden if kind == "mlp" else []:
        layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
        width = size
    head = nn.Sequential(*layers, nn.Linear(width, num_labels))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=init_std)
            nn.init.zeros_(m.bias)
    return head


class LLMClassifier(_TrainedOnly, nn.Module):
    """A decoder body (plain or with LoRA adapters) -> pooling -> our head (`linear` or `mlp`)."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential, pooling: str, samples: int = 1) -> None:
        super().__init__()
        self.body = backbone
        self.head = head
        self.pooling = pooling
        self.samples = samples  # multi-sample dropout (models/heads.py)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = decoder_forward(self.body, input_ids, attention_mask)
        pooled = pool(out.last_hidden_state, attention_mask, self.pooling)
        # the head is float32 also on a half-precision base (`model.dtype`)
        return multisample(self.head, pooled.float(), self.samples, self.training)

    def head_module(self) -> nn.Module:
        return self.head

    def head_parameter_names(self) -> list[str]:
        """The head: the only weights not from the pretrained checkpoint (the optimizer's `head_lr_scale` group)."""
        return [n for n, _ in self.named_parameters() if n.startswith("head.")]


class HFHeadLLM(_TrainedOnly, nn.Module):
    """AutoModelForSequenceClassification (plain or with LoRA adapters) returning its logits.

    Its pooling is transformers' own: the rightmost token that is not the pad token, so the pad token id
    must be in the model config (the family sets it) and texts must not contain the pad token.
    """

    def __init__(self, model: nn.Module, score: nn.Module) -> None:
        super().__init__()
        self.body = model
        self._score: nn.Module
        object.__setattr__(self, "_score", score)  # a reference, not a second registration of the same weights

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return decoder_forward(self.body, input_ids, attention_mask).logits

    def head_module(self) -> nn.Module:
        return self._score

    def head_parameter_names(self) -> list[str]:
        ids = {id(p) for p in self._score.parameters()}
        return [n for n, p in self.named_parameters() if id(p) in ids]


class LabelWordScorer(nn.Module):
    """Zero-shot: each label's logit is the LLM's log-likelihood of its words right after the prompt.

    Labels whose words are one token each are all read from one forward pass (the next-token distribution at
    the prompt's last token); a label of several tokens costs one more pass with its tokens appended.
    """

    def __init__(self, lm: nn.Module, label_ids: list[list[int]], pad_id: int) -> None:
        super().__init__()
        self.body = lm
        self.label_ids = label_ids
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = decoder_forward(self.body, input_ids, attention_mask).logits
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        next_token = torch.log_softmax(logits[rows, last_token_index(attention_mask)].float(), dim=-1)
        scores = []
        for ids in self.label_ids:
            scores.append(next_token[:, ids[0]] if len(ids) == 1 else self._continuation(input_ids, attention_mask, ids))
        return torch.stack(scores, dim=1)

    def _continuation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """Summed log-probability of `ids` after each row's real tokens (rows rebuilt left-padded, so the
        continuation sits at the same positions in every row)."""
        k = len(ids)
        rows = [
            torch.cat([r[m.bool()], torch.tensor(ids, device=r.device)]) for r, m in zip(input_ids, attention_mask, strict=True)
        ]
        width = max(len(r) for r in rows)
        seq = torch.full((len(rows), width), self.pad_id, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros_like(seq)
        for i, r in enumerate(rows):
            seq[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
        logits = decoder_forward(self.body, seq, mask).logits
        logp = torch.log_softmax(logits[:, width - k - 1 : width - 1].float(), dim=-1)  # predicts the k label tokens
        target = torch.tensor(ids, device=seq.device).expand(len(rows), k)
        return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)

    def head_module(self) -> nn.Module:
        return nn.Identity()


def linear_layer_names(module: nn.Module) -> list[str]:
    """The distinct short names of a transformer's linear layers (q_proj, ..., down_proj): LoRA's default targets."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)})


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT (0.21) asks transformers' deprecated `is_gradient_checkpointing`, which warns on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def add_lora(model: Any, target_modules: list[str], r: int, alpha: int, dropout: float) -> Any:
    """`model` with PEFT LoRA adapters on `target_modules` (short names inside its transformer)."""
    from peft import LoraConfig, get_peft_model

    with quiet_peft():
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules))


def load_lora(model: Any, folder: str) -> Any:
    """`model` with the adapters saved in `folder` (PEFT's format), frozen."""
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(model, folder)
