"""`scripts/bench quant`: what 8- and 4-bit weights (`potluck node --quant`) save and cost.

Per model (the default, SmolLM2-135M; a tiny mixture-of-experts of Mixtral's layout, random weights)
and quantisation (none, int8, nf4):
- bytes per block, as the node's sizing counts them (``span.block_bytes``);
- the span's memory: peak RSS of a fresh process over loading every block and 32 decoding steps,
  above what the process held before (``probe``, also what tests/node/test_quantize_memory.py runs);
- ms per decoding step through all the blocks (one token, with a cache; median of 32);
- the logits' error against float32 on a 16-token prompt (relative L2 per token: the largest and the
  median), and whether greedy tokens for "The capital of France is" (SmolLM2) equal float32's;
- peak RSS of a real `potluck node` serving every block, from start to ONLINE (its speed measured).

Run as ``python scripts/bench_quant.py probe PATH QUANT`` it prints one probe's JSON.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROBE_STEPS = 32


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def probe(path: str, quant: str, steps: int = PROBE_STEPS, accuracy: bool = True) -> dict:
    """Load every block of ``path`` with ``quant``, run ``steps`` decoding steps, and measure (in this
    process); ``accuracy``: also compare the logits and greedy tokens with float32's."""
    import torch
    from transformers import DynamicCache

    from potluck.node import quantize
    from potluck.node.span import block_bytes, load_span
    from potluck.protocol.checkpoint import resolve_checkpoint

    torch.set_num_threads(1)
    checkpoint = resolve_checkpoint(path)
    for kind in ("int8", "nf4"):  # torchao's modules and kernels loaded before the baseline: not the span's
        torch.nn.functional.linear(torch.ones(1, 64), quantize._pack(torch.ones(64, 64), kind))
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    before = _status("VmRSS")
    span = load_span(checkpoint, 0, checkpoint.num_blocks, torch.float32, quant=quant)
    loaded = _status("VmHWM") - before
    hidden = torch.randn(1, 16, checkpoint.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cache, times = DynamicCache(), []
    span(hidden, torch.arange(16)[None], None, cache)
    for t in range(16, 16 + steps):
        began = time.perf_counter()
        span(hidden[:, -1:], torch.tensor([[t]]), None, cache)
        times.append(time.perf_counter() - began)
    peak = _status("VmHWM") - before
    del span, cache
    result = {"quant": quant, "blocks": checkpoint.num_blocks,
              "bytes_per_block": block_bytes(checkpoint, 0, torch.float32, quant),
              "span_peak_mib_loading": round(loaded / 2**20, 1), "span_peak_mib": round(peak / 2**20, 1),
              "ms_per_step": round(statistics.median(times) * 1e3, 3)}
    return {**result, **_accuracy(checkpoint, quant)} if accuracy else result


def _accuracy(checkpoint, quant: str) -> dict:
    """The logits' error against float32's on a 16-token prompt, and whether greedy tokens agree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potluck.node import quantize

    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    greedy_prompt = None
    if (checkpoint.path / "tokenizer.json").exists():
        greedy_prompt = AutoTokenizer.from_pretrained(checkpoint.path)("The capital of France is",
                                                                       return_tensors="pt").input_ids
    with torch.no_grad():
        exact = model(ids).logits
        exact_greedy = None if greedy_prompt is None else model.generate(greedy_prompt, max_new_tokens=12,
                                                                          do_sample=False)
        for layer in model.model.layers:
            quantize.quantize_block(layer, quant)
        got = model(ids).logits
        greedy = None if greedy_prompt is None else model.generate(greedy_prompt, max_new_tokens=12, do_sample=False)
    error = ((got - exact).norm(dim=-1) / exact.norm(dim=-1))[0]
    return {"logit_error": {"max": round(error.max().item(), 5), "median": round(error.median().item(), 5)},
            "greedy_tokens_equal_float32": None if greedy is None else bool(torch.equal(greedy, exact_greedy))}


def run_probe(path: Path, quant: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "probe", str(path), quant], capture_output=True, text=True,
                         timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"probe of {path} with {quant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def node_peak_rss_mib(path: Path, blocks: int, quant: str, logs: Path) -> float:
    """Peak RSS of a `potluck node` serving every block, from start to ONLINE."""
    from bench_swarm import peak_rss_mib

    from potluck.node.local_swarm import LocalSwarm

    logs.mkdir(parents=True, exist_ok=True)
    swarm = LocalSwarm(logs, node_args=["--num-threads", "1"])
    try:
        swarm.start_dht()
        (peer,) = swarm.start_nodes(path, [f"0:{blocks}"], "--quant", quant)
        return round(peak_rss_mib(swarm.nodes[peer].pid), 1)
    finally:
        swarm.stop()


def run_quant(args, workdir: Path) -> dict:
    import logging

    from potluck.node.local_swarm import make_tiny_checkpoint
    from potluck.protocol.checkpoint import resolve_checkpoint

    logger = logging.getLogger("bench")
    models = {"smollm2": resolve_checkpoint(None).path,
              "tiny-moe": make_tiny_checkpoint("mixtral", workdir / "tiny-moe", hidden=256, layers=8, vocab=32000,
                                               heads=8, kv_heads=4, intermediate=1024)}
    results = []
    for name, path in models.items():
        for quant in ("none", "int8", "nf4"):
            logger.info("%s, %s: probe, then a node", name, quant)
            result = {"model": name, **run_probe(path, quant)}
            result["node_peak_rss_mib"] = node_peak_rss_mib(path, result["blocks"], quant, workdir / f"{name}-{quant}")
            results.append(result)
    for result in results:
        exact = next(r for r in results if r["model"] == result["model"] and r["quant"] == "none")
        result["span_peak_vs_none"] = round(result["span_peak_mib"] / exact["span_peak_mib"], 3)
        result["bytes_vs_none"] = round(result["bytes_per_block"] / exact["bytes_per_block"], 3)
    return {"probe_steps": PROBE_STEPS, "results": results}


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:  # probe PATH QUANT [STEPS [memory]]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else PROBE_STEPS
    print(json.dumps(probe(sys.argv[2], sys.argv[3], steps, accuracy=sys.argv[5:6] != ["memory"])))
