"""Run by tests/integration/test_wan.py inside the client's network namespace: generate through the
swarm and print, as one JSON line, whether the tokens equal local transformers' and what the
node records and the health dashboard's crawler say about each node's reachability."""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.client.health.crawler import Crawler
from potluck.client.health.view import state_json
from potluck.client.transport import SwarmConnection


def main(path: str, initial_peers: list[str]) -> dict:
    connection = SwarmConnection(initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm=connection)
        ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
        with remote.inference_session(max_length=32) as session:
            got = remote.generate(ids, max_new_tokens=12, do_sample=False)
            chain = [hop.record.public_name for hop in session.hops]
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        crawler = Crawler(connection)
        connection.call(crawler.crawl_once())
        state = connection.call(crawler.probe_once())
        health = {n["name"]: n["reachability"] for m in state_json(state)["models"] for n in m["nodes"]}
        return {"tokens_equal": torch.equal(got, local.generate(ids, max_new_tokens=12, do_sample=False)),
                "chain": chain, "health": health,
                "records": {r.public_name: r.reachability for r in remote.swarm_view.records.values()}}
    finally:
        connection.close()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])), flush=True)
