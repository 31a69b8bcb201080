"""Replies round-trip through their metadata; a malformed reply means a failed node, an error frame its typed error."""
import msgpack
import pytest

from potluck.protocol import messages as msg
from potluck.protocol.errors import BadRequest, CacheFull, NodeUnavailable
from potluck.protocol.replies import Closed, HandoffFailed, Info, Opened, Result, parse_reply

PEER = "QmPeer" + "z" * 40


def over_the_wire(meta):
    return msg.Frame(msgpack.unpackb(msgpack.packb(meta)))


@pytest.mark.parametrize("reply", [
    Opened("s1"), Closed("s1"), Result(), Result(12, 3), HandoffFailed(PEER, "unreachable", 7, 4),
    Info(PEER, "m", 0, 4, "online", dtype="bfloat16", device="cuda", counters={"tokens": 10, "compute_seconds": 0.5}),
])
def test_replies_round_trip(reply):
    assert parse_reply(over_the_wire(reply.to_meta()), PEER) == reply


@pytest.mark.parametrize("meta", [{"type": "resulted"}, {}, {"type": "opened"}, {"type": "result", "length": "7"},
                                  {"type": "info", "peer_id": PEER, "model": "m", "start": True, "end": 4,
                                   "state": "online"}])
def test_a_malformed_reply_is_a_failed_node(meta):
    with pytest.raises(NodeUnavailable) as caught:
        parse_reply(over_the_wire(meta), PEER)
    assert caught.value.peer_id == PEER and caught.value.retriable


def test_an_error_frame_raises_the_nodes_typed_error():
    with pytest.raises(CacheFull, match="no room") as caught:
        parse_reply(over_the_wire(msg.error_meta(CacheFull("no room"))), PEER)
    assert caught.value.peer_id == PEER


def test_info_drops_counters_that_are_not_numbers():
    meta = Info(PEER, "m", 0, 4, "online").to_meta()
    meta["counters"] = {"tokens": 5, "evil": "x", "flag": True}
    assert parse_reply(over_the_wire(meta)).counters == {"tokens": 5}


def test_a_push_is_its_own_request_and_always_says_where_it_starts():
    push = msg.Push("s1", 6, (msg.NextHop(PEER, "s2"),), seq=3)
    assert msg.parse_request(over_the_wire(push.to_meta()).meta) == push
    step = msg.Step("s1", None, seq=1)
    assert msg.parse_request(step.to_meta()) == step
    with pytest.raises(BadRequest, match="start_from"):
        msg.parse_request({**push.to_meta(), "start_from": None})
