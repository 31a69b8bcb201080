"""With hand-off, a step is one message from the client and one back; tokens do not change."""
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.protocol import messages as msg

from helpers import potluck_command


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints["qwen3"]
    swarm = swarm_factory()
    peers = swarm.start_nodes(path, ["0:3", "3:6", "6:8"], "--announce-period", "2")
    connection = SwarmConnection(swarm.initial_peers)
    remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    yield connection, peers, remote, local, path
    connection.close()


def counters(connection, peers, settled=False):
    """The nodes' counters summed; ``settled`` waits until no session is open (a client's close is sent
    without waiting for it, so it may still be on its way when ``generate`` returns)."""
    deadline = time.monotonic() + 10
    while True:
        total, open_sessions = {}, 0
        for peer in peers:
            frame = connection.call(connection.request(peer, msg.INFO_HANDLER, {"type": "info"}))
            open_sessions += frame.meta["open_sessions"]
            for name, value in frame.meta["counters"].items():
                total[name] = total.get(name, 0) + value
        if not settled or open_sessions == 0 or time.monotonic() > deadline:
            return total
        time.sleep(0.05)


def test_one_message_each_way_per_step(setup):
    connection, peers, remote, local, path = setup
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with remote.inference_session(max_length=64) as session:
        remote.generate(ids, max_new_tokens=2, do_sample=False)  # opens the sessions
        before = counters(connection, peers)
        got = remote.generate(ids, max_new_tokens=17, do_sample=False)
        after = counters(connection, peers)
        assert session.handoff_fallbacks == 0
    steps = 17  # a prefill (the prompt, rewound) and 16 one-token steps
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert delta["client_messages"] == steps
    assert delta["to_client"] == steps
    assert delta["pushes_sent"] == delta["pushes_received"] == 2 * steps
    assert torch.equal(got, local.generate(ids, max_new_tokens=17, do_sample=False))


def test_same_tokens_with_and_without_handoff(setup):
    connection, peers, remote, local, path = setup
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))
    remote.swarm_view.handoff = False
    try:
        before = counters(connection, peers, settled=True)
        direct = remote.generate(ids, max_new_tokens=12, do_sample=False)
        delta = {n: v - before.get(n, 0) for n, v in counters(connection, peers, settled=True).items()}
    finally:
        remote.swarm_view.handoff = True
    assert delta.get("pushes_sent", 0) == 0
    assert delta["client_messages"] == 3 * 12 + 3 + 3  # steps on 3 hops, opens, closes
    assert torch.equal(remote.generate(ids, max_new_tokens=12, do_sample=False), direct)
    assert torch.equal(direct, local.generate(ids, max_new_tokens=12, do_sample=False))


def test_nodes_publish_pings_and_route_explains_the_chain(setup):
    connection, peers, remote, local, path = setup
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        connection.call(remote.swarm_view.refresh())
        records = remote.swarm_view.records
        if all(set(peers) - {p} <= set(records[p].pings) for p in peers):
            break
        time.sleep(1)
    assert all(0 < ping < 5 for p in peers for ping in records[p].pings.values())
    assert set(records[peers[0]].pings) == set(peers[1:])
    command = potluck_command("route", "--model", str(path), "--initial-peers", *connection.initial_peers)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 nodes known" in result.stdout
    chain = [line for line in result.stdout.splitlines() if "compute" in line]
    assert [line.split()[1] for line in chain] == ["0:3", "3:6", "6:8"]
    assert "expected time per step" in result.stdout
