"""Spans with 8- and 4-bit weights (``potluck node --quant``): they compute what the model computes
with the same packed weights, for every family, and take the bytes the sizing says."""
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from potluck.node.quantize import PackedExperts, quantize_block
from potluck.node.span import block_bytes, load_span
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.errors import BadRequest

from helpers import FAMILIES, logits_through


@pytest.mark.parametrize("quant", ["int8", "nf4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_spans_compute_what_the_model_computes_with_the_same_weights(family, quant, tiny_checkpoints):
    checkpoint = resolve_checkpoint(str(tiny_checkpoints[family]))
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path).eval()
    for layer in model.model.layers:
        quantize_block(layer, quant)
    spans = [load_span(checkpoint, a, b, torch.float32, quant=quant) for a, b in [(0, 3), (3, 8)]]
    assert stored_bytes(spans[0].blocks[0]) < 0.5 * block_bytes(checkpoint, 0, torch.float32)  # packed
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.allclose(logits_through(model, spans, ids), expected, atol=1e-4)
        caches = [DynamicCache() for _ in spans]  # prefill, then one token at a time against the caches
        pieces = [logits_through(model, spans, ids[:, :7], caches=caches)]
        for t in range(7, 12):
            pieces.append(logits_through(model, spans, ids[:, t:t + 1], caches=caches, start=t))
        assert torch.allclose(torch.cat(pieces, dim=1), expected, atol=1e-4)


def stored_bytes(block: torch.nn.Module) -> int:
    """Bytes the block's weights hold, packed ones counted by the tensors inside them."""
    def inner(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            return sum(inner(getattr(t, name)) for name in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    total = sum(inner(p) for p in block.parameters())
    packed = [m for module in block.modules() for m in vars(module).values() if isinstance(m, PackedExperts)]
    return total + sum(inner(e) for p in packed for e in p.experts)


@pytest.mark.parametrize("family", ["llama", "mixtral", "gpt_oss"])
def test_block_sizes_are_what_packing_stores(family, tiny_checkpoints):
    checkpoint = resolve_checkpoint(str(tiny_checkpoints[family]))
    full = block_bytes(checkpoint, 0, torch.float32)
    assert full == stored_bytes(load_span(checkpoint, 0, 1, torch.float32).blocks[0])
    for quant, share in [("int8", 0.3), ("nf4", 0.16)]:
        block = load_span(checkpoint, 0, 1, torch.float32, quant=quant).blocks[0]
        predicted = block_bytes(checkpoint, 0, torch.float32, quant)
        assert abs(predicted - stored_bytes(block)) <= 0.02 * predicted, (quant, predicted, stored_bytes(block))
        assert predicted <= share * full  # a 64-wide test model: its norms weigh more than a real model's


def test_experts_are_unpacked_one_at_a_time(tiny_checkpoints):
    checkpoint = resolve_checkpoint(str(tiny_checkpoints["mixtral"]))
    weight = load_span(checkpoint, 0, 1, torch.float32).blocks[0].mlp.experts.gate_up_proj.detach()
    packed = PackedExperts(weight, "int8")
    assert len(packed) == weight.shape[0] and packed[torch.tensor(2)].dtype == torch.float32
    error = (packed[2] - weight[2]).norm() / weight[2].norm()
    assert 0 < error < 0.01  # int8 with a scale per row


def test_an_unknown_quantisation_is_refused():
    with pytest.raises(BadRequest, match="--quant must be one of none, int8, nf4"):
        quantize_block(torch.nn.Linear(4, 4), "int4")
