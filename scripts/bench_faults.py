"""``scripts/bench failover``: what a user sees when nodes die, and how sessions spread over replicas.

- death to next token: a greedy generation through two replicas of each span; after the 10th
  token the node serving the chain's last hop is killed (SIGKILL) or frozen (SIGSTOP); we time
  the gap from that moment to the next token, against the usual gap between tokens;
- replica share: 16 clients open sessions a quarter second apart (each holding its session
  while it generates), after the nodes' first re-announcement; each node's counters say how
  many sessions it got.
"""
from __future__ import annotations

import logging
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from bench_swarm import bench_swarm
from potluck.client.swarm_view import FailoverPolicy
from potluck.client.model import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection

logger = logging.getLogger("bench")
SPANS = [(0, 4), (4, 8), (0, 4), (4, 8)]  # two replicas of each span
KILL_AFTER = 10  # tokens
ANNOUNCE_PERIOD = 2.0  # seconds, for the replica-share run


class TokenClock(LogitsProcessor):
    """Timestamps every token choice; runs ``action`` once, after ``after`` tokens."""

    def __init__(self, after: int, action):
        self.after, self.action, self.stamps, self.acted_at = after, action, [], None

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.after + 1:
            self.acted_at = time.perf_counter()
            self.action()
        return scores


def one_fault(path: Path, ids: torch.Tensor, expected: torch.Tensor, how: str, logs: Path, threads: int) -> dict:
    swarm, conn, frozen = bench_swarm(logs, threads), None, []
    try:
        maddr = swarm.start_dht()
        pids = {peer: swarm.nodes[peer].pid for peer in swarm.start_nodes(path, SPANS, name="bench")}
        conn = SwarmConnection([maddr])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=conn)
        with model.inference_session(max_length=ids.shape[1] + 64) as session:
            def fault() -> None:
                pid = pids[session.hops[-1].peer_id]
                os.kill(pid, getattr(signal, how))
                frozen.append(pid) if how == "SIGSTOP" else None

            clock = TokenClock(KILL_AFTER, fault)
            out = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                 logits_processor=LogitsProcessorList([clock]))
            failovers = session.failovers
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        if conn is not None:
            conn.close()
        swarm.stop()
    gaps = [b - a for a, b in zip(clock.stamps[1:], clock.stamps[2:])]
    return {"fault": how, "ms_to_next_token": round((clock.stamps[KILL_AFTER + 1] - clock.acted_at) * 1e3, 1),
            "usual_ms_per_token": round(statistics.median(gaps) * 1e3, 2), "failovers": failovers,
            "tokens_match_local": bool(torch.equal(out, expected))}


def replica_share(path: Path, ids: torch.Tensor, logs: Path, threads: int, clients: int = 16) -> dict:
    swarm, conn = bench_swarm(logs, threads), None
    try:
        maddr = swarm.start_dht()
        nodes = swarm.start_nodes(path, SPANS, "--announce-period", str(ANNOUNCE_PERIOD), name="bench")
        conn = SwarmConnection([maddr])
        models = [AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=conn) for _ in range(clients)]
        outputs: dict[int, torch.Tensor] = {}
        time.sleep(ANNOUNCE_PERIOD * 1.5)  # nodes re-measure their speed once idle, away from startup noise

        def run(i: int) -> None:
            outputs[i] = models[i].generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)

        threads_ = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for t in threads_:
            t.start()
            time.sleep(0.25)
        for t in threads_:
            t.join(300)
        opened = {}
        for peer, (start, end) in zip(nodes, SPANS):
            info, _ = conn.call(conn.info(peer, timeout=30))
            opened.setdefault(f"{start}:{end}", []).append(int(info.counters.get("sessions_opened", 0)))
    finally:
        if conn is not None:
            conn.close()
        swarm.stop()
    return {"clients": clients, "sessions_per_replica": opened,
            "all_outputs_equal": all(torch.equal(outputs[0], o) for o in outputs.values()) and len(outputs) == clients}


def run_failover(path: Path, ids: torch.Tensor, args, workdir: Path) -> dict:
    expected = AutoModelForCausalLM.from_pretrained(path).generate(ids, max_new_tokens=64, min_new_tokens=64,
                                                                   do_sample=False)
    faults = []
    for i, how in enumerate(["SIGKILL"] * max(1, args.repeats - 1) + ["SIGSTOP"]):
        logger.info("fault %d: %s after token %d", i, how, KILL_AFTER)
        (workdir / f"fault{i}").mkdir()
        faults.append(one_fault(path, ids, expected, how, workdir / f"fault{i}", args.node_threads))
    (workdir / "share").mkdir()
    logger.info("replica share under 16 concurrent clients")
    share = replica_share(path, ids, workdir / "share", args.node_threads)
    killed = [f["ms_to_next_token"] for f in faults if f["fault"] == "SIGKILL"]
    return {"default_request_timeout_s": FailoverPolicy().request_timeout, "faults": faults,
            "sigkill_ms_to_next_token_median": statistics.median(killed), "replica_share": share,
            "targets": {"sigkill_next_token_under_2s": max(killed) < 2000,
                        "all_tokens_match_local": all(f["tokens_match_local"] for f in faults)}}
