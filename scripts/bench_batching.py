"""``scripts/bench batching``: many people at once through a 2-node swarm, from client processes.

For 1, 8 and 32 concurrent greedy sessions (--concurrency), with the nodes batching decoding steps
(``--max-batch-sessions 64``) and not (``1``): aggregate tokens per second (all sessions' new
tokens over the wall time from the first start to the last finish), the p50 and p90 time between
two tokens of one session, the nodes' mean decoding batch size (rows / batches from their
counters), and whether every session's tokens equal local transformers'. Sessions are spread over
up to 4 client processes (threads inside each), released together.
"""
from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import transformers

from bench_swarm import bench_swarm
from potluck.client.transport import SwarmConnection
from potluck.node.swarm import split_evenly

logger = logging.getLogger("bench")
PROCESSES = 4


def prompt(seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 8 + seed % 8), generator=torch.Generator().manual_seed(seed))


def run_batching(path: Path, args, workdir: Path) -> dict:
    config = transformers.AutoConfig.from_pretrained(path)
    levels = [int(n) for n in args.concurrency.split(",")]
    local = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    expected = {seed: local.generate(prompt(seed, config.vocab_size), max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False)[0].tolist()
                for seed in range(max(levels))}
    del local
    results = []
    for batching in (True, False):
        logs = workdir / f"batching-{'on' if batching else 'off'}"
        logs.mkdir()
        swarm, conn = bench_swarm(logs, args.node_threads), None
        try:
            swarm.start_dht()
            peers = swarm.start_nodes(path, split_evenly(config.num_hidden_layers, 2), "--max-batch-sessions",
                                      "64" if batching else "1", name="bench")
            conn = SwarmConnection(swarm.initial_peers)
            for n in levels:
                before = [_counters(conn, p) for p in peers]
                run = concurrent_sessions(path, swarm.initial_peers, n, args.new_tokens, config.vocab_size)
                after = [_counters(conn, p) for p in peers]
                run["batching"] = batching
                tokens = run.pop("tokens")
                run["tokens_match_local"] = all(tokens[s] == expected[s] for s in range(n))
                run["mean_batch_size"] = [round(_ratio(a, b, "decode_rows", "decode_batches"), 2)
                                          for a, b in zip(after, before)]
                logger.info("batching %s, %d sessions: %.1f tokens/s, p50 %.1f ms", "on" if batching else "off",
                            n, run["tokens_per_s"], run["ms_between_tokens"]["p50"])
                results.append(run)
        finally:
            if conn is not None:
                conn.close()
            swarm.stop()
    by = {(r["batching"], r["sessions"]): r for r in results}
    top = max(levels)
    one = by[(True, 1)] if 1 in levels else None
    summary = {}
    if one is not None:
        summary[f"speedup_{top}_vs_1"] = round(by[(True, top)]["tokens_per_s"] / one["tokens_per_s"], 2)
        summary[f"p50_latency_{top}_vs_1"] = round(by[(True, top)]["ms_between_tokens"]["p50"]
                                                   / one["ms_between_tokens"]["p50"], 2)
    summary[f"batching_gain_at_{top}"] = round(by[(True, top)]["tokens_per_s"] / by[(False, top)]["tokens_per_s"], 2)
    return {"model": path.name, "new_tokens": args.new_tokens, "results": results, "summary": summary}


def concurrent_sessions(path: Path, peers: list[str], n: int, new_tokens: int, vocab: int) -> dict:
    seeds = list(range(n))
    groups = [seeds[i::PROCESSES] for i in range(min(PROCESSES, n))]
    workers = [subprocess.Popen([sys.executable, __file__, str(path), ",".join(peers), json.dumps(group),
                                 str(new_tokens), str(vocab)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for group in groups]
    try:
        for worker in workers:
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError("a client process did not start")
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        sessions = {}
        for worker in workers:
            out, _ = worker.communicate(timeout=1800)
            sessions.update({int(seed): s for seed, s in json.loads(out).items()})
    finally:
        for worker in workers:
            worker.kill()
    began = min(s["stamps"][0] - s["first_token_s"] for s in sessions.values())
    ended = max(s["stamps"][-1] for s in sessions.values())
    gaps = [(b - a) * 1e3 for s in sessions.values() for a, b in zip(s["stamps"], s["stamps"][1:])]
    cuts = statistics.quantiles(gaps, n=10)
    return {"sessions": n, "tokens_per_s": round(n * new_tokens / (ended - began), 2),
            "ms_between_tokens": {"p50": round(statistics.median(gaps), 2), "p90": round(cuts[8], 2)},
            "tokens": {seed: s["tokens"] for seed, s in sessions.items()}}


def _counters(conn: SwarmConnection, peer: str) -> dict:
    return conn.call(conn.info(peer, timeout=30), timeout=35)[0].counters


def _ratio(after: dict, before: dict, rows: str, batches: str) -> float:
    count = after.get(batches, 0) - before.get(batches, 0)
    return (after.get(rows, 0) - before.get(rows, 0)) / count if count else 0.0


class _Clock(transformers.LogitsProcessor):
    """Stamps every token choice (wall clock: comparable across the client processes)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.time())
        return scores


def _worker() -> None:
    """One client process: greedy generations in threads, released by a line on stdin."""
    from potluck import AutoDistributedModelForCausalLM

    path, peers, seeds, new_tokens, vocab = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3]), \
        int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers)
    print("ready", flush=True)
    sys.stdin.readline()
    sessions = {}

    def generate(seed: int) -> None:
        clock, began = _Clock(), time.time()
        out = model.generate(prompt(seed, vocab), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, logits_processor=transformers.LogitsProcessorList([clock]))
        sessions[seed] = {"tokens": out[0].tolist(), "stamps": clock.stamps,
                          "first_token_s": clock.stamps[0] - began}

    threads = [threading.Thread(target=generate, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(sessions), flush=True)
    model.swarm_view.swarm.close()


if __name__ == "__main__":
    _worker()
