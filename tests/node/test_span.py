"""A span of blocks computes exactly what the transformers model's layers compute."""
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import potluck.node.span as span_module
from potluck.node.sessions import SessionTable
from potluck.protocol.messages import OpenSession
from potluck.node.span import causal_mask, load_span
from potluck.protocol.checkpoint import resolve_checkpoint

from helpers import FAMILIES, logits_through


@pytest.mark.parametrize("family", FAMILIES)
def test_spans_match_local_model(family, tiny_checkpoints):
    checkpoint = resolve_checkpoint(str(tiny_checkpoints[family]))
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path).eval()
    spans = [load_span(checkpoint, a, b, torch.float32) for a, b in [(0, 3), (3, 6), (6, 8)]]
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.allclose(logits_through(model, spans, ids), expected, atol=1e-4)
        # prefill 7 tokens, then one token at a time, against the cache kept by each span
        caches = [DynamicCache() for _ in spans]
        pieces = [logits_through(model, spans, ids[:, :7], caches=caches)]
        for t in range(7, 12):
            pieces.append(logits_through(model, spans, ids[:, t:t + 1], caches=caches, start=t))
        assert torch.allclose(torch.cat(pieces, dim=1), expected, atol=1e-4)


def test_left_padding_matches_local_model(tiny_checkpoints):
    checkpoint = resolve_checkpoint(str(tiny_checkpoints["llama"]))
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path).eval()
    span = load_span(checkpoint, 0, 8, torch.float32)
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=positions).logits
        got = logits_through(model, [span], ids, attention_mask=mask)
    assert torch.allclose(got[0, 4:], expected[0, 4:], atol=1e-4)  # padded rows are undefined
    assert torch.allclose(got[1], expected[1], atol=1e-4)


def test_a_session_rewinds_by_writing_over_its_later_tokens(tiny_checkpoints):
    checkpoint = resolve_checkpoint(str(tiny_checkpoints["qwen2"]))
    span = load_span(checkpoint, 2, 5, torch.float32)
    hidden = torch.randn(1, 10, 64)
    positions = torch.arange(10).unsqueeze(0)
    session = SessionTable(100).open(OpenSession("s", 2, 5, 20, 1), span)
    session.step(torch.randn(1, 10, 64), positions, None, 0)  # tokens 6..9 are dropped below
    session.step(hidden[:, :6], positions[:, :6], None, 0)
    again = session.step(hidden[:, 6:], positions[:, 6:], None, 6)
    assert session.cached == 10
    assert torch.allclose(again, span(hidden, positions, None, None)[:, 6:], atol=1e-5)


def test_sliding_window_mask_limits_attention():
    mask = causal_mask(torch.zeros(1, 3, 8), prefix=5, attention_mask=None, window=4)  # [1, 1, 3, 8]
    allowed = mask[0, 0] == 0
    assert allowed[0].tolist() == [False, False, True, True, True, True, False, False]  # query at position 5
    assert allowed[2].tolist() == [False] * 4 + [True] * 4  # query at position 7
    assert causal_mask(torch.zeros(1, 1, 8), prefix=7, attention_mask=None, window=None) is None


def test_span_loads_only_its_blocks(tiny_checkpoints, monkeypatch):
    checkpoint = resolve_checkpoint(str(tiny_checkpoints["mistral"]))
    loaded = []
    real = span_module.load_tensors
    monkeypatch.setattr(span_module, "load_tensors",
                        lambda path, names, *a, **k: loaded.extend(names) or real(path, names, *a, **k))
    span = load_span(checkpoint, 2, 4, torch.float32)
    assert loaded and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in loaded)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path)
    expected = model.model.layers[3].state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in span.blocks[1].state_dict().items())


def test_loading_without_a_progress_bar_says_how_far_it_got(tiny_checkpoints, monkeypatch, caplog):
    """A node logging to a file shows no bar; a slow load (a big model, or packing it in 4 bits)
    says every PROGRESS_EVERY_S how many blocks are loaded, so it does not look hung."""
    checkpoint = resolve_checkpoint(str(tiny_checkpoints["llama"]))
    monkeypatch.setattr(span_module, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="potluck.node.span"):
        load_span(checkpoint, 2, 6, torch.float32)
    assert [r.getMessage() for r in caplog.records] == [f"loaded {n} of 4 blocks" for n in (1, 2, 3)]
    caplog.clear()
    monkeypatch.setattr(span_module, "PROGRESS_EVERY_S", 3600.0)
    with caplog.at_level("INFO", logger="potluck.node.span"):
        load_span(checkpoint, 2, 6, torch.float32)
    assert not caplog.records
