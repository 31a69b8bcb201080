"""Decoding steps of sessions with different cache lengths, run as one batch, give what each gives alone."""
import copy

import pytest
import torch

from potluck.node.batching import StepWork, decode_together
from potluck.node.sessions import SessionTable
from potluck.node.span import load_span
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.messages import OpenSession


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_a_decoding_batch_matches_each_session_alone(family, tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints[family])), 2, 6, torch.float32)
    table, generator = SessionTable(10_000), torch.Generator().manual_seed(0)
    sessions, alone = [], []
    for i, prompt in enumerate([5, 1, 12, 3]):  # different cache lengths
        session = table.open(OpenSession(f"s{i}", 2, 6, 64, 1), span)
        session.step(torch.randn(1, prompt, 64, generator=generator), torch.arange(prompt).unsqueeze(0), None, 0)
        sessions.append(session)
        alone.append(copy.deepcopy(session))
    for _ in range(3):  # three rounds: the batch cache is rebuilt from each session's grown cache
        new = [torch.randn(1, 1, 64, generator=generator) for _ in sessions]
        works = [StepWork(s, h, torch.tensor([[s.cached]]), None, s.cached) for s, h in zip(sessions, new)]
        together = decode_together(works)
        for session, solo, h, out in zip(sessions, alone, new, together):
            expected = solo.step(h, torch.tensor([[solo.cached]]), None, solo.cached)
            assert torch.allclose(out, expected, atol=1e-5, rtol=0), (out - expected).abs().max()
            assert session.cached == solo.cached
            for index in range(2, 6):
                assert torch.allclose(session.cache.layers[index].keys, solo.cache.layers[index].keys, atol=1e-5)


def test_a_session_that_rewinds_joins_the_batch_from_its_new_start(tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 4, torch.float32)
    table = SessionTable(10_000)
    first, second = (table.open(OpenSession(name, 0, 4, 64, 1), span) for name in "ab")
    for session in (first, second):
        session.step(torch.randn(1, 6, 64), torch.arange(6).unsqueeze(0), None, 0)
    solo = copy.deepcopy(first)
    h = torch.randn(1, 1, 64)
    out = decode_together([StepWork(first, h, torch.tensor([[3]]), None, 3),
                           StepWork(second, torch.randn(1, 1, 64), torch.tensor([[6]]), None, 6)])[0]
    assert first.cached == 4 and second.cached == 7
    assert torch.allclose(out, solo.step(h, torch.tensor([[3]]), None, 3), atol=1e-5, rtol=0)
