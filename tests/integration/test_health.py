"""`potluck health` on a real local swarm: the JSON state, /metrics, and nodes that stop or die."""
from __future__ import annotations

import contextlib
import json
import selectors
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import potluck_command

PERIOD = 3.0  # the nodes' announce period: one record period


@contextlib.contextmanager
def running_dashboard(initial_peers: list[str], log: Path, timeout: float = 60) -> Iterator[str]:
    """A `potluck health` process on a free port; yields its URL and stops it (SIGINT, then SIGKILL)."""
    args = ["health", "--initial-peers", *initial_peers, "--port", "0", "--refresh", "1", "--probe-timeout", "1"]
    with open(log, "w") as err:
        proc = subprocess.Popen(potluck_command(*args), stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            deadline, line = time.monotonic() + timeout, ""
            while not line.startswith("POTLUCK_HEALTH_URL=") and time.monotonic() < deadline and proc.poll() is None:
                line = proc.stdout.readline() if selector.select(timeout=0.5) else ""
        if not line.startswith("POTLUCK_HEALTH_URL="):
            raise RuntimeError(f"potluck health did not start:\n{log.read_text()[-3000:]}")
        yield line.strip().split("=", 1)[1]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def wait_for(url: str, check: Callable[[dict], bool], timeout: float) -> tuple[dict, float]:
    """Poll /api/v1/state until ``check`` holds; returns the state and the seconds it took."""
    began = time.monotonic()
    while True:
        state = json.loads(get(url + "/api/v1/state"))
        if check(state):
            return state, time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError(f"not reached within {timeout} s; last state:\n{json.dumps(state, indent=1)[:4000]}")
        time.sleep(0.2)


def model_of(state: dict) -> dict | None:
    return state["models"][0] if state["models"] else None


def nodes_of(state: dict) -> dict[str, dict]:
    model = model_of(state)
    return {n["peer_id"]: n for n in model["nodes"]} if model else {}


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, swarm_factory, tmp_path_factory):
    swarm = swarm_factory()
    peers = swarm.start_nodes(tiny_checkpoints["llama"], ["0:4", "4:8", "0:8"], "--announce-period", str(PERIOD))
    with running_dashboard(swarm.initial_peers, tmp_path_factory.mktemp("health") / "health.log") as url:
        yield swarm, dict(zip(["first", "second", "whole"], peers)), url


def test_state_lists_the_models_nodes_and_spans(setup):
    swarm, peers, url = setup
    everyone_answers = lambda s: len(nodes_of(s)) == 3 and all(  # noqa: E731
        n["ping_s"] is not None and n["pings"] for n in nodes_of(s).values())
    state, _ = wait_for(url, everyone_answers, timeout=60)
    model = model_of(state)
    assert [m["name"] for m in state["models"]] == ["tiny-llama"]
    assert (model["family"], model["num_blocks"], model["usable"], model["missing_blocks"]) == ("llama", 8, True, [])
    assert [b["online"] for b in model["blocks"]] == [2] * 8 and model["replicas"] == {"0": 0, "1": 0, "2+": 8}
    nodes = nodes_of(state)
    assert {p: (nodes[p]["start"], nodes[p]["end"]) for p in nodes} == {
        peers["first"]: (0, 4), peers["second"]: (4, 8), peers["whole"]: (0, 8)}
    for node in nodes.values():
        assert node["status"] == "online" and node["name"].startswith("tiny-llama-")
        assert (node["dtype"], node["quant"]) == ("float32", "none") and node["version"]
        assert node["connection"] == "direct"
        assert node["cache_tokens_left"] > 0 and node["inference_steps_per_s"] > 0 and node["expires_in_s"] > 0
        assert isinstance(node["tokens_served"], int) and 0 < node["ping_s"] < 5
        assert {p["peer_id"] for p in node["pings"]} <= set(peers.values()) - {node["peer_id"]}
    assert state["totals"]["nodes"] == 3 and state["totals"]["blocks_covered"] == 8
    assert state["crawl"]["crawls"] >= 1 and state["crawl"]["last_error"] is None and state["updated_at"] > 0


def test_metrics_parse_with_prometheus_client(setup):
    swarm, peers, url = setup
    families = {f.name: f for f in text_string_to_metric_families(get(url + "/metrics").decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("potluck_nodes", (("model", "tiny-llama"), ("status", "online")))] == 3
    assert samples[("potluck_blocks", (("model", "tiny-llama"), ("replicas", "2+")))] == 8
    assert samples[("potluck_model_usable", (("model", "tiny-llama"),))] == 1
    cache = {s.labels["peer_id"] for s in families["potluck_node_cache_tokens_left"].samples}
    assert cache == set(peers.values())
    assert len(families["potluck_node_inference_steps_per_second"].samples) == 3
    assert samples[("potluck_crawl_duration_seconds", ())] > 0


def test_the_page_and_its_script_are_served(setup):
    swarm, peers, url = setup
    page = get(url + "/").decode()
    assert 'src="page.js"' in page and 'href="page.css"' in page
    assert b"api/v1/state" in get(url + "/page.js")


def generate_through(initial_peers: list[str], path: Path, new_tokens: int = 4) -> None:
    """A short greedy generation through the swarm, so that nodes have served tokens."""
    import torch

    from potluck import AutoDistributedModelForCausalLM
    from potluck.client.transport import SwarmConnection

    connection = SwarmConnection(initial_peers)
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection)
        ids = torch.tensor([[1, 2, 3, 4]])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    finally:
        connection.close()


def test_tokens_served_appear_after_a_generation(setup, tiny_checkpoints):
    swarm, peers, url = setup
    generate_through(swarm.initial_peers, tiny_checkpoints["llama"])  # a 4-token prompt, then 3 one-token steps
    state, _ = wait_for(url, lambda s: (s["totals"]["tokens_served"] or 0) >= 7, timeout=30)
    assert sum(n["tokens_served"] for n in nodes_of(state).values()) == state["totals"]["tokens_served"]


def test_a_stopped_node_changes_its_blocks_within_two_record_periods(setup):
    swarm, peers, url = setup
    wait_for(url, lambda s: all(b["online"] == 2 for b in model_of(s)["blocks"]), timeout=30)
    swarm.nodes[peers["second"]].send_signal(signal.SIGINT)  # graceful: announces DRAINING, then OFFLINE
    state, took = wait_for(url, lambda s: [b["online"] for b in model_of(s)["blocks"]] == [2] * 4 + [1] * 4,
                           timeout=10 * PERIOD)
    print(f"\nblocks 4:8 of a stopped node changed state after {took:.1f} s (record period {PERIOD} s)")
    assert nodes_of(state)[peers["second"]]["status"] in ("draining", "offline")
    assert took < 2 * PERIOD
    assert swarm.nodes[peers["second"]].wait(30) == 0


def test_a_killed_node_turns_unreachable_then_stale(setup):
    swarm, peers, url = setup
    swarm.nodes[peers["first"]].kill()  # no goodbye: its record stays until it expires
    state, took = wait_for(url, lambda s: [b["online"] for b in model_of(s)["blocks"]][:4] == [1] * 4,
                           timeout=10 * PERIOD)
    print(f"\nblocks 0:4 of a killed node changed state after {took:.1f} s (record period {PERIOD} s)")
    assert nodes_of(state)[peers["first"]]["status"] in ("unreachable", "stale")
    assert took < 2 * PERIOD
    state, _ = wait_for(url, lambda s: nodes_of(s)[peers["first"]]["status"] == "stale", timeout=10 * PERIOD)
    assert nodes_of(state)[peers["first"]]["expires_in_s"] < 0
    assert nodes_of(state)[peers["whole"]]["status"] == "online"
    assert model_of(state)["usable"]  # the whole-model node still covers every block


def test_a_swarm_gone_whole_is_a_failing_crawl_not_a_healthy_one(setup):  # last: it stops the swarm
    swarm, _, url = setup
    before = json.loads(get(url + "/api/v1/state"))["crawl"]
    for process in [child.proc for child in swarm.children] + list(swarm.nodes.values()):
        process.kill()  # the bootstrap peer and every node, without a word
    state, took = wait_for(url, lambda s: s["crawl"]["failures"] > before["failures"], timeout=60)
    print(f"\nthe dashboard's crawl failed {took:.1f} s after the swarm was killed")
    assert "no DHT peer is left" in state["crawl"]["last_error"], state["crawl"]
