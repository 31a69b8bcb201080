"""`scripts/bench lmhead`: the client's lm_head, its weight packed for oneDNN or not.

Two measurements, each alternating the two heads so both meet the same moment of a shared
machine: the lm_head and token choice of a decoding round as `potluck serve` runs it
(``DecodeLoop._choices``: final norm, lm_head, greedy token) for 1, 8 and 32 rows on 1 and on
every thread of this machine, ms per round (median); and `generate` through a 1-node swarm,
ms per token (median over --repeats of each head).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import types
from pathlib import Path

import torch

from bench_swarm import bench_swarm
from potluck.client.decode_loop import DecodeLoop
from potluck.client.model import AutoDistributedModelForCausalLM
from potluck.client.packed_head import PackedHead
from potluck.client.transport import SwarmConnection
from potluck.protocol.checkpoint import resolve_checkpoint

logger = logging.getLogger("bench")
ROWS = (1, 8, 32)
CALLS = 30  # timed rounds per head, rows and threads


def run_lmhead(path: Path, ids: torch.Tensor, args: argparse.Namespace, workdir: Path) -> dict:
    swarm, conn = bench_swarm(workdir, args.node_threads), None
    try:
        swarm.start_dht()
        blocks = resolve_checkpoint(str(path)).num_blocks
        swarm.start_nodes(path, [(0, blocks)], name="lmhead")
        conn = SwarmConnection(swarm.initial_peers)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=conn)
        packed = model.lm_head
        if not isinstance(packed, PackedHead):
            raise RuntimeError("this machine's torch did not pack the lm_head (see client/packed_head.py)")
        plain = torch.nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None)
        plain.weight, plain.bias = packed.weight, packed.bias
        heads = {"packed": packed, "plain": plain}
        rounds = _rounds(model, heads)
        logger.info("generate through 1 node, each head %d times, alternating", args.repeats)
        per_token = _generates(model, heads, ids, args)
    finally:
        if conn is not None:
            conn.close()
        swarm.stop()
    return {"model": path.name, "vocab": packed.out_features, "hidden": packed.in_features,
            "round_ms": rounds, "generate_ms_per_token": per_token, "new_tokens": args.new_tokens,
            "repeats": args.repeats}


def _rounds(model, heads: dict[str, torch.nn.Module]) -> list[dict]:
    """``DecodeLoop._choices`` with each head: ms per round, median of CALLS."""
    loop = types.SimpleNamespace(model=model)  # all _choices reads of its loop
    results = []
    threads_before = torch.get_num_threads()
    try:
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            for rows in ROWS:
                last = torch.randn(rows, heads["packed"].in_features, generator=torch.Generator().manual_seed(rows))
                times = {name: [] for name in heads}
                with torch.no_grad():
                    for _ in range(3 + CALLS):  # the first 3 of each warm up
                        for name, head in heads.items():
                            model.lm_head = head
                            began = time.perf_counter()
                            DecodeLoop._choices(loop, last, [])
                            times[name].append(time.perf_counter() - began)
                result = {"threads": threads, "rows": rows}
                result.update({f"{name}_ms": round(statistics.median(t[3:]) * 1e3, 2) for name, t in times.items()})
                logger.info("lm_head round: %s", result)
                results.append(result)
    finally:
        torch.set_num_threads(threads_before)
        model.lm_head = heads["packed"]
    return results


def _generates(model, heads: dict[str, torch.nn.Module], ids: torch.Tensor, args: argparse.Namespace) -> dict:
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    times = {name: [] for name in heads}
    for _ in range(1 + args.repeats):  # the first of each warms up
        for name, head in heads.items():
            model.lm_head = head
            began = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
            times[name].append((time.perf_counter() - began) / args.new_tokens * 1e3)
    model.lm_head = heads["packed"]
    return {name: round(statistics.median(t[1:]), 2) for name, t in times.items()}
