import pytest

from potluck.client.routing import find_chain
from potluck.protocol.errors import NoRoute
from potluck.protocol.records import NodeRecord, NodeState


def node(start, end, state=NodeState.ONLINE, speed=10.0, cache=1000):
    return NodeRecord(model="m", start=start, end=end, state=state, inference_steps_per_s=speed,
                      cache_tokens_left=cache)


def test_chain_covers_blocks_in_order():
    records = {"a": node(0, 3), "b": node(3, 6), "c": node(6, 8)}
    assert [(h.peer_id, h.start, h.end) for h in find_chain(records, 0, 8)] == [("a", 0, 3), ("b", 3, 6), ("c", 6, 8)]


def test_chain_enters_overlapping_spans_part_way():
    records = {"a": node(0, 5), "b": node(2, 8)}
    assert [(h.peer_id, h.start, h.end) for h in find_chain(records, 0, 8)] == [("a", 0, 5), ("b", 5, 8)]


def test_offline_banned_and_full_nodes_are_avoided():
    records = {"a": node(0, 8, NodeState.JOINING), "b": node(0, 8, cache=10), "c": node(0, 8), "d": node(0, 8, speed=99)}
    assert find_chain(records, 0, 8, banned=frozenset({"d"}), cache_tokens=100)[0].peer_id == "c"


def test_gap_names_the_missing_blocks():
    with pytest.raises(NoRoute, match="blocks 3:6"):
        find_chain({"a": node(0, 3), "c": node(6, 8)}, 0, 8)
