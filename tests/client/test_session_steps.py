"""InferenceSession step by step against a local span, over in-memory streams (tests/memory_swarm.py)."""
import logging
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

from memory_swarm import MemorySwarm
from potluck.client.swarm_view import FailoverPolicy
from potluck.client.session import InferenceSession
from potluck.node.span import load_span
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.errors import BadRequest, NodeDraining
from potluck.protocol.records import NodeState


@pytest.fixture
def swarm(tiny_checkpoints):
    swarm = MemorySwarm()
    swarm.add_node("a", tiny_checkpoints["llama"], 0, 4)
    swarm.add_node("b", tiny_checkpoints["llama"], 4, 8)
    yield swarm
    swarm.close()


def local_steps(checkpoint_path, steps):
    """What the whole model's blocks give for each step, with one cache."""
    span, cache = load_span(resolve_checkpoint(str(checkpoint_path)), 0, 8, torch.float32), DynamicCache()
    return [span(hidden, positions, None, cache) for hidden, positions in steps]


@pytest.mark.parametrize("handoff", [False, True])
def test_a_failed_step_leaves_the_session_in_step(swarm, tiny_checkpoints, handoff):
    """A step that fails after the first hop appended its tokens: the next step must not append on
    top of them (the session re-sends from its position, and every node rewinds there)."""
    hidden = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(0))
    steps = [(hidden[:, :5], torch.arange(5).unsqueeze(0)), (hidden[:, 5:6], torch.tensor([[5]])),
             (hidden[:, 6:7], torch.tensor([[6]]))]
    expected = local_steps(tiny_checkpoints["llama"], steps)
    first, second = (swarm.servicers[p] for p, r in sorted(swarm.records.items(), key=lambda item: item[1].start))
    first_step, second_step, asked_first, asked_second = first._step, second._step, [], []

    def recording(session, request, tensors):
        asked_first.append(request.start_from)
        return first_step(session, request, tensors)

    def fail_the_second_step(session, request, tensors):  # the first decoding step, on the second hop
        asked_second.append(request.start_from)
        if len(asked_second) == 2:
            raise BadRequest("injected after the first hop")  # not retriable: the step fails
        return second_step(session, request, tensors)

    first._step, second._step = recording, fail_the_second_step
    view = swarm.view(8, FailoverPolicy(request_timeout=2.0, backoff=0.0), handoff=handoff)
    with InferenceSession(view, max_length=16) as session:
        assert torch.allclose(session.step(*steps[0]), expected[0], atol=1e-5)
        with pytest.raises(BadRequest, match="injected"):
            session.step(*steps[1])
        assert session.position == 5
        got = [session.step(*steps[1]), session.step(*steps[2])]
    assert torch.allclose(got[0], expected[1], atol=1e-5) and torch.allclose(got[1], expected[2], atol=1e-5)
    assert asked_first == [None, None, 5, None]  # after the failure: rewind to 5, where the session stands
    assert len(asked_second) == 4


@pytest.mark.parametrize("handoff", [False, True])
def test_a_step_longer_than_a_node_takes_in_one_message_goes_in_parts(tiny_checkpoints, handoff):
    swarm = MemorySwarm()
    swarm.add_node("a", tiny_checkpoints["llama"], 0, 4)
    small = swarm.servicers[swarm.add_node("b", tiny_checkpoints["llama"], 4, 8, max_batch_tokens=3)]
    served, step = [], small._step

    def recording(session, request, frame):
        served.append((frame.tensors[0].shape[1], request.start_from))
        return step(session, request, frame)

    small._step = recording
    hidden = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(2))
    steps = [(hidden[:, :8], torch.arange(8).unsqueeze(0)), (hidden[:, 8:9], torch.tensor([[8]]))]
    expected = local_steps(tiny_checkpoints["llama"], steps)
    try:
        with InferenceSession(swarm.view(8, handoff=handoff), max_length=16) as session:
            got = [session.step(*steps[0]), session.step(*steps[1])]
            assert session.position == 9
    finally:
        swarm.close()
    assert [tokens for tokens, _ in served] == [3, 3, 2, 1], served
    assert [start for _, start in served] == ([0, 3, 6, 8] if handoff else [None] * 4), served  # pushes say where
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))


@pytest.mark.parametrize("handoff", [False, True])
def test_a_dead_node_is_replaced_and_its_cache_replayed(swarm, tiny_checkpoints, handoff):
    replica = swarm.add_node("c", tiny_checkpoints["llama"], 4, 8, speed=1.0)  # slower: routed only as a spare
    hidden = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(1))
    steps = [(hidden[:, :6], torch.arange(6).unsqueeze(0))] + [
        (hidden[:, t:t + 1], torch.tensor([[t]])) for t in range(6, 9)]
    expected = local_steps(tiny_checkpoints["llama"], steps)
    view = swarm.view(8, handoff=handoff)
    with InferenceSession(view, max_length=16) as session:
        got = [session.step(*steps[0]), session.step(*steps[1])]
        dead = session.hops[1].peer_id
        swarm.kill(dead)
        got += [session.step(*steps[2]), session.step(*steps[3])]
        assert session.failovers == 1 and session.hops[1].peer_id == replica and dead in view.banned
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))


def test_a_node_that_leaves_a_session_s_blocks_is_not_banned(swarm, tiny_checkpoints, caplog):
    # as a self-placing node that moves (or one that stops) tells the sessions still on its old blocks
    caplog.set_level(logging.INFO, logger="potluck.client.failover")
    replica = swarm.add_node("c", tiny_checkpoints["llama"], 4, 8, speed=1.0)  # slower: routed only as a spare
    hidden = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(4))
    steps = [(hidden[:, :6], torch.arange(6).unsqueeze(0))] + [
        (hidden[:, t:t + 1], torch.tensor([[t]])) for t in range(6, 8)]
    expected = local_steps(tiny_checkpoints["llama"], steps)
    view = swarm.view(8)

    async def refresh():  # the DHT: what the nodes announce now
        view.records = dict(swarm.records)

    view.refresh = refresh
    with InferenceSession(view, max_length=16) as session:
        got = [session.step(*steps[0])]
        mover = session.hops[1].peer_id
        swarm.records[mover] = replace(swarm.records[mover], state=NodeState.DRAINING)
        servicer = swarm.servicers[mover]
        swarm.call(servicer.evict(NodeDraining(f"node {mover} moved off blocks 4:8"), span=servicer.span))
        got += [session.step(*steps[1]), session.step(*steps[2])]
        assert session.failovers == 1 and session.hops[1].peer_id == replica
        assert mover not in view.banned  # it did not fail: it is there for its new blocks
    assert f"node {mover}: node {mover} moved off blocks 4:8" in caplog.text
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))


def test_after_the_first_node_is_replaced_the_next_takes_its_replacement_s_pushes(swarm, tiny_checkpoints):
    spare = swarm.add_node("d", tiny_checkpoints["llama"], 0, 4, speed=1.0)  # slower: routed only as a spare
    hidden = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(2))
    steps = [(hidden[:, :6], torch.arange(6).unsqueeze(0))] + [
        (hidden[:, t:t + 1], torch.tensor([[t]])) for t in range(6, 9)]
    expected = local_steps(tiny_checkpoints["llama"], steps)
    view = swarm.view(8, handoff=True)
    with InferenceSession(view, max_length=16) as session:
        got = [session.step(*steps[0]), session.step(*steps[1])]
        swarm.kill(session.hops[0].peer_id)
        got.append(session.step(*steps[2]))  # fails over hop by hop, then tells the second node to follow
        assert session.hops[0].peer_id == spare and session.handoff_fallbacks == 1
        got.append(session.step(*steps[3]))  # handed off again: the second node takes the spare's push
        assert session.handoff_fallbacks == 1
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))


def test_a_first_token_far_above_the_rest_is_not_the_usual_scale(swarm, caplog):
    """The session's first token is an attention sink in real models (SmolLM2's output RMS 226, the
    others 22 to 70): taken as the usual scale, it made the next step look suspicious."""
    hidden = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(3))
    sink = hidden[:, :1] * 100  # its output keeps the scale of its residual stream
    with caplog.at_level(logging.INFO, logger="potluck.client.session"):
        with InferenceSession(swarm.view(8), max_length=16) as session:
            first = session.step(sink, torch.tensor([[0]]))
            assert session.usual_scale is None  # the first token alone notes nothing
            second = session.step(hidden[:, 1:2], torch.tensor([[1]]))
            assert first.norm() > 20 * second.norm()
            session.step(hidden[:, 2:3], torch.tensor([[2]]))
    assert "suspicious" not in caplog.text


def test_a_forward_longer_than_a_node_takes_in_one_message_goes_in_parts(tiny_checkpoints):
    """A cache-less forward (``model(ids)``) past a node's --max-batch-tokens: rows in messages of
    their own while a row fits; a longer row through a short-lived session, a part at a time."""
    swarm = MemorySwarm()
    swarm.add_node("a", tiny_checkpoints["llama"], 0, 4)
    small = swarm.servicers[swarm.add_node("b", tiny_checkpoints["llama"], 4, 8, max_batch_tokens=8)]
    seen = []
    for name in ("_single_request", "_step"):
        original = getattr(small, name)

        def recording(*args, _original=original, _name=name):
            seen.append(_name)
            return _original(*args)
        setattr(small, name, recording)
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 8, torch.float32)
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(3, 5, 64, generator=generator)  # 15 tokens: one row (5) a message
    long = torch.randn(2, 10, 64, generator=generator)  # a row of 10: parts of 4 tokens of both rows
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # the second row left-padded
    view = swarm.view(8)
    try:
        got_rows = view.forward(rows, torch.arange(5).expand(3, 5), None)
        forwards = seen.count("_single_request")
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        got_long = view.forward(long, positions, mask)
    finally:
        swarm.close()
    assert forwards == 3 and seen.count("_step") == 3  # 3 parts of 4, 4 and 2 tokens
    assert torch.allclose(got_rows, span(rows, torch.arange(5).expand(3, 5)), atol=1e-5)
    expected = span(long, positions, mask)
    assert torch.allclose(got_long[0], expected[0], atol=1e-5)
    assert torch.allclose(got_long[1, 3:], expected[1, 3:], atol=1e-5)  # the padding's outputs mean nothing
