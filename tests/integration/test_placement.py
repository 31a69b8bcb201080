"""Nodes that place themselves: started together without spans they cover the model, they cover
it again when one leaves, and a node sizes its span from the memory it is given."""
import json
import re
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from helpers import AtToken, make_tiny_checkpoint
from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.node.span import block_bytes
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.directory import read_block_records
from potluck.protocol.records import NodeState


@pytest.fixture(scope="module")
def nine_blocks(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("placement") / "tiny-llama-9", layers=9)


def online_spans(connection: SwarmConnection) -> dict[str, tuple[int, int]]:
    records = connection.call(read_block_records(connection.dht, "tiny-llama-9", 9))
    return {peer: (r.start, r.end) for peer, r in records.items() if r.state == NodeState.ONLINE}


def covered(spans: dict[str, tuple[int, int]]) -> set[int]:
    return set().union(*(range(*span) for span in spans.values()))


def assert_greedy_is_exact(checkpoint, connection: SwarmConnection, seed: int) -> None:
    remote = AutoDistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm=connection)
    local = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(seed))
    expected = local.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(remote.generate(ids, max_new_tokens=16, do_sample=False), expected)


def memory_for(checkpoint, blocks: float, cache_gib: float) -> float:
    """GiB for ``blocks`` float32 blocks beside a cache of ``cache_gib``."""
    return (blocks * block_bytes(resolve_checkpoint(str(checkpoint)), 0, torch.float32) + cache_gib * 2**30) / 2**30


def test_four_nodes_started_together_cover_the_model(nine_blocks, swarm_factory):
    swarm = swarm_factory()
    peers = swarm.start_nodes(nine_blocks, [None] * 4, "--num-blocks", "4", "--placement-delay", "3")
    connection = SwarmConnection(swarm.initial_peers)
    try:
        spans = online_spans(connection)
        assert set(spans) == set(peers) and all(end - start == 4 for start, end in spans.values())
        assert covered(spans) == set(range(9)), spans
        assert_greedy_is_exact(nine_blocks, connection, seed=3)
    finally:
        connection.close()


def test_when_a_node_leaves_the_others_move_to_cover_its_blocks(nine_blocks, swarm_factory):
    swarm = swarm_factory()
    peers = swarm.start_nodes(nine_blocks, [None] * 4, "--num-blocks", "4", "--placement-delay", "1.5",
                              "--balance-period", "2", "--drain-timeout", "2")
    connection = SwarmConnection(swarm.initial_peers)
    try:
        def alone(spans, peer):  # the blocks only ``peer`` serves
            return set(range(*spans[peer])) - covered({p: s for p, s in spans.items() if p != peer})

        before = online_spans(connection)
        leaving = next(p for p in peers if alone(before, p))
        swarm.nodes[leaving].send_signal(signal.SIGTERM)
        assert swarm.nodes[leaving].wait(30) == 0
        deadline, after = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            after = online_spans(connection)
            if leaving not in after and covered(after) == set(range(9)):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"blocks not covered again: {before} -> {after}")
        for peer in set(after):  # a node never moved off a block it alone served
            assert alone(before, peer) <= set(range(*after[peer])), (before, after)
        movers = [peer for peer, child in swarm.node_children.items()
                  if any("moving from blocks" in line for line in child.lines)]  # said before it announced
        assert movers, "".join(line for child in swarm.children for line in child.lines)[-3000:]
        for peer in movers:  # it announces its new blocks, then says so
            swarm.wait_for_line(peer, "moved: ONLINE on blocks", timeout=30)
        assert_greedy_is_exact(nine_blocks, connection, seed=4)
    finally:
        connection.close()
        swarm.stop()


def test_a_node_without_room_for_two_spans_drains_the_old_one_before_it_moves(nine_blocks, swarm_factory):
    cache_gib = 0.0001
    memory_gib = memory_for(nine_blocks, 4.5, cache_gib)  # four blocks, not eight
    swarm = swarm_factory()
    swarm.start_nodes(nine_blocks, ["0:5"], "--throughput", "100")
    fast = swarm.start_nodes(nine_blocks, ["5:9"], "--throughput", "1000")[0]
    swarm.start_nodes(nine_blocks, [None], "--num-blocks", "4", "--throughput", "10", "--max-memory",
                      f"{memory_gib:.9f}", "--cache-gib", str(cache_gib), "--placement-delay", "0",
                      "--balance-period", "1")
    mover = swarm.children[-1]
    assert re.search(r"chose blocks (0:4|1:5) of 9", "".join(mover.lines))  # the slower node's blocks
    swarm.nodes[fast].send_signal(signal.SIGTERM)
    assert swarm.nodes[fast].wait(30) == 0
    deadline = time.monotonic() + 60
    while "moved: ONLINE on blocks 5:9" not in "".join(mover.lines) and time.monotonic() < deadline:
        time.sleep(0.5)
    log = "".join(mover.lines)
    assert "moved: ONLINE on blocks 5:9" in log and "draining the old span first" in log, log[-3000:]
    connection = SwarmConnection(swarm.initial_peers)
    try:
        assert_greedy_is_exact(nine_blocks, connection, seed=5)
    finally:
        connection.close()
        swarm.stop()


def test_a_node_takes_as_many_blocks_as_its_memory_holds_and_says_why(nine_blocks, swarm_factory):
    cache_gib = 0.0001
    memory_gib = memory_for(nine_blocks, 3.5, cache_gib)  # room for three blocks beside the cache
    swarm = swarm_factory()
    swarm.start_nodes(nine_blocks, [None], "--max-memory", f"{memory_gib:.9f}", "--cache-gib", str(cache_gib),
                      "--placement-delay", "0")
    log = "".join(swarm.children[-1].lines)
    assert re.search(r"taking 3 blocks: .* [GM]iB for weights", log), log[-2000:]
    assert re.search(r"chose blocks (\d+):(\d+) of 9", log)
    start, end = map(int, re.search(r"chose blocks (\d+):(\d+) of 9", log).groups())
    assert end - start == 3


def test_a_restarted_node_announces_its_earlier_speed_at_once(nine_blocks, swarm_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path))  # inherited by the nodes
    swarm = swarm_factory()
    first = swarm.start_nodes(nine_blocks, ["0:9"])[0]
    log = "".join(swarm.children[-1].lines)
    assert "loaded 9 blocks in" in log and "measuring this node's speed" in log  # a log file sees each phase
    swarm.nodes[first].send_signal(signal.SIGINT)
    assert swarm.nodes[first].wait(30) == 0
    measured = json.loads((tmp_path / "throughput.json").read_text())
    assert len(measured) == 1 and next(iter(measured.values()))["steps_per_s"] > 0
    swarm.start_nodes(nine_blocks, ["0:9"])
    assert "speed from an earlier run" in "".join(swarm.children[-1].lines)
    assert "measuring this node's speed" not in "".join(swarm.children[-1].lines)
    fixed = swarm.start_nodes(nine_blocks, ["0:9"], "--throughput", "123")[0]
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(nine_blocks), swarm=connection)
        connection.call(remote.swarm_view.refresh())
        assert remote.swarm_view.records[fixed].inference_steps_per_s == 123
    finally:
        connection.close()


def test_a_generation_goes_on_when_a_self_placing_node_takes_over_blocks_whose_only_node_died(nine_blocks,
                                                                                              swarm_factory):
    swarm = swarm_factory()
    swarm.start_nodes(nine_blocks, ["0:5"], "--throughput", "100")
    victim = swarm.start_nodes(nine_blocks, ["5:9"], "--throughput", "1000")[0]  # its record outlives it by ~37 s
    mover = swarm.start_nodes(nine_blocks, [None], "--num-blocks", "5", "--throughput", "100", "--placement-delay",
                              "0", "--announce-period", "60", "--drain-timeout", "2")[0]  # pings once a minute
    assert "chose blocks 0:5 of 9" in "".join(swarm.node_children[mover].lines)  # beside the slower node
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(nine_blocks), swarm=connection)
        local = AutoModelForCausalLM.from_pretrained(nine_blocks).eval()
        ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(6))
        expected = local.generate(ids, max_new_tokens=24, do_sample=False)
        with remote.inference_session(max_length=40) as session:
            kill = AtToken(8, lambda: swarm.nodes[victim].send_signal(signal.SIGKILL))
            got = remote.generate(ids, max_new_tokens=24, do_sample=False, logits_processor=LogitsProcessorList([kill]))
            assert session.failovers >= 1
        assert torch.equal(got, expected)
        moved = swarm.wait_for_line(mover, "moving from blocks 0:5 to 4:9").group(0)
        lines = swarm.node_children[mover].lines
        assert f"not answering: {victim}" in "".join(lines), moved
        # found by its check of the nodes alone on their blocks, before its first period's pings (and status line)
        assert not any("other nodes pinged" in line for line in lines), lines
    finally:
        connection.close()
        swarm.stop()
