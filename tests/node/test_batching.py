"""Decoding steps (and short prompts) of sessions with different cache lengths, run as one batch, give what
each gives alone."""
import asyncio

import pytest
import torch
from transformers import DynamicCache

from potluck.node.batching import ForwardWork, StepWork, decode_together, forward_together, prefill_together
from potluck.node.compute import ComputeLane
from potluck.node.sessions import SessionTable
from potluck.node.span import load_span
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.errors import UnknownSession
from potluck.protocol.messages import OpenSession


def cached_keys(session, index):
    """[kv heads, tokens, head dim] the pool holds for the session's block ``index``."""
    return session.pool.keys[index - session.span.start][:, session.slots[0, :session.cached]]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_a_decoding_batch_matches_each_session_alone(family, tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints[family])), 2, 6, torch.float32)
    table, generator = SessionTable(10_000), torch.Generator().manual_seed(0)
    sessions, alone = [], []  # alone: each session's own transformers cache, run on its own
    for i, prompt in enumerate([5, 1, 12, 3]):  # different cache lengths
        session = table.open(OpenSession(f"s{i}", 2, 6, 64, 1), span)
        hidden, positions = torch.randn(1, prompt, 64, generator=generator), torch.arange(prompt).unsqueeze(0)
        session.step(hidden, positions, None, 0)
        alone.append(DynamicCache())
        span(hidden, positions, None, alone[-1])
        sessions.append(session)
    for _ in range(3):  # three rounds: each reads the sessions' grown caches
        new = [torch.randn(1, 1, 64, generator=generator) for _ in sessions]
        works = [StepWork(s, h, torch.tensor([[s.cached]]), None, s.cached) for s, h in zip(sessions, new)]
        together = decode_together(works)
        for session, cache, h, out in zip(sessions, alone, new, together):
            expected = span(h, torch.tensor([[session.cached - 1]]), None, cache)
            assert torch.allclose(out, expected, atol=1e-5, rtol=0), (out - expected).abs().max()
            assert session.cached == cache.get_seq_length(layer_idx=2)
            for index in range(2, 6):
                assert torch.allclose(cached_keys(session, index), cache.layers[index].keys[0],
                                      atol=1e-5)



@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_prompts_of_different_lengths_run_together_give_what_each_gives_alone(family, tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints[family])), 2, 6, torch.float32)
    table, generator = SessionTable(10_000), torch.Generator().manual_seed(0)
    bystander = table.open(OpenSession("by", 2, 6, 64, 1), span)
    bystander.step(torch.randn(1, 9, 64, generator=generator), torch.arange(9).unsqueeze(0), None, 0)
    held = [bystander.pool.keys[b][:, bystander.slots[0, :9]].clone() for b in range(4)]
    # (earlier tokens, where this step starts, new tokens, max_length): fresh prompts; a later turn on a
    # cache; a session of 4 slots, fewer than the longest prompt (its padding must not write past them);
    # a session that rewinds from 6 tokens to 2
    shapes = [(0, 0, 5, 64), (0, 0, 2, 64), (4, 4, 7, 64), (0, 0, 3, 4), (6, 2, 3, 64)]
    works, alone, inputs = [], [], []
    for i, (earlier, start, new, max_length) in enumerate(shapes):
        session = table.open(OpenSession(f"s{i}", 2, 6, max_length, 1), span)
        history = torch.randn(1, earlier, 64, generator=generator)
        if earlier:
            session.step(history, torch.arange(earlier).unsqueeze(0), None, 0)
        cache = DynamicCache()
        if start:
            span(history[:, :start], torch.arange(start).unsqueeze(0), None, cache)
        hidden, positions = torch.randn(1, new, 64, generator=generator), torch.arange(start, start + new).unsqueeze(0)
        works.append(StepWork(session, hidden, positions, None, start))
        alone.append(cache)
        inputs.append((hidden, positions))
    together = prefill_together(works)
    for work, cache, (hidden, positions), out in zip(works, alone, inputs, together):
        expected = span(hidden, positions, None, cache)
        assert out.shape == hidden.shape
        assert torch.allclose(out, expected, atol=1e-5, rtol=0), (out - expected).abs().max()
        assert work.result() is out and work.session.cached == cache.get_seq_length(layer_idx=2)
        for index in range(2, 6):
            assert torch.allclose(cached_keys(work.session, index), cache.layers[index].keys[0], atol=1e-5)
    for b in range(4):  # nobody else's slots written, and the padding slot still zeros
        assert torch.equal(bystander.pool.keys[b][:, bystander.slots[0, :9]], held[b])
        assert not bystander.pool.keys[b][:, bystander.pool.pad].any()


def test_a_session_that_rewinds_joins_the_batch_from_its_new_start(tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 4, torch.float32)
    table = SessionTable(10_000)
    first, second = (table.open(OpenSession(name, 0, 4, 64, 1), span) for name in "ab")
    prompt = torch.randn(1, 6, 64)
    for session in (first, second):
        session.step(prompt, torch.arange(6).unsqueeze(0), None, 0)
    solo = DynamicCache()
    span(prompt[:, :3], torch.arange(3).unsqueeze(0), None, solo)
    h = torch.randn(1, 1, 64)
    out = decode_together([StepWork(first, h, torch.tensor([[3]]), None, 3),
                           StepWork(second, torch.randn(1, 1, 64), torch.tensor([[6]]), None, 6)])[0]
    assert first.cached == 4 and second.cached == 7
    assert torch.allclose(out, span(h, torch.tensor([[3]]), None, solo), atol=1e-5, rtol=0)


def test_a_step_of_a_session_closed_while_it_waited_does_not_run(tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 4, torch.float32)
    table = SessionTable(128)
    gone, kept = (table.open(OpenSession(name, 0, 4, 64, 1), span) for name in ("gone", "kept"))
    for session in (gone, kept):
        session.step(torch.randn(1, 3, 64), torch.arange(3).unsqueeze(0), None, 0)
    works = [StepWork(s, torch.randn(1, 1, 64), torch.tensor([[3]]), None, 3) for s in (gone, kept)]
    table.close("gone")
    newcomer = table.open(OpenSession("new", 0, 4, 64, 1), span)  # may hold gone's slots now
    newcomer.step(torch.randn(1, 5, 64), torch.arange(5).unsqueeze(0), None, 0)
    keys = newcomer.pool.keys[0][:, newcomer.slots[0, :5]].clone()
    decode_together(works)
    with pytest.raises(UnknownSession):
        works[0].result()
    assert works[1].result().shape == (1, 1, 64) and kept.cached == 4
    assert torch.equal(newcomer.pool.keys[0][:, newcomer.slots[0, :5]], keys)  # nothing written over its cache


def test_forwards_run_together_give_what_each_gives_alone(tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 8, torch.float32)
    generator = torch.Generator().manual_seed(1)
    padded = torch.tensor([[0, 0, 1, 1, 1]])  # left padding: its first two tokens are not attended to
    works = [ForwardWork(span, torch.randn(rows, 5, 64, generator=generator),
                         torch.arange(5).repeat(rows, 1), mask, 2, 6)
             for rows, mask in [(1, None), (2, None), (1, padded)]]
    together = forward_together(works)
    for work, out in zip(works, together):
        alone = span(work.hidden, work.positions, work.mask, None, 2, 6)
        assert out.shape == alone.shape and work.result() is out
        real = slice(None) if work.mask is None else slice(2, None)  # a padded row's padding is not compared
        assert torch.allclose(out[:, real], alone[:, real], atol=1e-5, rtol=0), (out - alone).abs().max()


def test_prompts_arriving_together_at_the_compute_lane_run_as_one_pass(tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 4, torch.float32)
    table, generator = SessionTable(10_000), torch.Generator().manual_seed(3)
    sessions = [table.open(OpenSession(f"s{i}", 0, 4, 32, rows), span) for i, rows in enumerate([1, 1, 1, 1, 2])]
    hiddens = [torch.randn(rows, 3 + i, 64, generator=generator) for i, rows in enumerate([1, 1, 1, 1, 2])]
    masks = [None, None, torch.ones(1, 5, dtype=torch.long), None, None]  # a padding mask: it runs on its own
    lane = ComputeLane()

    async def prompts():
        return await asyncio.gather(*(lane.step(s, h, torch.arange(h.shape[1]).expand(h.shape[0], -1), m, 0)
                                      for s, h, m in zip(sessions, hiddens, masks)))

    try:
        outs = asyncio.run(prompts())
    finally:
        lane.shutdown()
    for hidden, mask, out in zip(hiddens, masks, outs):
        positions = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
        assert torch.allclose(out, span(hidden, positions, mask, DynamicCache()), atol=1e-5, rtol=0)
    assert lane.counters["prefills_together"] == 3 and lane.counters["prefill_chunks"] == 3  # 0, 1, 3; then 2; 4


def test_a_rope_scaled_by_length_takes_each_rows_own_scale_and_its_whole_steps(phi3_longrope):
    span = load_span(resolve_checkpoint(str(phi3_longrope)), 0, 4, torch.float32)
    assert span.rope_by_length
    table, generator = SessionTable(10_000), torch.Generator().manual_seed(0)
    prompts = [5, 40]  # one session short of the switch, one past it
    sessions, alone, steps = [], [], []
    for i, length in enumerate(prompts):
        session = table.open(OpenSession(f"s{i}", 0, 4, 64, 1), span)
        hidden, positions = torch.randn(1, length, 64, generator=generator), torch.arange(length).unsqueeze(0)
        steps.append(StepWork(session, hidden, positions, None, 0))
        alone.append(DynamicCache())
        span(hidden, positions, None, alone[-1])  # the whole prompt in one call, as transformers runs it
        sessions.append(session)
    for work in steps:  # the long prompt in chunks of 8, as a node splits a long prefill
        length = work.hidden.shape[1]
        outputs = [work.chunk(begin, min(begin + 8, length)) for begin in range(0, length, 8)]
        expected = span(work.hidden, work.positions, None, DynamicCache())
        assert torch.allclose(torch.cat(outputs, 1), expected, atol=1e-5)
        work.session.cached = work.hidden.shape[1]
    new = [torch.randn(1, 1, 64, generator=generator) for _ in sessions]
    together = decode_together([StepWork(s, h, torch.tensor([[s.cached]]), None, s.cached)
                                for s, h in zip(sessions, new)])
    for session, cache, h, out in zip(sessions, alone, new, together):
        expected = span(h, torch.tensor([[session.cached - 1]]), None, cache)
        assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()  # the short one: short factors
