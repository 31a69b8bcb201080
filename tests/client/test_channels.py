"""Sessions sharing one stream to a node: their steps leave in one bundle, answers reach the session they name."""
import asyncio

import pytest
import torch

from memory_swarm import peer_id, stream_pair
from potluck.client.channels import NodeChannel
from potluck.client.hops import HopSession, HopStreams, StepInputs
from potluck.client.routing import Hop
from potluck.client.swarm_view import FailoverPolicy, SwarmView
from potluck.protocol import messages as msg
from potluck.protocol.bundles import FrameBatcher, unbundle
from potluck.protocol.errors import NodeUnavailable
from potluck.protocol.records import NodeRecord, NodeState
from potluck.protocol.replies import Result


def hop(streams: HopStreams, channel: NodeChannel, session_id: str) -> HopSession:
    record = NodeRecord(model="m", start=0, end=4, state=NodeState.ONLINE, public_name="a")
    return streams.listen(HopSession(Hop(peer_id("a"), 0, 4, record), session_id, channel))


def streams() -> HopStreams:
    return HopStreams(SwarmView(None, "m", 4, FailoverPolicy(request_timeout=1.0, slack=0.0)))


def one_token(value: float) -> StepInputs:
    return StepInputs(torch.full((1, 1, 4), float(value)), torch.zeros(1, 1, dtype=torch.int64), None)


def test_two_sessions_share_a_bundle_each_way():
    async def exchange():
        (reader, writer), (node_reader, node_writer) = stream_pair()
        channel = NodeChannel(peer_id("a"), reader, writer)
        first, second = streams(), streams()
        hops = hop(first, channel, "s1"), hop(second, channel, "s2")
        asked = [asyncio.ensure_future(s.step(h, one_token(v), None)) for s, h, v in zip((first, second), hops, (1, 2))]
        sent = unbundle(await msg.read_frame(node_reader))  # both steps, one frame
        assert [(p.meta["session_id"], p.tensors[0][0, 0, 0].item()) for p in sent] == [("s1", 1.0), ("s2", 2.0)]
        node = FrameBatcher(node_writer)
        for part in reversed(sent):  # answered in the other order, in one bundle
            node.write(Result(1, part.meta["seq"], part.meta["session_id"]).to_meta(), [part.tensors[0] * 10])
        return [await a for a in asked]

    first, second = asyncio.run(exchange())
    assert first[0, 0, 0].item() == 10.0 and second[0, 0, 0].item() == 20.0


def test_a_broken_stream_fails_every_session_on_it():
    async def exchange():
        (reader, writer), (_, node_writer) = stream_pair()
        channel = NodeChannel(peer_id("a"), reader, writer)
        first, second = streams(), streams()
        hops = hop(first, channel, "s1"), hop(second, channel, "s2")
        asked = asyncio.ensure_future(first.step(hops[0], one_token(1), None))
        node_writer.close()  # the node dies
        with pytest.raises(NodeUnavailable):
            await asked
        await asyncio.sleep(0)
        assert hops[1].failed is not None and not channel.usable
        with pytest.raises(NodeUnavailable):
            await second.send(hops[1], msg.Step("s2", None), one_token(2))

    asyncio.run(exchange())
