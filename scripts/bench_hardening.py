"""``scripts/bench hardening``: a node under a hostile peer, and an honest client beside it.

One node (tiny Llama, all 8 blocks, a 4096-token cache, idle and frame timeouts of 3 s) and two
client processes' worth of peers (two P2P daemons in this process). Measured:
- stream flood: 32 streams that declare the largest frame the node accepts and trickle it, plus
  500 idle streams; what the node said before closing each, the node's RSS before, at its peak
  (sampled every 50 ms) and after, the time until it closed every one (the trickled frames get
  the frame timeout plus 1 s per MiB they declared), and the honest client's tokens/s before and
  during;
- session flood: sessions of 64 tokens opened as fast as one stream can until refused, the honest
  client's tokens/s meanwhile, and the time until the node frees them once the flooder leaves;
- fuzzing: random bytes and bit-flipped valid frames to the inference handler for --fuzz-seconds:
  cases per second, the node's RSS growth and open sessions afterwards.
Every honest generation is checked against local transformers.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import torch
import transformers

from bench_swarm import bench_swarm
from potluck.client.model import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.node.limits import step_frame_bytes
from potluck.protocol import messages as msg

CACHE_TOKENS, TIMEOUT, NEW_TOKENS = 4096, 3.0, 32


def run_hardening(path: Path, args, workdir: Path) -> dict:
    swarm = bench_swarm(workdir, args.node_threads)
    hostile = honest = None
    try:
        swarm.start_dht()
        (peer,) = swarm.start_nodes(path, ["0:8"], "--cache-tokens", str(CACHE_TOKENS), "--idle-timeout",
                                    str(TIMEOUT), "--frame-timeout", str(TIMEOUT), name="bench")
        node = psutil.Process(swarm.nodes[peer].pid)
        hostile, honest = SwarmConnection(swarm.initial_peers), SwarmConnection(swarm.initial_peers)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=honest)
        local = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
        expected = local.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

        def tokens_per_s() -> tuple[float, bool]:
            began = time.perf_counter()
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            return round(NEW_TOKENS / (time.perf_counter() - began), 2), torch.equal(out, expected)

        tokens_per_s()  # warm-up
        hidden = local.config.hidden_size
        return {"stream_flood": _stream_flood(hostile, peer, node, tokens_per_s, hidden),
                "session_flood": _session_flood(hostile, peer, tokens_per_s),
                "fuzz": _fuzz(hostile, peer, node, args.fuzz_seconds, hidden)}
    finally:
        for connection in (hostile, honest):
            if connection is not None:
                connection.close()
        swarm.stop()


def _rss_mib(node: psutil.Process) -> float:
    return round(node.memory_info().rss / 2**20, 1)


def _stream_flood(hostile: SwarmConnection, peer: str, node: psutil.Process, tokens_per_s, hidden: int) -> dict:
    before, (baseline, exact_before) = _rss_mib(node), tokens_per_s()
    peak, sampling = [before], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak.append(_rss_mib(node))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    largest = step_frame_bytes(hidden, 8192, CACHE_TOKENS)

    async def flood() -> list:
        streams = [await hostile.open_stream(peer, msg.INFERENCE_HANDLER, 10) for _ in range(32 + 500)]
        for _, writer in streams[:32]:
            writer.write(largest.to_bytes(msg.HEADER_BYTES, "big") + b"\0" * 1000)
        return streams

    async def until_closed(streams: list) -> list:
        async def answer(reader) -> str:
            said = ""
            try:
                while True:
                    said = str(msg.error_of(await msg.read_frame(reader)) or said)
            except (asyncio.IncompleteReadError, ConnectionError):
                return said  # the node's last word before it closed the stream
        return await asyncio.gather(*(answer(reader) for reader, _ in streams))

    began = time.monotonic()
    streams = hostile.call(flood(), timeout=300)
    opened = time.monotonic() - began
    during, exact_during = tokens_per_s()
    said = hostile.call(until_closed(streams), timeout=300)
    closed_after = time.monotonic() - began
    sampling.set()
    sampler.join()
    for _, writer in streams:
        writer.close()
    return {"streams": len(streams), "seconds_to_open": round(opened, 2),
            "last_words": dict(Counter(s.split(";")[0].split(" (")[0][:60] for s in said)),
            "seconds_until_all_closed": round(closed_after, 2),
            "node_rss_mib": {"before": before, "peak": max(peak), "after": _rss_mib(node)},
            "honest_tokens_per_s": {"before": baseline, "during": during},
            "honest_tokens_match_local": exact_before and exact_during}


def _session_flood(hostile: SwarmConnection, peer: str, tokens_per_s) -> dict:
    async def flood():
        reader, writer = await hostile.open_stream(peer, msg.INFERENCE_HANDLER, 10)
        opened = 0
        while True:
            await msg.write_frame(writer, {"type": "open", "session_id": f"flood{opened}", "start": 0, "end": 8,
                                           "max_length": 64, "batch_size": 1})
            error = msg.error_of(await msg.read_frame(reader))
            if error is not None:
                return opened, str(error), writer
            opened += 1

    began = time.monotonic()
    opened, refusal, writer = hostile.call(flood(), timeout=120)
    seconds = time.monotonic() - began
    during, exact = tokens_per_s()
    hostile.loop.call_soon_threadsafe(writer.close)
    left = time.monotonic()
    while hostile.call(hostile.info(peer, timeout=10))[0].open_sessions and time.monotonic() - left < 30:
        time.sleep(0.05)
    return {"sessions_opened": opened, "seconds": round(seconds, 3), "refused_with": refusal,
            "honest_tokens_per_s_during": during, "honest_tokens_match_local": exact,
            "seconds_until_freed": round(time.monotonic() - left, 2)}


def _fuzz(hostile: SwarmConnection, peer: str, node: psutil.Process, seconds: float, hidden: int) -> dict:
    rng = random.Random(0)
    valid = [msg.encode_frame({"type": "open", "session_id": "s0", "start": 0, "end": 8, "max_length": 16,
                               "batch_size": 1}),
             msg.encode_frame({"type": "step", "session_id": "s0", "start_from": None, "seq": 1},
                              [torch.randn(1, 2, hidden), torch.arange(2).unsqueeze(0)])]

    def case() -> bytes:
        if rng.random() < 0.3:
            payload = rng.randbytes(rng.randrange(200))
            return len(payload).to_bytes(msg.HEADER_BYTES, "big") + payload
        frame = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(msg.HEADER_BYTES, len(frame))
            frame[at] ^= 1 << rng.randrange(8)
        return bytes(frame)

    async def fuzz() -> int:
        cases, deadline, stream = 0, time.monotonic() + seconds, None
        while time.monotonic() < deadline:
            if stream is None or stream[0].at_eof() or stream[1].is_closing():
                stream = await hostile.open_stream(peer, msg.INFERENCE_HANDLER, 10)
            stream[1].write(case())
            try:
                await asyncio.wait_for(msg.read_frame(stream[0]), 10)
            except (asyncio.IncompleteReadError, ConnectionError):
                stream = None
            cases += 1
        if stream is not None:
            stream[1].close()
        return cases

    before = _rss_mib(node)
    began = time.monotonic()
    cases = hostile.call(fuzz(), timeout=seconds + 120)
    elapsed = time.monotonic() - began
    time.sleep(0.5)
    return {"cases": cases, "cases_per_s": round(cases / elapsed, 1), "node_rss_mib": {"before": before,
            "after": _rss_mib(node)}, "open_sessions_after": hostile.call(hostile.info(peer, 10))[0].open_sessions}
