"""A volunteer behind a home router: a node in a NAT'd network namespace (no inbound connections)
serves a client in another namespace exactly, over a connection the node opened outward (relays do
not work yet: README); nodes tell whether they are reachable, and how to become so."""
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


def test_a_node_behind_nat_serves_a_client_it_reaches(bed, tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    public = f"/ip4/{bed.address('public')}/tcp/0"
    swarm = LocalSwarm(tmp_path, node_args=["--num-threads", "1"])
    try:
        swarm.start_dht(prefix=bed.prefix("public"), host_maddr=public)
        (outside,) = swarm.start_nodes(path, ["0:4"], "--host-maddrs", public, prefix=bed.prefix("public"),
                                       name="outside")
        (home,) = swarm.start_nodes(path, ["4:8"], prefix=bed.prefix("home"), name="home")
        swarm.wait_for_line(outside, "other machines reach this node directly")
        advice = swarm.wait_for_line(home, r"cannot connect to this node .* forward TCP port (\d+)")
        listening = swarm.wait_for_line(home, r"reach this peer at /ip4/[\d.]+/tcp/(\d+)")
        assert advice.group(1) == listening.group(1)  # the port to forward is the one it listens on
        client = subprocess.run([*bed.prefix("client"), sys.executable, str(CLIENT), "nat", str(path),
                                 *swarm.initial_peers],
                                capture_output=True, text=True, timeout=300)
        assert client.returncode == 0, client.stderr[-3000:]
        report = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        swarm.stop()
    assert report["tokens_equal"]
    assert report["chain"] == ["outside-0_4-1", "home-4_8-2"]
    assert report["records"] == {"outside-0_4-1": "direct", "home-4_8-2": "relayed"}
    assert report["health"] == report["records"]


def test_over_slow_links_a_step_is_one_message_from_the_client(bed, tiny_checkpoints, tmp_path):
    """50 ms one way on every link (the bed's delaying proxy): hand-off still takes one message per
    step from the client, and the tokens are exact. (How long a token takes: scripts/bench wan.)"""
    path = tiny_checkpoints["llama"]
    bed.delay(50)
    swarm = LocalSwarm(tmp_path, node_args=["--num-threads", "1", "--throughput", "1000"])
    try:
        swarm.start_dht(prefix=bed.prefix("public"), host_maddr=f"/ip4/{bed.address('public')}/tcp/0")
        peers = []
        for place, span in zip(["n1", "n2", "n3"], ["0:3", "3:6", "6:8"]):
            peers += swarm.start_nodes(path, [span], "--host-maddrs", f"/ip4/{bed.address(place)}/tcp/0",
                                       prefix=bed.prefix(place), name=place)
        client = subprocess.run([*bed.prefix("client"), sys.executable, str(CLIENT), "steps", str(path), *peers,
                                 "--", *swarm.initial_peers], capture_output=True, text=True, timeout=300)
        assert client.returncode == 0, client.stderr[-3000:]
        report = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        swarm.stop()
    assert report["tokens_equal"]
    assert report["client_messages"] == report["steps"]  # one per step, not one per hop
