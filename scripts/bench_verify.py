"""``scripts/bench verify``: what checking steps against other replicas costs, and what it catches.

A swarm of five honest nodes over the tiny Llama (three replicas of blocks 0:4, two of 4:8, so a
third opinion exists) and one client process. For verify = 0, 0.05 and 1: greedy generations of
--new-tokens tokens, tokens per second (median over --repeats), whether they equal local
transformers', and the verification counters. Then a sixth node that adds noise (half its outputs'
RMS) to everything joins with blocks 0:4 and a fresh client whose routing prefers it generates
--repeats times per share: how many answers were exact, how many tokens matched local before the
first wrong one, and how often the node was banned.
"""
from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch
import transformers

from bench_swarm import bench_swarm
from potluck.client.model import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection

SHARES = (0.0, 0.05, 1.0)


def run_verify(path: Path, ids: torch.Tensor, args, workdir: Path) -> dict:
    swarm = bench_swarm(workdir, args.node_threads)
    connection = None
    try:
        swarm.start_dht()
        honest = swarm.start_nodes(path, ["0:4", "0:4", "0:4", "4:8", "4:8"], name="bench")
        connection = SwarmConnection(swarm.initial_peers)
        local = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        new = args.new_tokens
        expected = local.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, ids.shape[1]:]

        def client(share: float, seed: int):
            model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection, verify=share)
            model.swarm_view.rng = random.Random(seed)
            return model

        def generated(model) -> torch.Tensor:
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            return out[0, ids.shape[1]:]

        honest_runs = {}
        for share in SHARES:
            model = client(share, seed=0)
            generated(model)  # warm-up: routes, streams
            times, exact = [], True
            for _ in range(args.repeats):
                began = time.perf_counter()
                exact &= torch.equal(generated(model), expected)
                times.append(time.perf_counter() - began)
            honest_runs[str(share)] = {"tokens_per_s": round(new / statistics.median(times), 2),
                                       "tokens_match_local": exact, "counts": dict(model.swarm_view.verify_counts)}
        noisy = swarm.start_nodes(path, ["0:4"], "--test-corrupt-outputs", "0.5", name="noisy")[0]
        caught = {}
        for share in SHARES:
            matched, exact, banned = [], 0, 0
            for seed in range(args.repeats):
                model = client(share, seed)
                model.swarm_view.costs.local_sessions.update({peer: 1000 for peer in honest[:3]})  # route via noisy
                got = generated(model)
                same = (got == expected).long().cumprod(0).sum()
                matched.append(int(same))
                exact += int(same) == new
                banned += noisy in model.swarm_view.banned
            caught[str(share)] = {"runs": args.repeats, "exact_answers": exact, "noisy_node_banned": banned,
                                  "tokens_matching_local_before_the_first_wrong_one": matched}
        return {"new_tokens": new, "prompt_tokens": ids.shape[1], "repeats": args.repeats,
                "honest_swarm": honest_runs, "with_a_noisy_node": caught}
    finally:
        if connection is not None:
            connection.close()
        swarm.stop()
