"""Families derived from transformers' code, refusals that name what is missing, and MoE weight conversion."""
import pytest
import torch

from potluck.protocol.conversion import convert_block
from potluck.protocol.errors import BadRequest
from potluck.protocol.families import derived_family


def test_families_come_from_the_installed_transformers():
    family = derived_family("mixtral")
    assert (family.layer_class, family.rotary_class) == ("MixtralDecoderLayer", "MixtralRotaryEmbedding")
    assert derived_family("olmo2").layer_class == "Olmo2DecoderLayer"  # not tested with Potluck, same layout
    assert derived_family("gemma3_text").layer_class == "Gemma3DecoderLayer"  # the class prefix differs


def test_architectures_outside_the_layout_are_refused_by_what_they_lack():
    with pytest.raises(BadRequest, match="no single decoder-layer class"):
        derived_family("bert")  # an encoder: BertLayer
    with pytest.raises(BadRequest, match="no transformers base model"):
        derived_family("no-such-model")


def test_per_expert_tensors_are_merged_as_the_layer_holds_them():
    experts, inner, hidden = 3, 5, 4
    weights = {"model.layers.2.block_sparse_moe.gate.weight": torch.randn(experts, hidden),
               "model.layers.2.input_layernorm.weight": torch.randn(hidden)}
    for e in range(experts):
        for name, shape in (("w1", (inner, hidden)), ("w2", (hidden, inner)), ("w3", (inner, hidden))):
            weights[f"model.layers.2.block_sparse_moe.experts.{e}.{name}.weight"] = torch.full(shape, float(e))
    got = convert_block("mixtral", weights)
    assert set(got) == {"model.layers.2.mlp.gate.weight", "model.layers.2.input_layernorm.weight",
                        "model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj"}
    gate_up = got["model.layers.2.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (experts, 2 * inner, hidden)
    assert [float(gate_up[e, 0, 0]) for e in range(experts)] == [0.0, 1.0, 2.0]  # in expert order
    assert got["model.layers.2.mlp.experts.down_proj"].shape == (experts, hidden, inner)
    assert convert_block("llama", {"model.layers.0.mlp.up_proj.weight": gate_up}).keys() == {
        "model.layers.0.mlp.up_proj.weight"}  # families without a conversion keep their names
