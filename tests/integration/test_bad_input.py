"""Bad requests get typed errors and change nothing; the node keeps serving. Dead nodes are named."""
import os
import signal
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import RawStream, open_meta
from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.protocol import messages as msg
from potluck.protocol.errors import (
    BadRequest, BlocksNotServed, MaxLengthExceeded, MessageTooLarge, NodeUnavailable, NoRoute, PotluckError,
    UnknownSession,
)

HIDDEN = 64


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    first, second = swarm.start_nodes(path, ["0:4", "4:8"])
    connection = SwarmConnection(swarm.initial_peers)
    remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    yield connection, first, remote, local
    connection.close()


def step(session_id="s1", tokens=1, hidden=HIDDEN, position=0):
    positions = torch.arange(position, position + tokens).unsqueeze(0)
    return {"type": "step", "session_id": session_id}, [torch.randn(1, tokens, hidden), positions]


def still_serves(remote, local):
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(9))
    return torch.equal(remote.generate(ids, max_new_tokens=6, do_sample=False),
                       local.generate(ids, max_new_tokens=6, do_sample=False))


def test_blocks_the_node_does_not_hold(setup):
    connection, first, remote, local = setup
    stream = RawStream(connection, first)
    error = stream.expect_error(BlocksNotServed, open_meta(start=2, end=6))
    assert "serves 0:4" in str(error)
    stream.close()


def test_wrong_hidden_size_then_a_good_step_on_the_same_stream(setup):
    connection, first, remote, local = setup
    stream = RawStream(connection, first)
    msg.raise_if_error(stream.send(open_meta()))
    stream.expect_error(BadRequest, *step(hidden=HIDDEN + 1))
    frame = msg.raise_if_error(stream.send(*step()))
    assert frame.meta["length"] == 1 and frame.tensors[0].shape == (1, 1, HIDDEN)
    stream.close()


def test_step_past_reserved_max_length(setup):
    connection, first, remote, local = setup
    stream = RawStream(connection, first)
    # its own session id: the node closes an earlier test's "s1" only once it sees that stream end
    msg.raise_if_error(stream.send(open_meta("s2", max_length=8)))
    msg.raise_if_error(stream.send(*step("s2", tokens=6)))
    error = stream.expect_error(MaxLengthExceeded, *step("s2", tokens=3, position=6))
    assert "max_length=8" in str(error)
    assert msg.raise_if_error(stream.send(*step("s2", tokens=2, position=6))).meta["length"] == 8  # nothing changed
    stream.close()


def test_session_never_opened(setup):
    connection, first, remote, local = setup
    stream = RawStream(connection, first)
    stream.expect_error(UnknownSession, *step(session_id="never-opened"))
    stream.close()


def test_a_push_from_a_peer_that_is_not_the_previous_node_is_refused(setup):
    connection, first, remote, local = setup
    owner = RawStream(connection, first)
    msg.raise_if_error(owner.send(open_meta("pushed")))  # opened by a client: it takes no pushes at all
    intruder = RawStream(connection, first, msg.PUSH_HANDLER)
    meta, tensors = step(session_id="pushed")
    error = intruder.expect_error(BadRequest, {**meta, "type": "push", "start_from": 0}, tensors)
    assert "takes pushes only from the node before it" in str(error)
    reply = msg.raise_if_error(owner.send(*step(session_id="pushed")))  # the session did not move
    assert reply.meta["length"] == 1
    intruder.close()
    owner.close()


def test_random_bytes_then_the_node_still_serves(setup):
    connection, first, remote, local = setup
    stream = RawStream(connection, first)
    junk = os.urandom(300)
    reply = stream.send_bytes(len(junk).to_bytes(4, "big") + junk)
    with pytest.raises(PotluckError):
        msg.raise_if_error(reply)
    stream.close()
    oversized = RawStream(connection, first)
    with pytest.raises(MessageTooLarge):
        msg.raise_if_error(oversized.send_bytes((2**31).to_bytes(4, "big") + b"\0" * 16))
    oversized.close()
    assert still_serves(remote, local)


def test_two_clients_at_the_same_time(setup, tiny_checkpoints):
    connection, first, remote, local = setup
    other = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_checkpoints["llama"]), swarm=SwarmConnection(connection.initial_peers))
    prompts = [torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(s)) for s in (21, 22)]
    results = {}

    def run(name, model, ids):
        results[name] = model.generate(ids, max_new_tokens=24, do_sample=False)

    threads = [threading.Thread(target=run, args=(i, m, p)) for i, (m, p) in enumerate(zip([remote, other], prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    other.swarm_view.swarm.close()
    for i, ids in enumerate(prompts):
        assert torch.equal(results[i], local.generate(ids, max_new_tokens=24, do_sample=False))


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_dead_or_hung_node_is_named(how, tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    first, second = swarm.start_nodes(path, ["0:4", "4:8"])
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection, request_timeout=3,
                                                                 route_wait=1)  # no node will come: wait 1 s, not 60
        ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(3))
        with remote.inference_session(max_length=64):
            remote.generate(ids, max_new_tokens=4, do_sample=False)
            os.kill(swarm.nodes[second].pid, getattr(signal, how))
            with pytest.raises((NodeUnavailable, NoRoute), match=f"blocks 4:8.*{second}") as failed:
                remote.generate(ids, max_new_tokens=4, do_sample=False)
            assert not isinstance(failed.value, NoRoute) or "within 1 s (--route-wait)" in str(failed.value)
    finally:
        if how == "SIGSTOP":
            os.kill(swarm.nodes[second].pid, signal.SIGCONT)
        connection.close()
