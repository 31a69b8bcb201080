"""The CPU's lm_head in oneDNN's packed layout: the same products as ``nn.Linear``, used only
where it can run, and put in place by the client's local part."""
import json
import shutil

import pytest
import torch

from potluck.client import packed_head as packing
from potluck.client.model import build_local_part
from potluck.client.packed_head import PackedHead, packed_head
from potluck.client.swarm_view import SwarmView
from potluck.protocol.checkpoint import resolve_checkpoint


def linear(bias: bool, dtype=torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(48, 300, bias=bias).to(dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_head_gives_the_linears_logits(bias):
    head = linear(bias)
    packed = packed_head(head)
    assert isinstance(packed, PackedHead) and packed.weight is head.weight and packed.bias is head.bias
    with torch.no_grad():
        for hidden in (torch.randn(1, 48), torch.randn(32, 48), torch.randn(3, 7, 48)[:, -1:, :]):  # the last a view
            expected, got = head(hidden), packed(hidden)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_a_head_that_cannot_be_packed_stays_as_it_is(monkeypatch):
    half = linear(False, torch.bfloat16)
    assert packed_head(half) is half  # only float32 is packed
    with torch.device("meta"):
        elsewhere = torch.nn.Linear(48, 300)
    assert packed_head(elsewhere) is elsewhere  # a GPU's head (here: not on the CPU) is left to its device
    other = torch.nn.Sequential(linear(False))
    assert packed_head(other) is other
    monkeypatch.setattr(packing, "MEMORY_SHARE", 1e-9)  # a copy that would not fit in the free RAM
    head = linear(False)
    assert packed_head(head) is head


def test_a_packed_head_follows_its_weight_when_it_changes():
    head = linear(True)
    packed = packed_head(head)
    hidden = torch.randn(5, 48)
    with torch.no_grad():
        head.weight.mul_(-2.0)  # in place, as load_state_dict or a tied embedding's edit would
        torch.testing.assert_close(packed(hidden), head(hidden), rtol=0, atol=1e-5)
        packed.to(torch.float64)  # a weight it cannot pack: computed as it is
        assert torch.equal(packed(hidden.double()), torch.nn.functional.linear(hidden.double(), packed.weight,
                                                                               packed.bias))
        assert packed.packed is None


@pytest.mark.parametrize("tied", [False, True])
def test_the_local_part_packs_its_lm_head_and_keeps_a_tied_weight_shared(tiny_checkpoints, tmp_path, tied):
    folder = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tied}))
    checkpoint = resolve_checkpoint(str(folder))
    view = SwarmView(swarm=None, model=checkpoint.name, num_blocks=checkpoint.num_blocks)
    model = build_local_part(checkpoint, view, torch.float32, torch.device("cpu"))
    assert isinstance(model.lm_head, PackedHead)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert "lm_head.packed" not in model.state_dict()
    hidden = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(hidden), hidden @ model.lm_head.weight.t(), rtol=0, atol=1e-5)
