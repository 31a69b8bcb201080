"""A node's operator sees it work: Prometheus metrics that rise with served tokens, and a status line."""
import re
import time
import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families

from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {sample.name: sample for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_parse_and_rise_with_served_tokens(tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    peer = swarm.start_nodes(path, ["0:8"], "--metrics-port", "0", "--announce-period", "1")[0]
    log = lambda: "".join(swarm.children[-1].lines)  # noqa: E731
    port = int(re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", log()).group(1))
    before = scrape(port)
    assert before["potluck_node_info"].labels["peer_id"] == peer
    assert before["potluck_node_info"].labels["blocks"] == "0:8" and before["potluck_node_open_sessions"].value == 0
    assert before["potluck_node_info"].labels["quant"] == "none"
    assert before["potluck_node_peers_silent"].value == 0
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection)
        remote.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=6, do_sample=False)
    finally:
        connection.close()
    after = scrape(port)
    assert after["potluck_node_tokens_total"].value == before["potluck_node_tokens_total"].value + 4 + 5
    assert after["potluck_node_steps_total"].value > before["potluck_node_steps_total"].value
    assert after["potluck_node_inference_steps_per_second"].value > 0
    status = re.compile(r"blocks 0:8 online: \d+ sessions open, 9 tokens served, cache \d+/\d+ tokens reserved")
    deadline = time.monotonic() + 10  # a status line each announce period (1 s here)
    while not status.search(log()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status.search(log()), log()[-2000:]
