"""A node that is asked to leave drains: running answers finish there, new sessions go elsewhere,
and sessions still open when its drain timeout passes are told to move at once."""
import logging
import os
import signal
import threading
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from potluck import AutoDistributedModelForCausalLM
from potluck.client.swarm_view import FailoverPolicy
from potluck.client.transport import SwarmConnection


class Slowly(LogitsProcessor):
    """Takes ``seconds`` per token and calls ``actions[n]`` before the n-th new token."""

    def __init__(self, seconds, actions):
        self.seconds, self.actions, self.calls = seconds, actions, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls in self.actions:
            self.actions[self.calls]()
        time.sleep(self.seconds)
        return scores


def prompt(seed):
    return torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(seed))


def swarm_and_model(tiny_checkpoints, swarm_factory, *victim_args):
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    victim = swarm.start_nodes(path, ["0:8"], *victim_args)[0]
    swarm.start_nodes(path, ["0:8"])  # the replica sessions move to
    connection = SwarmConnection(swarm.initial_peers)
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), swarm=connection, policy=FailoverPolicy(request_timeout=30.0, backoff=0.05))
    connection.call(remote.swarm_view.refresh())
    for peer in remote.swarm_view.records:  # the next session starts on the victim
        if peer != victim:
            remote.swarm_view.ban(peer, "test: start on the victim")
    return swarm, victim, connection, remote, AutoModelForCausalLM.from_pretrained(path).eval()


def test_a_draining_node_finishes_its_answer_and_new_sessions_go_elsewhere(tiny_checkpoints, swarm_factory):
    swarm, victim, connection, remote, local = swarm_and_model(tiny_checkpoints, swarm_factory)
    view, second = remote.swarm_view, {}
    try:
        def during_the_drain():
            try:
                with remote.inference_session(max_length=64) as session:
                    second["tokens"] = remote.generate(prompt(2), max_new_tokens=8, do_sample=False)
                    second["hops"] = [hop.peer_id for hop in session.hops]
            except Exception as e:  # seen by the asserts below
                second["error"] = e

        starter = threading.Thread(target=during_the_drain)
        actions = {2: lambda: view.banned.clear(), 3: lambda: swarm.nodes[victim].send_signal(signal.SIGINT),
                   6: starter.start}
        with remote.inference_session(max_length=96) as session:
            got = remote.generate(prompt(1), max_new_tokens=40, do_sample=False,
                                  logits_processor=LogitsProcessorList([Slowly(0.05, actions)]))
            assert [hop.peer_id for hop in session.hops] == [victim] and session.failovers == 0
            connection.call(view.refresh())
            assert view.records[victim].state.value == "draining"
        starter.join(60)
        assert torch.equal(got, local.generate(prompt(1), max_new_tokens=40, do_sample=False))
        assert "error" not in second, second.get("error")
        assert second["hops"] and victim not in second["hops"]
        assert torch.equal(second["tokens"], local.generate(prompt(2), max_new_tokens=8, do_sample=False))
        assert swarm.nodes[victim].wait(30) == 0  # then it left
    finally:
        connection.close()


@pytest.mark.parametrize("second_ctrl_c", [False, True])
def test_sessions_open_at_the_drain_timeout_are_told_to_move(tiny_checkpoints, swarm_factory, caplog, second_ctrl_c):
    """Sessions still open when the drain timeout passes, or at a second Ctrl-C, are told to move;
    either way the node leaves in order (OFFLINE), without a traceback."""
    swarm, victim, connection, remote, local = swarm_and_model(
        tiny_checkpoints, swarm_factory, "--drain-timeout", "300" if second_ctrl_c else "1")
    try:
        with caplog.at_level(logging.INFO, logger="potluck.client.failover"):
            with remote.inference_session(max_length=64) as session:
                first = remote.generate(prompt(3), max_new_tokens=8, do_sample=False)
                assert [hop.peer_id for hop in session.hops] == [victim]
                remote.swarm_view.banned.clear()
                swarm.nodes[victim].send_signal(signal.SIGINT)
                if second_ctrl_c:
                    swarm.wait_for_line(victim, "draining: 1 sessions", 30)
                    swarm.nodes[victim].send_signal(signal.SIGINT)
                # the session stayed open: the node waited out its drain timeout (or not), then left
                assert swarm.nodes[victim].wait(60) == (130 if second_ctrl_c else 0)
                more = remote.generate(first, max_new_tokens=8, do_sample=False)
                assert session.failovers == 1 and victim not in [hop.peer_id for hop in session.hops]
        assert torch.equal(more, local.generate(first, max_new_tokens=8, do_sample=False))
        assert "is leaving" in caplog.text  # the node said why, so the client did not wait for a timeout
        assert swarm.wait_for_line(victim, "OFFLINE", 1)
        assert not any("Traceback" in line for line in swarm.node_children[victim].lines)
    finally:
        connection.close()


def test_a_node_whose_whole_process_group_gets_sigterm_still_leaves(tiny_checkpoints, swarm_factory):
    # as a service manager stops it: its P2P daemon is gone before the node announces and shuts down
    swarm = swarm_factory()
    peer = swarm.start_nodes(tiny_checkpoints["llama"], ["0:8"])[0]
    node = swarm.nodes[peer]
    os.killpg(node.pid, signal.SIGTERM)
    assert node.wait(60) == 0  # without bounds on each step it waited on the daemon forever
    assert swarm.wait_for_line(peer, "OFFLINE", 1)
    # it could not announce that: it says so and how to stop a node so that it can (it claimed OFFLINE)
    assert swarm.wait_for_line(peer, "could not announce OFFLINE", 1) and swarm.wait_for_line(peer, "KillMode=mixed", 1)


def test_a_node_whose_p2p_daemon_dies_says_so_and_stops(tiny_checkpoints, swarm_factory):
    swarm = swarm_factory()
    peer = swarm.start_nodes(tiny_checkpoints["llama"], ["0:8"])[0]
    node = swarm.nodes[peer]
    daemons = [c for c in psutil.Process(node.pid).children(recursive=True) if c.name() == "p2pd"]
    assert len(daemons) == 1
    daemons[0].kill()
    assert node.wait(60) == 2  # not ONLINE in name only, with no one able to reach it
    assert swarm.wait_for_line(peer, "P2P daemon stopped", 1)
