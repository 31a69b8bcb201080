"""Volunteers behind home routers: a node in a NAT'd network namespace (no inbound connections)
serves a client that nobody can dial either, through a relay on the bootstrap peer, exactly; when
the relay dies mid-generation the client fails over to another replica. Nodes tell whether they
are reachable, and how to become so; slow links cost one message per step."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from potluck.node.local_swarm import LocalSwarm
from potluck.node.netbed import NetBed, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no network namespaces here: {unavailable()}")
CLIENT = Path(__file__).parent.parent / "wan_client.py"


@pytest.fixture
def bed():
    with NetBed(extra=["n1", "n2", "n3"]) as bed:
        yield bed


def test_a_node_behind_nat_serves_through_a_relay_and_its_clients_fail_over_when_the_relay_dies(
        bed, tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    swarm = LocalSwarm(tmp_path, node_args=["--num-threads", "1"])
    try:
        swarm.start_dht(prefix=bed.prefix("public"), host_maddr=f"/ip4/{bed.address('public')}/tcp/0")
        outside, home, spare = swarm.start_nodes(path, ["0:4", "4:8", "4:8"], each=[
            ("outside", bed.prefix("n1"), ["--host-maddrs", f"/ip4/{bed.address('n1')}/tcp/0"]),
            ("home", bed.prefix("home"), []),
            ("spare", bed.prefix("n2"), ["--host-maddrs", f"/ip4/{bed.address('n2')}/tcp/0", "--throughput", "1"]),
        ])  # the spare announces 1 step/s: routed through only when the home node fails
        swarm.wait_for_line(outside, "other machines reach this node directly")
        advice = swarm.wait_for_line(home, rf"cannot connect .* through the relay /ip4/{bed.address('public')}/.* "
                                           r"forward TCP port (\d+)")
        listening = [line for line in swarm.node_children[home].lines if "reach this peer at /ip4/" in line]
        assert f"/tcp/{advice.group(1)}" in listening[-1]  # the port to forward is the one it listens on now
        bed.firewall("client")  # nobody can dial the client: the home node is reached only through the relay
        client = subprocess.Popen([*bed.prefix("client"), sys.executable, str(CLIENT), "relay", str(path),
                                   *swarm.initial_peers], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "paused", client.stderr.read()[-3000:]
            swarm.kill("dht")  # the relay, mid-generation
            out, err = client.communicate("go\n", timeout=300)
        finally:
            client.kill()
        assert client.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
    finally:
        swarm.stop()
    assert report["tokens_equal"]
    assert report["before"] == ["outside-0_4-1", "home-4_8-2"]
    assert report["after"] == ["outside-0_4-1", "spare-4_8-3"]
    assert report["records"] == {"outside-0_4-1": "direct", "home-4_8-2": "relayed", "spare-4_8-3": "direct"}
    assert report["health"] == report["records"]


def test_over_slow_links_a_step_is_one_message_from_the_client(bed, tiny_checkpoints, tmp_path):
    """50 ms one way on every link (the bed's delaying proxy): hand-off still takes one message per
    step from the client, and the tokens are exact. (How long a token takes: scripts/bench wan.)"""
    path = tiny_checkpoints["llama"]
    bed.delay(50)
    swarm = LocalSwarm(tmp_path, node_args=["--num-threads", "1", "--throughput", "1000"])
    try:
        swarm.start_dht(prefix=bed.prefix("public"), host_maddr=f"/ip4/{bed.address('public')}/tcp/0")
        peers = swarm.start_nodes(path, ["0:3", "3:6", "6:8"], each=[
            (place, bed.prefix(place), ["--host-maddrs", f"/ip4/{bed.address(place)}/tcp/0"])
            for place in ["n1", "n2", "n3"]])
        client = subprocess.run([*bed.prefix("client"), sys.executable, str(CLIENT), "steps", str(path), *peers,
                                 "--", *swarm.initial_peers], capture_output=True, text=True, timeout=300)
        assert client.returncode == 0, client.stderr[-3000:]
        report = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        swarm.stop()
    assert report["tokens_equal"]
    assert report["client_messages"] == report["steps"]  # one per step, not one per hop
