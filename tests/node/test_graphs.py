"""Fixed-shape decoding passes (what a GPU node with --cuda-graphs captures) give what each session
gives alone; here they run eagerly, as on a CPU. The capture itself is tested in tests/integration/test_cuda.py."""
import asyncio
import logging

import pytest
import torch
from transformers import DynamicCache

from potluck.node import graphs
from potluck.node.batching import StepWork, decode_together
from potluck.node.compute import ComputeLane
from potluck.node.sessions import SessionTable
from potluck.node.span import load_span
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.messages import OpenSession


@pytest.fixture
def small_buckets(monkeypatch):
    monkeypatch.setattr(graphs, "LENGTH_STEP", 8)  # passes cross bucket lengths within a few steps


def sessions_with_prompts(span, prompts, generator, start=2, end=6):
    """Open sessions on blocks start:end and run their prompts; also each one's own transformers cache."""
    table, sessions, alone = SessionTable(10_000), [], []
    for i, length in enumerate(prompts):
        session = table.open(OpenSession(f"s{i}", start, end, 64, 1), span)
        hidden, positions = torch.randn(1, length, 64, generator=generator), torch.arange(length).unsqueeze(0)
        session.step(hidden, positions, None, 0)
        alone.append(DynamicCache())
        span(hidden, positions, None, alone[-1], start, end)
        sessions.append(session)
    return table, sessions, alone


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_fixed_passes_match_each_session_alone(family, tiny_checkpoints, small_buckets):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints[family])), 2, 6, torch.float32)
    generator = torch.Generator().manual_seed(0)
    table, sessions, alone = sessions_with_prompts(span, [5, 1, 12], generator)  # 3 rows: a 4-row bucket
    bystander = table.open(OpenSession("bystander", 2, 6, 64, 1), span)
    bystander.step(torch.randn(1, 4, 64, generator=generator), torch.arange(4).unsqueeze(0), None, 0)
    pool = bystander.pool
    kept = [pool.keys[0][:, bystander.slots[0, :4]].clone(), pool.values[3][:, bystander.slots[0, :4]].clone()]
    for _ in range(6):  # the longest crosses from a 16- to a 24-token bucket
        new = [torch.randn(1, 1, 64, generator=generator) for _ in sessions]
        works = [StepWork(s, h, torch.tensor([[s.cached]]), None, s.cached) for s, h in zip(sessions, new)]
        together = decode_together(works, graphs=True)
        for session, cache, hidden, out in zip(sessions, alone, new, together):
            expected = span(hidden, torch.tensor([[session.cached - 1]]), None, cache, 2, 6)
            assert torch.allclose(out, expected, atol=1e-5, rtol=0), (out - expected).abs().max()
            assert session.cached == cache.get_seq_length(layer_idx=2)
            for index in range(2, 6):
                keys = pool.keys[index - span.start][:, session.slots[0, :session.cached]]
                assert torch.allclose(keys, cache.layers[index].keys[0], atol=1e-5)
    assert set(pool.fixed.buckets) == {(2, 6, 4, 16), (2, 6, 4, 24)}
    assert torch.equal(pool.keys[0][:, bystander.slots[0, :4]], kept[0])  # filler rows wrote only scratch
    assert torch.equal(pool.values[3][:, bystander.slots[0, :4]], kept[1])
    assert all(not t[:, pool.pad].any() for t in pool.keys + pool.values)  # padding still reads zeros


def test_a_lone_session_and_a_rewound_one_in_fixed_passes(tiny_checkpoints, small_buckets):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 8, torch.float32)
    generator = torch.Generator().manual_seed(1)
    _, (first, second), (alone, _) = sessions_with_prompts(span, [6, 6], generator, 0, 8)
    h = torch.randn(1, 1, 64, generator=generator)
    out = decode_together([StepWork(first, h, torch.tensor([[6]]), None, 6)], graphs=True)[0]  # a 1-row bucket
    assert torch.allclose(out, span(h, torch.tensor([[6]]), None, alone), atol=1e-5, rtol=0)
    solo = DynamicCache()
    prompt = torch.randn(1, 3, 64, generator=generator)
    span(prompt, torch.arange(3).unsqueeze(0), None, solo)
    second.step(prompt, torch.arange(3).unsqueeze(0), None, 0)  # rewound to 0 and 3 tokens again
    second.cached = 6  # as if it had gone on: the next step rewinds to 3
    works = [StepWork(first, h, torch.tensor([[7]]), None, 7), StepWork(second, h, torch.tensor([[3]]), None, 3)]
    out = decode_together(works, graphs=True)[1]
    assert second.cached == 4 and torch.allclose(out, span(h, torch.tensor([[3]]), None, solo), atol=1e-5, rtol=0)
    assert set(first.pool.fixed.buckets) == {(0, 8, 1, 8), (0, 8, 2, 8)}


def test_a_pool_keeps_the_most_recent_buckets(tiny_checkpoints, small_buckets, monkeypatch):
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 4, torch.float32)
    _, sessions, _ = sessions_with_prompts(span, [2, 3, 4], torch.Generator().manual_seed(2), 0, 4)
    for rows in (1, 2, 3, 1):
        decode_together([StepWork(s, torch.randn(1, 1, 64), torch.tensor([[s.cached]]), None, s.cached)
                         for s in sessions[:rows]], graphs=True)
    assert list(sessions[0].pool.fixed.buckets) == [(0, 4, 4, 8), (0, 4, 1, 8)]


def capturing_fails(monkeypatch, error: Exception) -> None:
    """Passes are captured as on a GPU, and recording one raises ``error``."""
    def capture(bucket, memory):
        raise error

    monkeypatch.setattr(graphs.Bucket, "capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


def test_a_pass_that_cannot_be_captured_runs_the_usual_way(tiny_checkpoints, monkeypatch, caplog):
    capturing_fails(monkeypatch, RuntimeError("operation not permitted when stream is capturing"))
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 4, torch.float32)
    generator = torch.Generator().manual_seed(3)
    _, sessions, alone = sessions_with_prompts(span, [3, 5], generator, 0, 4)
    sessions[0].pool.fixed = graphs.FixedPasses(sessions[0].pool, capture=True)  # as on a GPU
    for _ in range(2):
        new = [torch.randn(1, 1, 64, generator=generator) for _ in sessions]
        works = [StepWork(s, h, torch.tensor([[s.cached]]), None, s.cached) for s, h in zip(sessions, new)]
        with caplog.at_level(logging.WARNING, logger="potluck.node.graphs"):
            together = decode_together(works, graphs=True)
        for session, cache, hidden, out in zip(sessions, alone, new, together):
            expected = span(hidden, torch.tensor([[session.cached - 1]]), None, cache, 0, 4)
            assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    assert not sessions[0].pool.fixed.usable and not sessions[0].pool.fixed.buckets
    assert [r.message for r in caplog.records].count(
        "decoding passes of blocks 0:4 run without CUDA graphs: capturing one failed "
        "(RuntimeError: operation not permitted when stream is capturing)") == 1


def test_the_compute_lane_runs_fixed_passes_when_asked(tiny_checkpoints, small_buckets):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 4, torch.float32)
    generator = torch.Generator().manual_seed(4)
    _, sessions, alone = sessions_with_prompts(span, [4, 9], generator, 0, 4)
    lane = ComputeLane(cuda_graphs=True)

    async def steps(hiddens):
        lone = await lane.step(sessions[0], hiddens[0], torch.tensor([[4]]), None, 4, alone=True)
        both = await asyncio.gather(*(lane.step(s, h, torch.tensor([[s.cached]]), None, s.cached)
                                      for s, h in zip(sessions, hiddens)))
        return lone, both

    hiddens = [torch.randn(1, 1, 64, generator=generator) for _ in sessions]
    try:
        lone, both = asyncio.run(steps(hiddens))
    finally:
        lane.shutdown()
    assert torch.allclose(lone, span(hiddens[0], torch.tensor([[4]]), None, alone[0], 0, 4), atol=1e-5, rtol=0)
    assert torch.allclose(both[1], span(hiddens[1], torch.tensor([[9]]), None, alone[1], 0, 4), atol=1e-5, rtol=0)
    assert set(sessions[0].pool.fixed.buckets) == {(0, 4, 1, 8), (0, 4, 2, 16)}
    # the lone step counts as a batch of one (operators read rows / batches as the mean batch size)
    assert (lane.counters["decode_batches"], lane.counters["decode_rows"]) == (2, 3)


def test_a_mixture_of_experts_is_not_captured(tiny_checkpoints, monkeypatch, caplog):
    capturing_fails(monkeypatch, AssertionError("a mixture of experts must not be captured"))
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["mixtral"])), 0, 4, torch.float32)
    _, (session,), _ = sessions_with_prompts(span, [3], torch.Generator().manual_seed(5), 0, 4)
    with caplog.at_level(logging.WARNING, logger="potluck.node.graphs"):
        assert graphs.decode_fixed([StepWork(session, torch.randn(1, 1, 64), torch.tensor([[3]]), None, 3)],
                                   capture=True) is None
    assert not session.pool.fixed.usable and "a mixture of experts" in caplog.text
