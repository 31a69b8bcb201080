"""Placement: which span the swarm needs most, and how many blocks fit, as pure functions."""
import random

from potluck.node.placement import better_span, block_throughputs, choose_span, size_span
from potluck.protocol.records import NodeRecord, NodeState


def node(start, end, speed=10.0, state=NodeState.ONLINE):
    return NodeRecord(model="m", start=start, end=end, state=state, inference_steps_per_s=speed)


def test_uncovered_blocks_come_first():
    records = {"a": node(0, 4), "b": node(4, 6)}
    throughputs = block_throughputs(records, 9, own_speed=10.0)
    assert throughputs == [10.0] * 6 + [0.0] * 3
    assert choose_span(throughputs, 3, 10.0) == (6, 9)


def test_the_weakest_block_is_raised_before_a_second_replica_elsewhere():
    records = {"a": node(0, 4, speed=100), "b": node(4, 8, speed=5)}
    assert choose_span(block_throughputs(records, 8, 10.0), 4, 10.0) == (4, 8)


def test_joining_nodes_count_as_taken_and_offline_ones_do_not():
    records = {"loading": node(0, 4, speed=0.0, state=NodeState.JOINING), "gone": node(4, 8, state=NodeState.OFFLINE)}
    assert block_throughputs(records, 8, own_speed=7.0) == [7.0] * 4 + [0.0] * 4
    assert block_throughputs(records, 8, 7.0, exclude="loading") == [0.0] * 8


def test_four_nodes_choosing_one_after_another_cover_nine_blocks():
    records, rng = {}, random.Random(0)
    for peer in "abcd":
        start, end = choose_span(block_throughputs(records, 9, 1.0), 4, 1.0, rng)
        records[peer] = node(start, end, speed=0.0, state=NodeState.JOINING)
    assert min(block_throughputs(records, 9, 1.0)) > 0


def test_of_two_nodes_claiming_at_once_the_later_peer_id_moves_if_it_helps():
    joining = lambda start, end: node(start, end, speed=0.0, state=NodeState.JOINING)  # noqa: E731
    records = {"Qm1": joining(0, 4), "Qm2": joining(0, 4)}
    assert better_span(records, "Qm2", (0, 4), 8, 1.0) == (4, 8)
    assert better_span(records, "Qm1", (0, 4), 8, 1.0) is None  # the earlier id stays
    records = {"Qm1": joining(0, 4), "Qm2": joining(4, 8)}
    assert better_span(records, "Qm2", (4, 8), 8, 1.0) is None  # no overlap: nothing to settle
    records = {"Qm1": joining(0, 8), "Qm2": joining(0, 8), "Qm3": joining(0, 8)}
    assert better_span(records, "Qm3", (0, 8), 8, 1.0) is None  # nowhere better: replicas are fine


def test_sizing_leaves_room_for_the_cache_and_says_why():
    gib = 2**30
    sizing = size_span(30, block_bytes=gib // 4, memory_bytes=3 * gib, cache_bytes=gib)
    assert sizing.blocks == 8 and "2.0 GiB for weights" in sizing.reason
    assert size_span(4, gib // 4, 3 * gib, gib).blocks == 4  # never more than the model
    small = size_span(30, gib, gib // 2, 0)
    assert small.blocks == 1 and "--max-memory" in small.reason


def test_nodes_that_all_chose_at_once_settle_on_a_cover():
    records = {f"Qm{i}": node(i, i + 4, speed=0.0, state=NodeState.JOINING) for i in range(4)}  # 7, 8 bare
    for _ in range(3):  # each node re-checks after claiming, up to three times
        for peer, record in sorted(records.items(), reverse=True):
            moved = better_span(records, peer, (record.start, record.end), 9, 1.0)
            if moved is not None:
                records[peer] = node(*moved, speed=0.0, state=NodeState.JOINING)
    assert min(block_throughputs(records, 9, 1.0)) > 0, {p: (r.start, r.end) for p, r in records.items()}
