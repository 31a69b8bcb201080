"""The router's graph search: fastest chains, overlapping spans, latency, load and gaps."""
import random
from dataclasses import replace

import pytest

from potluck.client.routing import Hop, RouteCosts, find_chain
from potluck.client.swarm_view import SwarmView
from potluck.protocol.errors import NoRoute
from potluck.protocol.records import NodeRecord, NodeState


def node(start, end, speed=10.0, state=NodeState.ONLINE, cache=1000, pings=None, sessions=0, dtype="float32",
         quant="none"):
    return NodeRecord(model="m", start=start, end=end, state=state, inference_steps_per_s=speed,
                      cache_tokens_left=cache, pings=pings or {}, active_sessions=sessions, dtype=dtype, quant=quant)


def route(records, costs=None, **kwargs):
    chain = find_chain(records, 0, 8, costs=costs or RouteCosts(jitter=0), rng=random.Random(0), **kwargs)
    return [(h.peer_id, h.start, h.end) for h in chain]


def test_chain_covers_blocks_in_order():
    records = {"a": node(0, 3), "b": node(3, 6), "c": node(6, 8)}
    assert route(records) == [("a", 0, 3), ("b", 3, 6), ("c", 6, 8)]


def test_faster_replica_wins():
    records = {"slow": node(0, 8, speed=10), "fast": node(0, 8, speed=100)}
    assert route(records) == [("fast", 0, 8)]


def test_chain_enters_and_leaves_overlapping_spans_part_way():
    records = {"a": node(0, 6, speed=5), "b": node(3, 8, speed=500)}
    assert route(records) == [("a", 0, 3), ("b", 3, 8)]
    records = {"a": node(0, 6, speed=500), "b": node(3, 8, speed=5), "c": node(0, 8, speed=1)}
    assert route(records) == [("a", 0, 6), ("b", 6, 8)]


def test_a_distant_fast_node_loses_to_a_near_one():
    records = {"far": node(0, 8, speed=1000), "near": node(0, 8, speed=200)}
    costs = RouteCosts(client_pings={"far": 0.5, "near": 0.001}, jitter=0)
    assert route(records, costs) == [("near", 0, 8)]
    costs = RouteCosts(client_pings={"far": 0.001, "near": 0.001}, jitter=0)
    assert route(records, costs) == [("far", 0, 8)]


def test_node_to_node_pings_pick_the_close_successor():
    records = {"a": node(0, 4, pings={"b": 0.4, "c": 0.002}), "b": node(4, 8, speed=20), "c": node(4, 8, speed=15)}
    assert route(records, RouteCosts(client_pings={p: 0.01 for p in "abc"}, jitter=0)) == [("a", 0, 4), ("c", 4, 8)]


def test_loaded_replica_is_avoided_by_the_next_route():
    records = {"r1": node(0, 8), "r2": node(0, 8)}
    costs = RouteCosts(jitter=0)
    first = route(records, costs)[0][0]
    costs.local_sessions[first] = 1
    assert route(records, costs)[0][0] != first
    records = {"r1": node(0, 8, sessions=3), "r2": node(0, 8)}
    assert route(records) == [("r2", 0, 8)]


def test_replicas_share_many_clients():
    records = {"r1": node(0, 8), "r2": node(0, 8)}
    picks = [find_chain(records, 0, 8, rng=random.Random(seed))[0].peer_id for seed in range(200)]
    assert 60 < picks.count("r1") < 140


def test_offline_banned_and_full_nodes_are_avoided():
    records = {"a": node(0, 8, state=NodeState.JOINING), "b": node(0, 8, cache=10), "c": node(0, 8),
               "d": node(0, 8, speed=99), "e": node(0, 8, state=NodeState.DRAINING, speed=999)}
    assert route(records, banned=frozenset({"d"}), cache_tokens=100) == [("c", 0, 8)]


def test_gap_names_the_missing_blocks():
    with pytest.raises(NoRoute, match="blocks 3:6"):
        route({"a": node(0, 3), "c": node(6, 8), "b": node(3, 6)}, banned=frozenset({"b"}))


def test_a_chain_keeps_to_one_dtype_unless_mixing_is_allowed():
    records = {"gpu-a": node(0, 4, speed=1000, dtype="bfloat16"), "cpu-b": node(4, 8, speed=100),
               "cpu-a": node(0, 4, speed=50), "gpu-b": node(4, 8, speed=20, dtype="bfloat16")}
    # mixed, the fastest hops win; kept to one dtype, the faster of the float32 and bfloat16 chains
    assert route(records) == [("gpu-a", 0, 4), ("cpu-b", 4, 8)]
    assert route(records, mix_dtypes=False) == [("cpu-a", 0, 4), ("cpu-b", 4, 8)]
    assert route(records, mix_dtypes=False, dtypes=frozenset({"bfloat16"})) == [("gpu-a", 0, 4), ("gpu-b", 4, 8)]


def test_no_single_dtype_chain_says_how_to_allow_mixing():
    records = {"gpu": node(0, 4, dtype="bfloat16"), "cpu": node(4, 8)}
    with pytest.raises(NoRoute, match="allow mixed dtypes"):
        route(records, mix_dtypes=False)
    with pytest.raises(NoRoute, match="blocks 0:4"):
        route(records, dtypes=frozenset({"float32"}))
    records["cpu"] = node(0, 4)
    with pytest.raises(NoRoute, match="serves blocks 4:8"):  # mixing would not help: say what is missing
        route(records, mix_dtypes=False)


def test_no_single_dtype_chain_says_why_each_dtype_breaks_where_it_does():
    records = {"cpu-a": node(0, 4), "cpu-b": node(4, 8, cache=10), "gpu-b": node(4, 8, dtype="bfloat16")}
    with pytest.raises(NoRoute) as refused:
        route(records, mix_dtypes=False, cache_tokens=100)
    message = str(refused.value)
    assert "in float32, no usable node serves blocks 4:8" in message and "10 tokens of cache free" in message
    assert "in bfloat16, no usable node serves blocks 0:4" in message and "computes in float32" in message
    assert message.endswith("--mix-dtypes")


def test_quantised_nodes_are_used_only_when_allowed():
    records = {"exact": node(0, 8, speed=10), "int8": node(0, 8, speed=100, quant="int8"),
               "nf4-tail": node(4, 8, speed=1000, quant="nf4"), "head": node(0, 4, speed=10)}
    assert route(records) == [("exact", 0, 8)]  # the faster quantised ones are not even considered
    assert route(records, quants=None) == [("int8", 0, 8)]  # allowed: the fastest chain, whatever it holds
    assert "int8" not in {peer for peer, _, _ in route(records, quants=frozenset({"none", "nf4"}))}
    with pytest.raises(NoRoute, match="allow_quantized=True, --allow-quantized"):
        route({"int8": node(0, 8, quant="int8")})


def test_no_route_says_why_each_node_holding_the_first_missing_block_cannot_be_used():
    records = {"small": node(0, 8, cache=3495), "loading": node(0, 4, state=NodeState.JOINING),
               "packed": node(0, 4, quant="int8", cache=9999), "failed": node(0, 4)}
    with pytest.raises(NoRoute) as raised:
        route(records, cache_tokens=4096, banned=frozenset({"failed"}))
    message = str(raised.value)
    for reason in ("3495 tokens of cache free, 4096 asked for", "--max-length", "joining", "weights in int8",
                   "set aside for now after it failed"):
        assert reason in message, message
    with pytest.raises(NoRoute, match="none holds block 4"):
        route({"head": node(0, 4)})


def test_a_long_prompt_gets_time_for_its_tokens_even_from_a_node_that_announced_no_forward_speed():
    view = SwarmView(swarm=None, model="m", num_blocks=8)
    measured = NodeRecord(model="m", start=0, end=8, state=NodeState.ONLINE, inference_steps_per_s=10.0,
                          forward_tokens_per_s=1000.0)
    fixed = NodeRecord(model="m", start=0, end=8, state=NodeState.ONLINE, inference_steps_per_s=10.0)  # --throughput
    slack, base = view.policy.slack, view.policy.request_timeout
    assert view.timeout_for([Hop("a", 0, 4, measured)], 1000) == pytest.approx(base + slack * 0.5)
    assert view.timeout_for([Hop("b", 0, 4, fixed)], 1000) == pytest.approx(base + slack * 50)  # 1000 / 20 a s


def test_nodes_of_another_model_under_the_same_name_are_not_routed_through():
    mine, theirs = "a" * 16, "b" * 16
    records = {"ours-a": replace(node(0, 4), config_id=mine), "ours-b": replace(node(4, 8), config_id=mine),
               "theirs": replace(node(0, 8, speed=1000.0), config_id=theirs),  # far faster, another shape
               "old": node(0, 8, speed=1.0)}  # announces no shape (an older node): taken
    assert route(records, config_id=mine) == [("ours-a", 0, 4), ("ours-b", 4, 8)]
    assert route(records) == [("theirs", 0, 8)]  # a client that does not say its shape takes any
    with pytest.raises(NoRoute, match="another model under this name"):
        route({"theirs": records["theirs"]}, config_id=mine)
