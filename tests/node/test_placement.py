"""Placement: which span the swarm needs most, and how many blocks fit, as pure functions."""
import random

from potluck.node.placement import better_span, block_throughputs, choose_span, should_move, size_span
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


def test_a_node_never_moves_off_blocks_it_alone_serves():
    records = {"me": node(0, 4), "b": node(4, 9, speed=0.1)}  # 4:9 is weak, but only "me" holds 0:4
    assert should_move(records, "me", (0, 4), 9, 10.0, quality=1.0) is None
    records["a"] = node(1, 4)  # block 0 is still "me"'s alone
    assert should_move(records, "me", (0, 4), 9, 10.0, quality=1.0) is None


def test_a_replica_moves_to_an_uncovered_block():
    records = {"me": node(0, 4), "a": node(0, 4), "b": node(5, 9)}  # block 4 has no node
    move = should_move(records, "me", (0, 4), 9, 10.0, quality=0.75)
    assert move is not None and move.span[0] <= 4 < move.span[1] and "1 blocks have no node" in move.reason


def test_a_move_must_raise_the_weakest_block_by_a_clear_margin():
    records = {"me": node(0, 4), "a": node(0, 4), "b": node(4, 8, speed=1.0)}
    move = should_move(records, "me", (0, 4), 8, 10.0, quality=0.75)
    assert move.span == (4, 8) and "from 1.0 to 10.0" in move.reason  # 1 / 10 < 0.75
    records["b"] = node(4, 8, speed=8.0)  # 8 / 10 = 0.8: not worth a move at 0.75...
    assert should_move(records, "me", (0, 4), 8, 10.0, quality=0.75) is None
    assert should_move(records, "me", (0, 4), 8, 10.0, quality=1.0).span == (4, 8)  # ...but at 1.0
    records = {"me": node(4, 8), "a": node(0, 4), "b": node(4, 8)}
    assert should_move(records, "me", (4, 8), 8, 10.0, quality=1.0) is None  # nowhere better


def test_nodes_left_after_one_leaves_cover_the_model_again_moving_one_at_a_time():
    records = {"a": node(0, 4), "b": node(0, 4), "c": node(4, 8), "d": node(5, 9)}
    del records["c"]  # block 4 is bare now
    moves = 0
    for _ in range(3):  # balance periods; nodes check one after another and see earlier moves
        for peer in sorted(records):
            move = should_move(records, peer, (records[peer].start, records[peer].end), 9, 10.0, 0.75)
            if move is not None:
                records[peer], moves = node(*move.span, state=NodeState.JOINING), moves + 1
    assert min(block_throughputs(records, 9, 10.0)) > 0 and moves == 1
    assert (records["d"].start, records["d"].end) == (5, 9)  # it alone held block 8


def test_nodes_whose_spans_just_tile_the_model_cover_it_whatever_the_ties():
    for blocks, length, nodes in ((30, 10, 3), (30, 15, 2), (30, 12, 3), (31, 8, 4), (9, 3, 3)):
        for seed in range(40):  # random tie-breaks: a node of 10 taking 2:12 of 30 left 0:2 bare for good
            records, rng = {}, random.Random(seed)
            for peer in range(nodes):
                start, end = choose_span(block_throughputs(records, blocks, 1.0), length, 1.0, rng)
                records[str(peer)] = node(start, end, speed=0.0, state=NodeState.JOINING)
            spans = sorted((r.start, r.end) for r in records.values())
            assert min(block_throughputs(records, blocks, 1.0)) > 0, (blocks, length, seed, spans)


def test_a_second_layer_of_replicas_lines_up_with_the_first():
    records = {"a": node(0, 10), "b": node(10, 20), "c": node(20, 30)}
    assert choose_span(block_throughputs(records, 30, 10.0), 10, 10.0, random.Random(1))[0] in (0, 10, 20)


def test_the_nodes_a_self_placing_node_watches_are_those_alone_on_some_block():
    from potluck.node.pings import sole_holders

    records = {"me": node(0, 4), "twin": node(0, 4), "alone": node(4, 6), "part": node(6, 9),
               "over": node(7, 9), "going": node(6, 9, state=NodeState.DRAINING)}
    assert sole_holders(records, "me") == {"alone", "part"}  # "part" alone holds block 6
    assert sole_holders({"me": node(0, 9)}, "me") == set()  # never itself
