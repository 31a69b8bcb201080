"""``scripts/bench batching``: many people at once through a 2-node swarm.

For 1, 8 and 32 concurrent greedy sessions (--concurrency), with the nodes batching decoding steps
(``--max-batch-sessions 64``) and not (``1``), two ways in:
- ``clients``: sessions spread over up to 4 client processes (threads inside each), released
  together; every session's tokens are checked against local transformers';
- ``serve``: streaming completions through one ``potluck serve`` (the official ``openai`` client,
  one thread per request), --repeats times (5), the levels taking turns.
Reported: aggregate tokens per second (all new tokens over the wall time from the first start to
the last finish), the p50 and p90 time between two tokens of one request and to a request's first
token (for serve: medians over the repeats, each run's p50 beside them), and the nodes' mean
decoding batch size (rows / batches from their counters). The tiny model speaks SmolLM2's
tokenizer, so ``potluck serve`` can run it. ``--model 8b``: random weights of Llama-3.1-8B's shape
(``scripts/bench 8b``'s, with SmolLM2's tokenizer; ids past it decode to nothing) in bfloat16 on
``--device`` (a GPU: cuda by default), which the nodes, `potluck serve`, the client processes and
the local reference all use.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import transformers

from bench_swarm import bench_swarm, empty_device_cache
from potluck.client.transport import SwarmConnection
from potluck.node.swarm import split_evenly
from potluck.protocol.checkpoint import DTYPES

logger = logging.getLogger("bench")
PROCESSES = 4


def prompt(seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 8 + seed % 8), generator=torch.Generator().manual_seed(seed))


def run_batching(path: Path, args, workdir: Path) -> dict:
    config = transformers.AutoConfig.from_pretrained(path)
    levels = [int(n) for n in args.concurrency.split(",")]
    local = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).to(args.device).eval()
    expected = {seed: local.generate(prompt(seed, config.vocab_size).to(args.device), max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False)[0].tolist()
                for seed in range(max(levels))}
    del local
    empty_device_cache(args.device)
    results = []
    for batching in (True, False):
        logs = workdir / f"batching-{'on' if batching else 'off'}"
        logs.mkdir()
        swarm, conn = bench_swarm(logs, args.node_threads), None
        try:
            swarm.start_dht()
            peers = swarm.start_nodes(path, split_evenly(config.num_hidden_layers, 2), "--max-batch-sessions",
                                      "64" if batching else "1", "--device", args.device, "--dtype", args.dtype,
                                      name="bench")
            conn = SwarmConnection(swarm.initial_peers)
            serve, base_url = _start_serve(path, swarm.initial_peers, logs, args.device)
            try:
                for way in ("clients", "serve"):
                    for n, run in _measured(levels, args.repeats if way == "serve" else 1, peers, conn,
                                            lambda n: _one_run(way, n, path, swarm, base_url, args, config, expected)):
                        run.update(way=way, batching=batching)
                        logger.info("%s, batching %s, %d at once: %.1f tokens/s, p50 %.1f ms, first token p50 %.1f ms",
                                    way, "on" if batching else "off", n, run["tokens_per_s"],
                                    run["ms_between_tokens"]["p50"], run["ms_to_first_token"]["p50"])
                        results.append(run)
            finally:
                serve.send_signal(signal.SIGINT)
                serve.wait(30)
        finally:
            if conn is not None:
                conn.close()
            swarm.stop()
    by = {(r["way"], r["batching"], r["sessions"]): r for r in results}
    top, summary = max(levels), {}
    for way in ("clients", "serve"):
        most, fewest = by[(way, True, top)], by[(way, True, min(levels))]
        summary[f"{way}_speedup_{top}_vs_{min(levels)}"] = round(most["tokens_per_s"] / fewest["tokens_per_s"], 2)
        summary[f"{way}_p50_latency_{top}_vs_{min(levels)}"] = round(
            most["ms_between_tokens"]["p50"] / fewest["ms_between_tokens"]["p50"], 2)
        summary[f"{way}_batching_gain_at_{top}"] = round(
            most["tokens_per_s"] / by[(way, False, top)]["tokens_per_s"], 2)
    return {"model": path.name, "new_tokens": args.new_tokens, "results": results, "summary": summary}


def _one_run(way: str, n: int, path: Path, swarm, base_url: str, args, config, expected: dict) -> dict:
    if way == "serve":
        return concurrent_requests(base_url, path.name, n, args.new_tokens)
    run = concurrent_sessions(path, swarm.initial_peers, n, args.new_tokens, config.vocab_size, args.device,
                              args.dtype)
    tokens = run.pop("tokens")
    run["tokens_match_local"] = all(tokens[s] == expected[s] for s in range(n))
    return run


def _measured(levels: list[int], repeats: int, peers: list[str], conn, one_run) -> list[tuple[int, dict]]:
    """Each concurrency level measured ``repeats`` times, the levels taking turns (a machine that
    slows down for a while then weighs on every level alike); per level the medians over the runs,
    each run's p50 beside them, and the nodes' mean batch over all of them."""
    runs = {n: [] for n in levels}
    decoded = {n: [[0, 0] for _ in peers] for n in levels}  # per node: decode rows, decode batches
    for _ in range(repeats):
        for n in levels:
            before = [_counters(conn, p) for p in peers]
            runs[n].append(one_run(n))
            for counts, a, b in zip(decoded[n], [_counters(conn, p) for p in peers], before):
                for i, key in enumerate(("decode_rows", "decode_batches")):
                    counts[i] += a.get(key, 0) - b.get(key, 0)
    measured = []
    for n in levels:
        run = dict(runs[n][0])
        if repeats > 1:
            run.update(tokens_per_s=statistics.median(r["tokens_per_s"] for r in runs[n]), repeats=repeats,
                       ms_between_tokens={q: statistics.median(r["ms_between_tokens"][q] for r in runs[n])
                                          for q in ("p50", "p90")},
                       ms_to_first_token={q: statistics.median(r["ms_to_first_token"][q] for r in runs[n])
                                          for q in ("p50", "p90")},
                       p50_each_run=[r["ms_between_tokens"]["p50"] for r in runs[n]])
        run["mean_batch_size"] = [round(rows / batches, 2) if batches else 0.0 for rows, batches in decoded[n]]
        measured.append((n, run))
    return measured


def chat_ready_tiny(folder: Path) -> Path:
    """A random Llama (8 blocks, hidden 256) with SmolLM2's tokenizer, so `potluck serve` runs it."""
    from potluck.node.local_swarm import make_tiny_checkpoint

    return with_tokenizer(make_tiny_checkpoint("llama", folder, hidden=256, layers=8, vocab=49152, heads=8,
                                               kv_heads=8, intermediate=1024))


def with_tokenizer(path: Path) -> Path:
    """The checkpoint at ``path`` given SmolLM2's tokenizer (and its generation config)."""
    from potluck.protocol.checkpoint import resolve_checkpoint

    source = resolve_checkpoint(None).path
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return path


def _start_serve(path: Path, peers: list[str], logs: Path, device: str = "cpu") -> tuple[subprocess.Popen, str]:
    log = open(logs / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "potluck", "serve", str(path), "--port", "0", "--device", device,
                             "--initial-peers", *peers], stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if not line.startswith("POTLUCK_OPENAI_BASE_URL="):
        proc.kill()
        raise RuntimeError(f"potluck serve did not start; see {log.name}")
    return proc, line.strip().split("=", 1)[1]


def concurrent_requests(base_url: str, name: str, n: int, new_tokens: int) -> dict:
    """``n`` streaming completions at once through `potluck serve`, one thread each."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    stamps, counts, firsts = {}, {}, {}

    def request(i: int) -> None:
        began = time.time()
        times, stream = [], client.completions.create(model=name, prompt=f"Story number {i}:", max_tokens=new_tokens,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.time())
            if chunk.usage is not None:
                counts[i] = chunk.usage.completion_tokens
        stamps[i] = times
        firsts[i] = (times[0] - began) * 1e3 if times else float("nan")

    began = time.time()
    threads = [threading.Thread(target=request, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ended = max(t[-1] for t in stamps.values() if t)
    gaps = [(b - a) * 1e3 for t in stamps.values() for a, b in zip(t, t[1:])]
    cuts = statistics.quantiles(gaps, n=10)
    return {"sessions": n, "tokens_per_s": round(sum(counts.values()) / (ended - began), 2),
            "ms_between_tokens": {"p50": round(statistics.median(gaps), 2), "p90": round(cuts[8], 2)},
            "ms_to_first_token": _spread(list(firsts.values())), "completion_tokens": sum(counts.values())}


def _spread(values: list[float]) -> dict:
    """p50 and p90 of ``values`` (one value: itself for both)."""
    cuts = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return {"p50": round(statistics.median(values), 2), "p90": round(cuts[8], 2)}


def concurrent_sessions(path: Path, peers: list[str], n: int, new_tokens: int, vocab: int, device: str = "cpu",
                        dtype: str = "float32") -> dict:
    """``n`` greedy generations at once from client processes (their local part on ``device``, in ``dtype``)."""
    seeds = list(range(n))
    groups = [seeds[i::PROCESSES] for i in range(min(PROCESSES, n))]
    workers = [subprocess.Popen([sys.executable, __file__, str(path), ",".join(peers), json.dumps(group),
                                 str(new_tokens), str(vocab), device, dtype],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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
            "ms_to_first_token": _spread([s["first_token_s"] * 1e3 for s in sessions.values()]),
            "tokens": {seed: s["tokens"] for seed, s in sessions.items()}}


def _counters(conn: SwarmConnection, peer: str) -> dict:
    return conn.call(conn.info(peer, timeout=30), timeout=35)[0].counters


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
    device, dtype = sys.argv[6], sys.argv[7]
    torch.set_num_threads(1)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, device=device, dtype=dtype)
    print("ready", flush=True)
    sys.stdin.readline()
    sessions = {}

    def generate(seed: int) -> None:
        clock, began = _Clock(), time.time()
        out = model.generate(prompt(seed, vocab).to(device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
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
