"""Nodes that place themselves: started together without spans they cover the model, and a node
sizes its span from the memory it is given."""
import json
import re
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_checkpoint
from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.node.span import block_bytes
from potluck.protocol.checkpoint import resolve_checkpoint


@pytest.fixture(scope="module")
def nine_blocks(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("placement") / "tiny-llama-9", layers=9)


def test_four_nodes_started_together_cover_the_model(nine_blocks, swarm_factory):
    swarm = swarm_factory()
    peers = swarm.start_nodes(nine_blocks, [None] * 4, "--num-blocks", "4", "--placement-delay", "1.5")
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(nine_blocks), swarm=connection)
        connection.call(remote.swarm_view.refresh())
        spans = {peer: (r.start, r.end) for peer, r in remote.swarm_view.records.items()}
        assert set(spans) == set(peers) and all(end - start == 4 for start, end in spans.values())
        assert set().union(*(range(start, end) for start, end in spans.values())) == set(range(9)), spans
        local = AutoModelForCausalLM.from_pretrained(nine_blocks).eval()
        ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
        expected = local.generate(ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(remote.generate(ids, max_new_tokens=16, do_sample=False), expected)
    finally:
        connection.close()


def test_a_node_takes_as_many_blocks_as_its_memory_holds_and_says_why(nine_blocks, swarm_factory):
    block = block_bytes(resolve_checkpoint(str(nine_blocks)), 0, torch.float32)
    cache_gib = 0.0001
    memory_gib = (3.5 * block + cache_gib * 2**30) / 2**30  # room for three blocks beside the cache
    swarm = swarm_factory()
    swarm.start_nodes(nine_blocks, [None], "--max-memory", f"{memory_gib:.9f}", "--cache-gib", str(cache_gib),
                      "--placement-delay", "0")
    log = "".join(swarm.children[-1].lines)
    assert re.search(r"taking 3 blocks: .* GiB for weights", log), log[-2000:]
    assert re.search(r"chose blocks (\d+):(\d+) of 9", log)
    start, end = map(int, re.search(r"chose blocks (\d+):(\d+) of 9", log).groups())
    assert end - start == 3


def test_a_restarted_node_announces_its_earlier_speed_at_once(nine_blocks, swarm_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path))  # inherited by the nodes
    swarm = swarm_factory()
    first = swarm.start_nodes(nine_blocks, ["0:9"])[0]
    swarm.nodes[first].send_signal(signal.SIGINT)
    assert swarm.nodes[first].wait(30) == 0
    measured = json.loads((tmp_path / "throughput.json").read_text())
    assert len(measured) == 1 and next(iter(measured.values()))["steps_per_s"] > 0
    swarm.start_nodes(nine_blocks, ["0:9"])
    assert "speed from an earlier run" in "".join(swarm.children[-1].lines)
    fixed = swarm.start_nodes(nine_blocks, ["0:9"], "--throughput", "123")[0]
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(nine_blocks), swarm=connection)
        connection.call(remote.swarm_view.refresh())
        assert remote.swarm_view.records[fixed].inference_steps_per_s == 123
    finally:
        connection.close()
