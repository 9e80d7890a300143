"""Structural surgery on the Hugging Face transformer inside any model object: drop layers, slice attention
heads, FFN neurons and vocabulary rows, record the resulting shape and re-apply it when a run is loaded.

Nothing here masks: every operation builds smaller `nn.Linear` / `nn.Embedding` modules from rows or columns
of the old ones, so a pruned network is smaller and faster, not just zeroed. (transformers 5 removed
`prune_heads` and head masks; `torch.nn.utils.prune` masks.)

The transformer is found by what it is, not by family: the module with a `.config` and
`get_input_embeddings` (PEFT wrappers unwrapped), its blocks the `nn.ModuleList` as long as
`config.num_hidden_layers`, and a block's attention and FFN parts by the names of their linear layers
(`LAYOUTS`: BERT-style and Llama-style blocks). A network whose blocks match no layout is refused with one line.

Per-layer head counts and FFN widths differ after pruning and no Hugging Face config can say so (BERT derives
the head size from hidden_size / num_attention_heads), so `structure` records them and `apply_structure`
rebuilds those shapes on a network freshly built from its (unchanged) config, before its weights are loaded.
Layer dropping and vocabulary pruning are written into the config itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textclass.errors import UserError
from textclass.rundir import STRUCTURE_FILE

if TYPE_CHECKING:
    from textclass.models.base import TextModel


@dataclass(frozen=True)
class Layout:
    """Where a transformer block keeps its attention and FFN linear layers (paths relative to the block).

    `attention`: the module whose forward splits heads (its head-count attributes are updated);
    `qkv`: query, key, value projections inside it; `out`: the attention output projection (input = heads
    concatenated); `ffn_in`: the layers producing the FFN's hidden neurons; `ffn_out`: the layer reading them.
    """

    attention: str
    qkv: tuple[str, str, str]
    out: str
    ffn_in: tuple[str, ...]
    ffn_out: str


LAYOUTS = (
    # BERT, RoBERTa, ELECTRA, MiniLM, XLM-R, CamemBERT: BertLayer-like blocks
    Layout("attention.self", ("query", "key", "value"), "attention.output.dense", ("intermediate.dense",), "output.dense"),
    # Llama, Qwen2/3, Mistral, SmolLM, Gemma: gated MLP, grouped-query attention
    Layout("self_attn", ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
)


# -- finding the transformer ---------------------------------------------------------------------------------
def find_transformer(network: nn.Module) -> Any:
    """The Hugging Face base transformer inside `network` (BertModel, LlamaModel, ...), PEFT unwrapped."""
    for m in network.modules():
        if hasattr(m, "get_base_model"):  # a PeftModel: its wrapped model
            m = m.get_base_model()  # type: ignore[operator]
        if hasattr(m, "config") and hasattr(m, "get_input_embeddings"):
            return getattr(m, "base_model", m)
    raise UserError(f"{type(network).__name__} holds no Hugging Face transformer: there are no layers, heads or neurons to prune")


def transformer_layers(network: nn.Module) -> nn.ModuleList:
    """The transformer's block list: the `nn.ModuleList` whose length is `config.num_hidden_layers`.

    Public for distillation, which hooks each block's output.
    """
    body = find_transformer(network)
    n = int(body.config.num_hidden_layers)
    for m in body.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise UserError(f"{type(body).__name__}: no list of {n} transformer blocks found; it cannot be pruned")


def _parent_list(body: nn.Module, layers: nn.ModuleList) -> tuple[nn.Module, str]:
    for m in body.modules():
        for name, child in m.named_children():
            if child is layers:
                return m, name
    raise RuntimeError("the layer list has no parent module")


def layout_of(block: nn.Module) -> Layout:
    """The layout a block matches; one line naming the block when none does."""
    names = {n for n, _ in block.named_modules()}
    for layout in LAYOUTS:
        paths = [layout.attention, layout.out, layout.ffn_out, *layout.ffn_in, *(f"{layout.attention}.{p}" for p in layout.qkv)]
        if all(p in names for p in paths):
            return layout
    raise UserError(
        f"{type(block).__name__}: attention and FFN layers not laid out as in BERT or Llama blocks; "
        "heads and neurons of this architecture cannot be pruned (layers can: --layers)"
    )


# -- layers ------------------------------------------------------------------------------------------------------
def keep_layers(model: TextModel, layers: list[int]) -> None:
    """Keep only the transformer blocks `layers` (indices into the current list, kept in ascending order), in place.

    The config's `num_hidden_layers` (and `layer_types` where the config has it) follow, so the saved run
    builds the same network; each block's `layer_idx` is renumbered (KV caches index by it). The model is
    first made one that saves all its weights (`TextModel.prepare_surgery`: a LoRA run is merged).
    """
    model.prepare_surgery()
    body = find_transformer(model.network)
    blocks = transformer_layers(model.network)
    n = len(blocks)
    wanted = sorted(set(layers))
    if not wanted or wanted[0] < 0 or wanted[-1] >= n:
        raise UserError(f"layers {layers}: indices must lie in 0..{n - 1} (the model has {n} layers), at least one")
    parent, name = _parent_list(body, blocks)
    setattr(parent, name, nn.ModuleList([blocks[i] for i in wanted]))
    for new, block in enumerate(getattr(parent, name)):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new
    config = body.config
    config.num_hidden_layers = len(wanted)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == n:
        config.layer_types = [types[i] for i in wanted]


def evenly_spaced(n: int, keep: int) -> list[int]:
    """`keep` of `n` layer indices, evenly spaced, first and last included (12 -> 4: [0, 4, 7, 11])."""
    if keep == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})


# -- slicing Linear layers -----------------------------------------------------------------------------------------
def _sliced_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear with only the `index` outputs (dim 0) or inputs (dim 1) of `layer`."""
    index = index.to(layer.weight.device)
    weight = layer.weight.detach().index_select(dim, index).clone()
    bias: torch.Tensor | None = None if layer.bias is None else layer.bias.detach()
    if bias is not None and dim == 0:
        bias = bias[index].clone()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            assert new.bias is not None
            new.bias.copy_(bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new


def _linear(block: nn.Module, path: str) -> nn.Linear:
    layer = block.get_submodule(path)
    assert isinstance(layer, nn.Linear), (path, type(layer))
    return layer


def _attention(block: nn.Module, layout: Layout) -> Any:
    """The attention module (Any: its head-count attributes are the model's own)."""
    return block.get_submodule(layout.attention)


def _replace(block: nn.Module, path: str, index: torch.Tensor, dim: int) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    setattr(parent, leaf, _sliced_linear(_linear(block, path), index, dim))


def head_size(attention: Any) -> int:
    return int(getattr(attention, "attention_head_size", 0) or attention.head_dim)


def num_heads(block: nn.Module) -> int:
    """Query heads of a block now (its query projection's outputs over the head size)."""
    layout = layout_of(block)
    attention = _attention(block, layout)
    return _linear(attention, layout.qkv[0]).out_features // head_size(attention)


def shares_kv(block: nn.Module) -> bool:
    """Whether query heads share key/value heads (Llama-style attention with `num_key_value_groups`)."""
    return hasattr(_attention(block, layout_of(block)), "num_key_value_groups")


def kv_groups(block: nn.Module) -> int:
    """Query heads per key/value head: 1 for multi-head attention (keys and values go with their query head).

    Attention with a `num_key_value_groups` attribute (Llama-style) shares key/value heads; those are never
    removed, and each keeps the same number of query heads.
    """
    layout = layout_of(block)
    attention = _attention(block, layout)
    if not hasattr(attention, "num_key_value_groups"):
        return 1
    kv = _linear(attention, layout.qkv[1]).out_features // head_size(attention)
    return num_heads(block) // kv


def slice_heads(block: nn.Module, keep: list[int]) -> None:
    """Keep the query heads `keep` of one block. With grouped-query attention every key/value head keeps the
    same number of query heads (`keep` must say so) and no key/value head is removed."""
    layout = layout_of(block)
    attention = _attention(block, layout)
    size, groups, heads = head_size(attention), kv_groups(block), num_heads(block)
    keep = sorted(keep)
    shared = hasattr(attention, "num_key_value_groups")
    per_group = [sum(1 for h in keep if h // groups == g) for g in range(heads // groups)]
    if not keep or (shared and len(set(per_group)) != 1):
        raise ValueError(f"heads {keep}: keep the same number of query heads in each of the {len(per_group)} key/value groups")
    index = torch.tensor([h * size + i for h in keep for i in range(size)])
    q, k, v = (f"{layout.attention}.{p}" for p in layout.qkv)
    _replace(block, q, index, 0)
    if not shared:  # multi-head attention: keys and values go with their query head
        _replace(block, k, index, 0)
        _replace(block, v, index, 0)
    _replace(block, layout.out, index, 1)
    if hasattr(attention, "num_attention_heads"):
        attention.num_attention_heads = len(keep)
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = len(keep) * size
    if shared:
        attention.num_key_value_groups = per_group[0]


def ffn_width(block: nn.Module) -> int:
    return _linear(block, layout_of(block).ffn_out).in_features


def slice_ffn(block: nn.Module, keep: list[int]) -> None:
    """Keep the FFN neurons `keep` of one block (rows of the input layers, columns of the output layer)."""
    if not keep:
        raise ValueError("keep at least one FFN neuron per layer")
    layout = layout_of(block)
    index = torch.tensor(sorted(keep))
    for path in layout.ffn_in:
        _replace(block, path, index, 0)
    _replace(block, layout.ffn_out, index, 1)


# -- vocabulary -----------------------------------------------------------------------------------------------------
def slice_vocabulary(network: nn.Module, keep: list[int]) -> None:
    """Keep the embedding rows `keep` (old token ids, ascending: new id = position in `keep`), in the input
    embeddings (the classifiers here have no language-model head, so no output embeddings); the config's
    vocab_size and special-token ids follow."""
    body = find_transformer(network)
    old = body.get_input_embeddings()
    index = torch.tensor(sorted(keep), device=old.weight.device)
    new_id = {int(o): i for i, o in enumerate(index.tolist())}
    config = body.config
    pad = new_id.get(old.padding_idx) if old.padding_idx is not None else None
    emb = nn.Embedding(len(index), old.embedding_dim, padding_idx=pad, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        emb.weight.copy_(old.weight.detach()[index])
    emb.weight.requires_grad_(old.weight.requires_grad)
    body.set_input_embeddings(emb)
    config.vocab_size = len(index)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            setattr(config, key, new_id.get(value))


# -- structure: record and re-apply ---------------------------------------------------------------------------------
def structure(network: nn.Module) -> dict[str, Any] | None:
    """Per layer the query heads and FFN width, or None when every layer still has the config's shape."""
    body = find_transformer(network)
    blocks = transformer_layers(network)
    try:
        layers = [{"heads": num_heads(b), "ffn": ffn_width(b)} for b in blocks]
    except UserError:
        return None  # an unknown layout cannot have been sliced
    config = body.config
    full = {"heads": int(config.num_attention_heads), "ffn": int(config.intermediate_size)}
    return None if all(layer == full for layer in layers) else {"layers": layers}


def apply_structure(network: nn.Module, shape: dict[str, Any]) -> None:
    """Give a freshly built network the recorded per-layer shapes (weights come after, from the run's file).

    Which heads and neurons are kept does not matter here, only how many: the first ones of each group.
    """
    blocks = transformer_layers(network)
    if len(shape["layers"]) != len(blocks):
        raise UserError(
            f"{STRUCTURE_FILE}: {len(shape['layers'])} layers, the config {len(blocks)}; the run directory is damaged"
        )
    for block, layer in zip(blocks, shape["layers"], strict=True):
        heads, want = num_heads(block), int(layer["heads"])
        if want != heads and shares_kv(block):  # the first `per` query heads of each key/value group
            groups = kv_groups(block)
            kv = heads // groups
            slice_heads(block, [g * groups + i for g in range(kv) for i in range(want // kv)])
        elif want != heads:
            slice_heads(block, list(range(want)))
        if layer["ffn"] != ffn_width(block):
            slice_ffn(block, list(range(int(layer["ffn"]))))


def save_structure(network: nn.Module, run_dir: Path) -> None:
    """Write `structure.json` when the network's layers differ from what its config builds (else nothing)."""
    try:
        shape = structure(network)
    except UserError:  # no transformer (small family)
        return
    if shape is not None:
        (run_dir / STRUCTURE_FILE).write_text(json.dumps(shape, indent=1), encoding="utf-8")


def load_structure(network: nn.Module, run_dir: Path) -> None:
    """Re-apply a run directory's `structure.json`, if it has one, to a network built from its config."""
    path = run_dir / STRUCTURE_FILE
    if path.is_file():
        apply_structure(network, json.loads(path.read_text(encoding="utf-8")))
