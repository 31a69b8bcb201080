"""A node that computes wrong is caught by verification, banned and routed around: tokens stay exact."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.client.swarm_view import FailoverPolicy
from potluck.client.transport import SwarmConnection

NOISE = "0.5"  # the bad node adds noise of half its outputs' RMS


@pytest.fixture(scope="module")
def swarm(tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    honest = swarm.start_nodes(path, ["0:4", "0:4", "4:8", "4:8"])
    noisy = swarm.start_nodes(path, ["0:4"], "--test-corrupt-outputs", NOISE, name="noisy")[0]
    connection = SwarmConnection(swarm.initial_peers)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    yield path, connection, honest, noisy, local
    connection.close()


def client(path, connection, verify):
    return AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection, verify=verify,
                                                           policy=FailoverPolicy(request_timeout=3.0))


def load(remote, **sessions):
    """Make routing prefer some nodes: the others look loaded with this client's sessions."""
    remote.swarm_view.costs.local_sessions.update(sessions)


def prompt(seed):
    return torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_the_noisy_node_spoils_tokens_without_verification(swarm):
    path, connection, honest, noisy, local = swarm
    remote = client(path, connection, verify=0.0)
    load(remote, **{honest[0]: 1000, honest[1]: 1000})
    ids = prompt(0)
    with remote.inference_session(max_length=32) as session:
        got = remote.generate(ids, max_new_tokens=12, do_sample=False)
        assert session.hop_sessions[0].hop.peer_id == noisy
    assert not torch.equal(got, local.generate(ids, max_new_tokens=12, do_sample=False))
    assert remote.swarm_view.verify_counts["steps_verified"] == 0


def test_a_noisy_node_in_the_chain_is_caught_and_the_tokens_are_exact(swarm):
    path, connection, honest, noisy, local = swarm
    remote = client(path, connection, verify=1.0)
    load(remote, **{honest[0]: 1000, honest[1]: 1000})
    ids = prompt(1)
    with remote.inference_session(max_length=32) as session:
        got = remote.generate(ids, max_new_tokens=12, do_sample=False)
        assert noisy not in [hop.peer_id for hop in session.hops]
    assert torch.equal(got, local.generate(ids, max_new_tokens=12, do_sample=False))
    counts = remote.swarm_view.verify_counts
    assert counts["nodes_banned"] == 1 and noisy in remote.swarm_view.banned
    assert counts["steps_verified"] == 12 and counts["mismatches"] == 1 and counts["unresolved"] == 0
    assert counts["hops_checked"] == 2 * 12 - 1  # every hop had another replica to ask (the rest of the
    # first step's chain was rebuilt from the first hop's checked output)


def test_a_noisy_replica_asked_for_a_second_opinion_is_outvoted(swarm):
    path, connection, honest, noisy, local = swarm
    remote = client(path, connection, verify=1.0)
    load(remote, **{honest[1]: 1000, noisy: 500})  # the chain takes the first honest node; the check, the noisy one
    ids = prompt(2)
    with remote.inference_session(max_length=32) as session:
        got = remote.generate(ids, max_new_tokens=6, do_sample=False)
        assert session.hop_sessions[0].hop.peer_id == honest[0] and session.failovers == 0
    assert torch.equal(got, local.generate(ids, max_new_tokens=6, do_sample=False))
    assert noisy in remote.swarm_view.banned and remote.swarm_view.verify_counts["nodes_banned"] == 1


def test_two_replicas_that_disagree_are_reported_not_banned(swarm):
    path, connection, honest, noisy, local = swarm
    remote = client(path, connection, verify=1.0)
    remote.swarm_view.ban(honest[1], "out of this test")  # 0:4 left on one honest node and the noisy one
    load(remote, **{honest[0]: 1000})
    with remote.inference_session(max_length=32) as session:
        remote.generate(prompt(3), max_new_tokens=3, do_sample=False)
        assert session.hop_sessions[0].hop.peer_id == noisy
    counts = remote.swarm_view.verify_counts
    assert counts["unresolved"] == 3 and counts["nodes_banned"] == 0 and noisy not in remote.swarm_view.banned


def test_verify_must_be_a_share(swarm):
    path, connection, *_ = swarm
    with pytest.raises(Exception, match="share of steps"):
        client(path, connection, verify=1.5)
