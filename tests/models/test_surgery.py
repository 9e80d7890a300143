"""Structural surgery (models.surgery): sliced heads and FFN neurons compute what the full network computes with
their contributions zeroed, keeping every layer is the identity, and a reshaped network saves and reloads
to the same logits (encoder `linear` and `hf` heads, a grouped-query Llama fine-tuned in full)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from surgery_helpers import LABELS, logits, make, widened

from textclass.errors import UserError
from textclass.models import surgery
from textclass.rundir import STRUCTURE_FILE, load_model_parts


@pytest.fixture(scope="module")
def bert4(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers of 4 heads (size 8), FFN 64, no dropout."""
    out = tmp_path_factory.mktemp("bert4") / "m"
    return widened(
        tiny_bert, out, num_hidden_layers=4, num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


@pytest.fixture(scope="module")
def llama_gqa(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 layers, 6 query heads over 2 key/value heads (3 per group), head size 8."""
    out = tmp_path_factory.mktemp("llama6") / "m"
    return widened(tiny_llama, out, num_hidden_layers=3, hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8)


def zero_inputs(block: torch.nn.Module, path: str, columns: list[int]) -> None:
    """Zero the given input columns of a block's linear layer: those units then contribute nothing."""
    with torch.no_grad():
        block.get_submodule(path).weight[:, columns] = 0.0


def test_evenly_spaced_keeps_first_and_last() -> None:
    assert surgery.evenly_spaced(12, 4) == [0, 4, 7, 11]
    assert surgery.evenly_spaced(12, 12) == list(range(12))
    assert surgery.evenly_spaced(6, 2) == [0, 5]


@pytest.mark.parametrize("head", ["linear", "hf"])
def test_keep_all_layers_is_the_identity_and_a_subset_shrinks_config_and_network(bert4: Path, head: str) -> None:
    m = make(bert4, head=head)
    before = logits(m)
    surgery.keep_layers(m, [0, 1, 2, 3])  # type: ignore[arg-type]
    assert torch.equal(logits(m), before)
    layers = surgery.transformer_layers(m.network)  # type: ignore[attr-defined]
    third = layers[3]
    surgery.keep_layers(m, [0, 3])  # type: ignore[arg-type]
    layers = surgery.transformer_layers(m.network)  # type: ignore[attr-defined]
    assert len(layers) == 2 and layers[1] is third
    assert surgery.find_transformer(m.network).config.num_hidden_layers == 2  # type: ignore[attr-defined]
    assert layers[1].attention.self.layer_idx == 1
    with pytest.raises(UserError, match="0..1"):
        surgery.keep_layers(m, [2])  # type: ignore[arg-type]


def test_sliced_heads_equal_the_full_network_with_those_heads_zeroed(bert4: Path) -> None:
    m = make(bert4)
    reference = copy.deepcopy(m)
    blocks, ref_blocks = surgery.transformer_layers(m.network), surgery.transformer_layers(reference.network)  # type: ignore[attr-defined]
    removed = {0: [1, 2], 2: [0]}
    for i, heads in removed.items():
        surgery.slice_heads(blocks[i], [h for h in range(4) if h not in heads])
        zero_inputs(ref_blocks[i], "attention.output.dense", [h * 8 + j for h in heads for j in range(8)])
    assert surgery.num_heads(blocks[0]) == 2 and blocks[0].attention.self.query.out_features == 16
    assert torch.allclose(logits(m), logits(reference), atol=1e-5)


def test_sliced_ffn_neurons_equal_the_full_network_with_those_neurons_zeroed(bert4: Path) -> None:
    m = make(bert4, head="hf")
    reference = copy.deepcopy(m)
    blocks, ref_blocks = surgery.transformer_layers(m.network), surgery.transformer_layers(reference.network)  # type: ignore[attr-defined]
    removed = list(range(0, 64, 3))
    surgery.slice_ffn(blocks[1], [n for n in range(64) if n not in removed])
    zero_inputs(ref_blocks[1], "output.dense", removed)
    assert surgery.ffn_width(blocks[1]) == 64 - len(removed)
    assert torch.allclose(logits(m), logits(reference), atol=1e-5)


def test_gqa_heads_are_removed_per_group_and_match_zeroing(llama_gqa: Path) -> None:
    m = make(llama_gqa, "llm", head="linear")
    reference = copy.deepcopy(m)
    blocks, ref_blocks = surgery.transformer_layers(m.network), surgery.transformer_layers(reference.network)  # type: ignore[attr-defined]
    assert surgery.kv_groups(blocks[0]) == 3
    with pytest.raises(ValueError, match="same number"):
        surgery.slice_heads(blocks[0], [0, 1, 3])  # 2 heads of group 0, 1 of group 1
    surgery.slice_heads(blocks[0], [1, 4])  # one query head per key/value group
    zero_inputs(ref_blocks[0], "self_attn.o_proj", [h * 8 + j for h in (0, 2, 3, 5) for j in range(8)])
    attention = blocks[0].self_attn
    assert surgery.num_heads(blocks[0]) == 2 and attention.num_key_value_groups == 1
    assert attention.k_proj.out_features == 16  # no key/value head removed
    assert torch.allclose(logits(m), logits(reference), atol=1e-5)


def _prune_some(m: object) -> None:
    blocks = surgery.transformer_layers(m.network)  # type: ignore[attr-defined]
    groups = surgery.kv_groups(blocks[0])
    heads = surgery.num_heads(blocks[0])
    surgery.slice_heads(blocks[0], [g * groups for g in range(heads // groups)])  # one head per group
    surgery.slice_ffn(blocks[-1], list(range(5, 40)))
    surgery.keep_layers(m, [0, len(blocks) - 1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fixture", "family", "head"), [("bert4", "encoder", "linear"), ("bert4", "encoder", "hf"), ("llama_gqa", "llm", "hf")]
)
def test_a_reshaped_run_saves_and_reloads_to_the_same_logits(
    fixture: str, family: str, head: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    m = make(request.getfixturevalue(fixture), family, head=head)
    _prune_some(m)
    expected = logits(m)
    m.save_weights(tmp_path)  # type: ignore[attr-defined]
    assert (tmp_path / STRUCTURE_FILE).is_file()
    loaded = load_model_parts(tmp_path, m.cfg, LABELS)  # type: ignore[attr-defined]
    assert torch.allclose(logits(loaded), expected, atol=1e-6)
    shape = surgery.structure(loaded.network)
    assert shape is not None and len(shape["layers"]) == 2 and shape["layers"][1]["ffn"] == 35


def test_an_unpruned_run_writes_no_structure_file(bert4: Path, tmp_path: Path) -> None:
    m = make(bert4)
    m.save_weights(tmp_path)  # type: ignore[attr-defined]
    assert not (tmp_path / STRUCTURE_FILE).exists()
