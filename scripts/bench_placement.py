"""``scripts/bench placement``: nodes that place themselves, measured with real processes on loopback.

- start to ONLINE: a node on every block of the default model (SmolLM2-135M-Instruct), with no
  speed in its cache folder (it measures itself) and restarted (it announces the speed it
  measured before), alternately, --repeats times each;
- balance: four nodes with ``--num-blocks 4`` and no span start together on a 9-block model; after
  they settle (no move for two balance periods), the weakest block's total announced throughput
  over the mean of all blocks (1.0 is perfect balance);
- re-cover: then a node that alone serves some block is stopped (SIGTERM); the time from the
  signal to every block being served by an ONLINE node again, read from the DHT every 0.2 s.
"""
from __future__ import annotations

import logging
import os
import signal
import statistics
import time
from pathlib import Path

from bench_swarm import bench_swarm
from potluck.client.transport import SwarmConnection
from potluck.node.local_swarm import make_tiny_checkpoint
from potluck.node.placement import block_throughputs
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.directory import read_block_records
from potluck.protocol.records import NodeState

logger = logging.getLogger("bench")
BLOCKS, NODES, NODE_BLOCKS = 9, 4, 4


def run_placement(args, workdir: Path) -> dict:
    path = make_tiny_checkpoint("llama", workdir / "llama-9", hidden=256, layers=BLOCKS, vocab=32000, heads=8,
                                kv_heads=8, intermediate=1024)
    default_model = resolve_checkpoint(None)  # from the usual cache folder, before it is replaced
    os.environ["POTLUCK_CACHE"] = str(workdir / "cache")  # the nodes' throughput cache
    startup = start_to_online(default_model, args, workdir / "startup")
    trials = [balance_and_recover(path, args, workdir / f"trial-{i}") for i in range(args.repeats)]
    ratios = [t["weakest_over_mean"] for t in trials]
    recover = [t["recover_s"] for t in trials]
    return {"blocks": BLOCKS, "nodes": NODES, "node_blocks": NODE_BLOCKS, "balance_period_s": args.balance_period,
            "start_to_online_s": startup, "trials": trials,
            "weakest_over_mean": {"median": statistics.median(ratios), "min": min(ratios),
                                  "best_possible_at_equal_speeds": round((NODES * NODE_BLOCKS // BLOCKS) /
                                                                         (NODES * NODE_BLOCKS / BLOCKS), 3)},
            "recover_s": {"median": statistics.median(recover), "max": max(recover)}}


def start_to_online(checkpoint, args, logs: Path) -> dict:
    logs.mkdir()
    swarm, seconds = bench_swarm(logs, args.node_threads), {"fresh_measurement": [], "cached_speed": []}
    speeds = Path(os.environ["POTLUCK_CACHE"]) / "throughput.json"
    try:
        swarm.start_dht()
        for _ in range(args.repeats):
            speeds.unlink(missing_ok=True)
            for run in seconds:
                began = time.monotonic()
                peer = swarm.start_nodes(checkpoint.path, [f"0:{checkpoint.num_blocks}"], name=run)[0]
                seconds[run].append(round(time.monotonic() - began, 2))
                swarm.nodes[peer].send_signal(signal.SIGINT)
                swarm.nodes[peer].wait(60)
                logger.info("start to ONLINE, %s: %.2f s", run, seconds[run][-1])
    finally:
        swarm.stop()
    return {"model": checkpoint.name, "blocks": checkpoint.num_blocks,
            **{run: {"median": statistics.median(s), "all": s} for run, s in seconds.items()}}


def balance_and_recover(path: Path, args, logs: Path) -> dict:
    logs.mkdir()
    swarm, conn = bench_swarm(logs, args.node_threads), None
    period = args.balance_period
    try:
        swarm.start_dht()
        peers = swarm.start_nodes(path, [None] * NODES, "--num-blocks", str(NODE_BLOCKS), "--balance-period",
                                  str(period), "--announce-period", str(period), name="auto")
        conn = SwarmConnection(swarm.initial_peers)
        settled = wait_settled(swarm, period)
        records = online(conn)
        totals = block_throughputs(records, BLOCKS, 0.0)
        leaving = next(p for p in peers if alone(records, p))
        began = time.monotonic()
        swarm.nodes[leaving].send_signal(signal.SIGTERM)
        while time.monotonic() - began < 20 * period:
            after = online(conn)
            covered = set().union(*(range(r.start, r.end) for p, r in after.items() if p != leaving))
            if covered == set(range(BLOCKS)):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"blocks not covered again after {20 * period:.0f} s; logs in {logs}")
        recover = round(time.monotonic() - began, 2)
        logger.info("weakest/mean %.2f; re-covered in %.1f s", min(totals) / statistics.mean(totals), recover)
        return {"spans": sorted(f"{r.start}:{r.end}" for r in records.values()),
                "steps_per_s": sorted(round(r.inference_steps_per_s, 1) for r in records.values()),
                "settle_s": settled, "weakest_over_mean": round(min(totals) / statistics.mean(totals), 3),
                "left": f"{records[leaving].start}:{records[leaving].end}", "recover_s": recover,
                "spans_after": sorted(f"{r.start}:{r.end}" for p, r in after.items() if p != leaving)}
    finally:
        if conn is not None:
            conn.close()
        swarm.stop()


def wait_settled(swarm, period: float) -> float:
    """Seconds until no node has logged a move for two balance periods."""
    began = last_move = time.monotonic()
    moves = 0
    while time.monotonic() - last_move < 2 * period:
        time.sleep(0.5)
        now = sum("moving from blocks" in line for child in swarm.children for line in child.lines)
        if now != moves:
            moves, last_move = now, time.monotonic()
    return round(last_move - began, 2)


def online(conn: SwarmConnection) -> dict:
    records = conn.call(read_block_records(conn.dht, "llama-9", BLOCKS), timeout=30)
    return {p: r for p, r in records.items() if r.state == NodeState.ONLINE}


def alone(records: dict, peer: str) -> bool:
    """Whether ``peer`` serves some block that no other node serves."""
    others = set().union(*(range(r.start, r.end) for p, r in records.items() if p != peer))
    return bool(set(range(records[peer].start, records[peer].end)) - others)
