"""``scripts/bench http``: time to first token and tokens/s through `potluck serve` (the official
`openai` client, streaming) against the Python API, on the same swarm and prompt (greedy)."""
from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from bench_swarm import bench_swarm
from potluck.client.model import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection

logger = logging.getLogger("bench")
MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to cook."}]


class Stamps(BaseStreamer):
    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def python_api(model, tokenizer, new_tokens: int) -> tuple[float, float]:
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    stamps, began = Stamps(), time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, streamer=stamps)
    first, last = stamps.times[1], stamps.times[-1]  # times[0] is the prompt
    return first - began, (len(stamps.times) - 2) / (last - first)


def http_api(client, model_name: str, new_tokens: int) -> tuple[float, float, int]:
    began, first, last, chunks = time.perf_counter(), None, None, 0
    for chunk in client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=new_tokens,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            chunks += 1
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    return first - began, (tokens - 1) / (last - first), tokens


def run_http(path: Path, args, workdir: Path) -> dict:
    import openai
    from transformers import AutoTokenizer

    from potluck.node.swarm import split_evenly
    from potluck.protocol.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(str(path))
    swarm, conn, serve = bench_swarm(workdir, args.node_threads), None, None
    try:
        maddr = swarm.start_dht()
        swarm.start_nodes(path, split_evenly(checkpoint.num_blocks, 2), name="bench")
        serve = subprocess.Popen([sys.executable, "-m", "potluck", "serve", str(path), "--port", "0",
                                  "--initial-peers", maddr], stdout=subprocess.PIPE,
                                 stderr=open(workdir / "serve.log", "w"), text=True)
        base_url = serve.stdout.readline().strip().split("=", 1)[1]
        conn = SwarmConnection([maddr])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=conn)
        tokenizer = AutoTokenizer.from_pretrained(path)
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
        python_api(model, tokenizer, 4), http_api(client, checkpoint.name, 4)  # warm-up
        py, http = [], []
        for _ in range(args.repeats):  # interleaved, so drift on the machine hits both alike
            py.append(python_api(model, tokenizer, args.new_tokens))
            http.append(http_api(client, checkpoint.name, args.new_tokens))
    finally:
        if serve is not None:
            serve.send_signal(2)
            serve.wait(30)
        if conn is not None:
            conn.close()
        swarm.stop()
    med = lambda xs: round(statistics.median(xs), 4)  # noqa: E731
    result = {"python": {"ttft_s": med([p[0] for p in py]), "tokens_per_s": med([p[1] for p in py])},
              "http": {"ttft_s": med([h[0] for h in http]), "tokens_per_s": med([h[1] for h in http]),
                       "completion_tokens": http[-1][2]}}
    result["http_tokens_per_s_cost"] = round(1 - result["http"]["tokens_per_s"] / result["python"]["tokens_per_s"], 4)
    result["http_ttft_extra_s"] = round(result["http"]["ttft_s"] - result["python"]["ttft_s"], 4)
    return {"swarm": "2 nodes", "new_tokens": args.new_tokens, "repeats": args.repeats, **result,
            "targets": {"http_costs_under_5_percent": result["http_tokens_per_s_cost"] < 0.05}}
