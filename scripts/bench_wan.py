"""``scripts/bench wan``: time per token through 3 hops over links with real-world latency.

Network namespaces on this machine (``node/netbed.py``; needs root, ``ip`` and ``nft``): the
bootstrap peer in one, three nodes of the tiny Llama (blocks 0:3, 3:6, 6:8) in three more, the
client in another; every link crossing the router is held --delays milliseconds one way by the
bed's delaying proxy. Per delay, the client generates --new-tokens greedy tokens --repeats times
with hand-off on and off: ms per token (median), against the bound of the path (hand-off: 4 one-way
trips, client → 3 hops → client; off: 3 round trips) plus the compute measured at 0 ms, the
client's messages per step (node counters) and exactness against local transformers. Then bytes
of hidden state the nodes receive per token with float32 and with bfloat16 nodes (a float32
client either way). Last, at the first non-zero delay, the last node sits behind the home router
and the client behind a firewall: neither can be dialled, so the client reaches that node only
through the relay on the bootstrap peer; the extra time of that hop, over one generate (libp2p's
default relay, which p2pd may run instead of its full one, resets a relayed connection after 128
KiB each way: see the README).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPANS = ["0:3", "3:6", "6:8"]
PLACES = ["n1", "n2", "n3"]


def run_wan(path: Path, args, workdir: Path) -> dict:
    from potluck.node.netbed import NetBed, unavailable

    why = unavailable()
    if why is not None:
        return {"skipped": why}
    delays = [float(d) for d in args.delays.split(",")]
    results, relayed, wire = [], None, {}
    with NetBed(extra=PLACES) as bed:
        for delay in delays:
            bed.delay(delay)
            for handoff in (True, False):
                results.append(_config(bed, path, args, workdir, delay, handoff, PLACES))
        bed.delay(0)
        for dtype in ("float32", "bfloat16"):
            found = _config(bed, path, args, workdir, 0, True, PLACES, "--dtype", dtype)
            wire[dtype] = found["hidden_bytes_per_token_per_hop"]
        first = next((d for d in delays if d > 0), None)
        if first is not None:
            bed.delay(first)
            bed.firewall("client")
            relayed = _config(bed, path, args, workdir, first, True, PLACES[:2] + ["home"], repeats=1)
            direct = next(r for r in results if r["delay_ms"] == first and r["handoff"])
            relayed["extra_ms_per_token_over_direct"] = round(relayed["ms_per_token"] - direct["ms_per_token"], 1)
    for r in results:  # against the path's bound plus what the same config costs without delay
        at_zero = next((z for z in results if z["delay_ms"] == 0 and z["handoff"] == r["handoff"]), None)
        if at_zero is not None:
            r["bound_with_compute_ms"] = round(r["path_bound_ms"] + at_zero["ms_per_token"], 1)
            r["times_bound"] = round(r["ms_per_token"] / r["bound_with_compute_ms"], 3)
    return {"bench_swarm_threads": args.node_threads, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "results": results, "relayed_last_hop": relayed, "hidden_bytes_per_token_per_hop": wire}


def _config(bed, path: Path, args, workdir: Path, delay: float, handoff: bool, places: list[str], *extra: str,
            repeats: int | None = None) -> dict:
    from bench_swarm import bench_swarm

    logs = workdir / f"wan-{delay:g}ms-{'handoff' if handoff else 'direct'}-{'-'.join(places)}{''.join(extra)}"
    logs.mkdir(parents=True, exist_ok=True)
    swarm = bench_swarm(logs, args.node_threads)
    try:
        public = f"/ip4/{bed.address('public')}/tcp/0"
        swarm.start_dht(prefix=bed.prefix("public"), host_maddr=public)
        started = [(place, span) for place, span in zip(places, SPANS)]
        peers = []
        for place, span in started:  # one at a time: each in its own namespace
            host = [] if place == "home" else ["--host-maddrs", f"/ip4/{bed.address(place)}/tcp/0"]
            peers += swarm.start_nodes(path, [span], *host, "--throughput", "1000", *extra, prefix=bed.prefix(place),
                                       name=place)
        if "home" in places:
            swarm.wait_for_line(peers[-1], "cannot connect to this node")
        client = subprocess.run(
            [*bed.prefix("client"), sys.executable, __file__, "client", str(path), str(int(handoff)),
             str(args.new_tokens), str(repeats or args.repeats), *peers, "--", *swarm.initial_peers],
            capture_output=True, text=True, timeout=1800)
        if client.returncode != 0:
            raise RuntimeError(f"the client failed: {client.stderr[-3000:]}")
        found = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        swarm.stop()
    hops = len(places)
    bound = (hops + 1) * delay if handoff else 2 * hops * delay  # one-way trips of a step
    return {"delay_ms": delay, "handoff": handoff, "nodes": places, "path_bound_ms": bound,
            "repeats": repeats or args.repeats, **found}


def _client(path: str, handoff: bool, new_tokens: int, repeats: int, peers: list[str], initial: list[str]) -> dict:
    import torch
    import transformers

    from potluck.client.model import AutoDistributedModelForCausalLM
    from potluck.client.transport import SwarmConnection
    from potluck.protocol import messages as msg

    connection = SwarmConnection(initial)

    def counters() -> dict:
        total: dict = {}
        for peer in peers:
            frame = connection.call(connection.request(peer, msg.INFO_HANDLER, {"type": "info"}, timeout=30))
            for name, value in frame.meta["counters"].items():
                total[name] = total.get(name, 0) + value
        return total

    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, swarm=connection, handoff=handoff,
                                                                request_timeout=30.0)
        ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
        local = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        expected = local.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: routes, streams, relays
        times, exact, before = [], True, counters()
        for _ in range(repeats):
            began = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - began)
            exact &= torch.equal(out, expected)
        after = counters()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        steps = repeats * new_tokens  # a prompt step and new_tokens - 1 one-token steps per generate
        stepping = delta.get("client_messages", 0) - 2 * delta.get("sessions_opened", 0)  # not opens and closes
        return {"ms_per_token": round(statistics.median(times) / new_tokens * 1e3, 1),
                "client_messages_per_step": round(stepping / steps, 2),
                "hidden_bytes_per_token_per_hop": round(delta.get("hidden_bytes_in", 0) / max(1, delta["tokens"]), 1),
                "tokens_match_local": exact}
    finally:
        connection.close()


if __name__ == "__main__" and sys.argv[1:2] == ["client"]:
    split = sys.argv.index("--")
    path, handoff, new_tokens, repeats, *peers = sys.argv[2:split]
    print(json.dumps(_client(path, handoff == "1", int(new_tokens), int(repeats), peers, sys.argv[split + 1:])))
