"""Run by tests/integration/test_wan.py inside the client's network namespace; prints one JSON line.

    wan_client.py relay PATH INITIAL_PEERS...   generate 4 tokens through the swarm, print "paused"
        and wait for a line on stdin (the test kills the relay then), generate 8 more in the same
        session: whether the tokens equal local transformers', the chain before and after, and what
        the node records and the health crawler say about each node's reachability
    wan_client.py steps PATH PEER... -- INITIAL_PEERS...   generate in one session: whether the
        tokens equal local transformers', steps taken, and the messages the client sent the nodes
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.client.health.crawler import Crawler
from potluck.client.health.view import state_json
from potluck.client.transport import SwarmConnection


def relay(path: str, initial_peers: list[str]) -> dict:
    connection = SwarmConnection(initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm=connection)
        ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
        with remote.inference_session(max_length=32) as session:
            part = remote.generate(ids, max_new_tokens=4, do_sample=False)
            before = [hop.record.public_name for hop in session.hops]
            records = {r.public_name: r.reachability for r in remote.swarm_view.records.values()}
            crawler = Crawler(connection)
            connection.call(crawler.crawl_once())
            state = connection.call(crawler.probe_once())
            health = {n["name"]: n["reachability"] for m in state_json(state)["models"] for n in m["nodes"]}
            print("paused", flush=True)
            sys.stdin.readline()
            got = remote.generate(part, max_new_tokens=8, do_sample=False)
            after = [hop.record.public_name for hop in session.hops]
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        return {"tokens_equal": torch.equal(got, local.generate(ids, max_new_tokens=12, do_sample=False)),
                "before": before, "after": after, "health": health, "records": records}
    finally:
        connection.close()


def steps(path: str, peers: list[str], initial_peers: list[str]) -> dict:
    connection = SwarmConnection(initial_peers)

    def client_messages() -> int:
        return sum(connection.call(connection.info(peer, timeout=30))[0].counters.get("client_messages", 0)
                   for peer in peers)

    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm=connection, request_timeout=30.0)
        ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(1))
        with remote.inference_session(max_length=32):
            remote.generate(ids, max_new_tokens=2, do_sample=False)  # opens the chain
            before = client_messages()
            got = remote.generate(ids, max_new_tokens=8, do_sample=False)
            sent = client_messages() - before
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        return {"tokens_equal": torch.equal(got, local.generate(ids, max_new_tokens=8, do_sample=False)),
                "steps": 8, "client_messages": sent}
    finally:
        connection.close()


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        print(json.dumps(relay(sys.argv[2], sys.argv[3:])), flush=True)
    else:
        split = sys.argv.index("--")
        print(json.dumps(steps(sys.argv[2], sys.argv[3:split], sys.argv[split + 1:])), flush=True)
