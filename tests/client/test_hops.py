"""Hop streams: answers matched to attempts, broken streams noticed, hung nodes timed out."""
import asyncio

import pytest
import torch

from memory_swarm import peer_id, stream_pair
from potluck.client.channels import NodeChannel
from potluck.client.hops import HopSession, HopStreams, StepInputs, cut, joined
from potluck.client.routing import Hop
from potluck.client.swarm_view import FailoverPolicy, SwarmView, expect_hidden
from potluck.protocol import messages as msg
from potluck.protocol.bundles import bundled, unbundle
from potluck.protocol.errors import NodeUnavailable
from potluck.protocol.records import NodeRecord, NodeState
from potluck.protocol.replies import Result


def hop_with_node(streams: HopStreams, name: str):
    """A hop whose far end the test plays by hand: returns (hop session, node reader, node writer)."""
    (reader, writer), (node_reader, node_writer) = stream_pair()
    record = NodeRecord(model="m", start=0, end=4, state=NodeState.ONLINE, public_name=name)
    channel = NodeChannel(peer_id(name), reader, writer)
    hop_session = streams.listen(HopSession(Hop(peer_id(name), 0, 4, record), "s", channel))
    return hop_session, node_reader, node_writer


def inputs(tokens=1):
    return StepInputs(torch.zeros(1, tokens, 4), torch.arange(tokens).unsqueeze(0), None)


def streams():
    return HopStreams(SwarmView(None, "m", 4, FailoverPolicy(request_timeout=0.3, slack=0.0)))


def test_a_late_answer_to_an_abandoned_attempt_is_dropped():
    async def exchange():
        hops = streams()
        hop_session, node_reader, node_writer = hop_with_node(hops, "a")
        first = asyncio.ensure_future(hops.step(hop_session, inputs(), None))
        await asyncio.sleep(0.35)  # the node is slow: the client gives up on attempt 1
        with pytest.raises(NodeUnavailable, match="did not answer in time"):
            await first
        redo = asyncio.ensure_future(hops.step(hop_session, inputs(), 0))
        frames = [await msg.read_frame(node_reader) for _ in range(2)]
        assert [f.meta["seq"] for f in frames] == [1, 2] and frames[1].meta["start_from"] == 0
        await msg.write_frame(node_writer, Result(1, 1, "s").to_meta(), [torch.full((1, 1, 4), 1.0)])  # too late
        await msg.write_frame(node_writer, Result(1, 2, "s").to_meta(), [torch.full((1, 1, 4), 2.0)])
        return await redo

    assert torch.equal(asyncio.run(exchange()), torch.full((1, 1, 4), 2.0))


def test_a_stream_that_breaks_while_waiting_elsewhere_fails_its_hop():
    async def exchange():
        hops = streams()
        a, _, _ = hop_with_node(hops, "a")
        b, _, b_writer = hop_with_node(hops, "b")
        b_writer.close()  # node b dies while the client waits on a
        with pytest.raises(NodeUnavailable):
            await hops.receive(a, asyncio.get_running_loop().time() + 0.2, [a])
        assert b.failed is not None and b.failed.peer_id == peer_id("b")
        assert str(b.failed).count("failed") == 1, b.failed  # was "node X (...) failed: node X failed: ..."
        with pytest.raises(NodeUnavailable) as caught:
            await hops.send(b, msg.Step("s", None), inputs())
        return caught.value

    assert asyncio.run(exchange()).peer_id == peer_id("b")


def test_histories_join_and_cut_at_token_boundaries():
    history = [inputs(3), inputs(2)]
    assert joined(history).hidden.shape == (1, 5, 4)
    assert [s.hidden.shape[1] for s in cut(history, 4)] == [3, 1]


def test_an_answer_with_nan_or_of_the_wrong_dtype_fails_its_node():
    record = NodeRecord(model="m", start=0, end=4, state=NodeState.ONLINE)
    hop = Hop(peer_id("a"), 0, 4, record)
    good = torch.zeros(1, 1, 4)
    assert torch.equal(expect_hidden(msg.Frame(Result(1, 1, "s").to_meta(), (good,)), hop, good.shape), good)
    for bad in (torch.full((1, 1, 4), float("nan")), torch.full((1, 1, 4), float("inf")),
                torch.zeros(1, 1, 4, dtype=torch.int64)):
        with pytest.raises(NodeUnavailable) as caught:
            expect_hidden(msg.Frame(Result(1, 1, "s").to_meta(), (bad,)), hop, good.shape)
        assert caught.value.peer_id == peer_id("a")
    answers = [(Result(1, 1, name).to_meta(), [torch.zeros(1, 1, 4)]) for name in "abc"]
    answers[1][1][0][0, 0, 2] = float("nan")  # in a bundle (checked once for all its parts), one bad answer
    ((meta, tensors),) = bundled(answers)
    parts = unbundle(msg.decode_payload(msg.encode_frame(meta, tensors)[msg.HEADER_BYTES:]))
    assert expect_hidden(parts[0], hop, good.shape).shape == good.shape
    with pytest.raises(NodeUnavailable, match="NaN"):
        expect_hidden(parts[1], hop, good.shape)
