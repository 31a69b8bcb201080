"""Helpers for ``scripts/bench``: a tiny checkpoint, a loopback swarm of real processes, peak RSS, step timing.

Swarms are the package's ``LocalSwarm`` (potluck.node.local_swarm): every process it starts (and
the p2pd daemons those start) is stopped by ``stop()``, and children get SIGTERM if the bench dies.
"""
from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import torch

from potluck.client.session import InferenceSession
from potluck.node.local_swarm import LocalSwarm, make_tiny_checkpoint

logger = logging.getLogger("bench")

FULL_MODEL_PEAK = """
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor([[int(x) for x in sys.argv[3].split(",")]])
model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[4]), do_sample=False)
print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
"""


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random fp32 Llama (8 blocks, hidden 256, vocab 32000) saved as a real checkpoint."""
    return make_tiny_checkpoint("llama", folder, hidden=256, layers=8, vocab=32000, heads=8, kv_heads=8,
                                intermediate=1024, seed=seed)


def make_llama_shape(folder: Path, blocks: int, hidden: int, vocab: int, dtype: torch.dtype, device: str,
                     seed: int = 0) -> Path:
    """Random weights in Llama-3.1-8B's shape (at hidden 4096: 32 heads of 128, 8 kv heads, MLP 14336),
    initialised on ``device`` (fast on a GPU) and saved as a real checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 128)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=vocab,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    empty_device_cache(device)
    return folder


def physical_bound(path: Path, device: str) -> dict:
    """What a token must cost at least on ``device``: the bytes of weights each step reads (every
    block and the lm_head; an embedding lookup reads one row) over the measured memory bandwidth."""
    from safetensors import safe_open

    weight_bytes = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if "embed_tokens" not in name:
                    weight_bytes += _tensor_bytes(f, name)
    bandwidth = memory_bandwidth(device)
    return {"weight_bytes_per_token": weight_bytes, "bandwidth_gb_s": round(bandwidth / 1e9, 1),
            "bound_ms": round(weight_bytes / bandwidth * 1e3, 3)}


def _tensor_bytes(f, name: str) -> int:
    """Bytes of one tensor in a safetensors file, from its header."""
    tensor_slice = f.get_slice(name)
    count = 1
    for size in tensor_slice.get_shape():
        count *= size
    return count * {"BF16": 2, "F16": 2, "F32": 4}[tensor_slice.get_dtype()]


def memory_bandwidth(device: str, mib: int = 1024, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read + write), the figure weight reads are bound by."""
    source = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * repeats / (time.perf_counter() - began)


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def empty_device_cache(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def full_model_peak_rss_mib(path: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    """Peak RSS of a fresh process that loads the whole model with transformers and generates once."""
    out = subprocess.run([sys.executable, "-c", FULL_MODEL_PEAK, str(path), str(threads),
                          ",".join(map(str, prompt)), str(new_tokens)],
                         capture_output=True, text=True, timeout=600, check=True)
    return int(out.stdout.split()[-1]) / 1024


@contextlib.contextmanager
def timed_steps() -> Iterator[dict[str, float]]:
    """Within: seconds in ``InferenceSession.step``, and in each session's first step (prefill + opening)."""
    totals, original = {"step": 0.0, "first_step": 0.0}, InferenceSession.step

    def timed(session: InferenceSession, *args, **kwargs):
        first, began = session.position == 0, time.perf_counter()
        try:
            return original(session, *args, **kwargs)
        finally:
            elapsed = time.perf_counter() - began
            totals["step"] += elapsed
            totals["first_step"] += elapsed if first else 0.0

    InferenceSession.step = timed
    try:
        yield totals
    finally:
        InferenceSession.step = original


@contextlib.contextmanager
def timed_forward(module: torch.nn.Module) -> Iterator[dict[str, float]]:
    """Within: seconds in ``module``'s forward (local transformers' base model: the decoder)."""
    totals = {"forward": 0.0, "began": 0.0}

    def before(*_) -> None:
        totals["began"] = time.perf_counter()

    def after(*_) -> None:
        totals["forward"] += time.perf_counter() - totals["began"]

    hooks = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield totals
    finally:
        for hook in hooks:
            hook.remove()


def bench_swarm(logs: Path, node_threads: int) -> LocalSwarm:
    """The package's local swarm launcher, with each node limited to ``node_threads`` torch threads."""
    return LocalSwarm(logs, node_args=["--num-threads", str(node_threads)])


def kill_all(processes: list[psutil.Process]) -> None:
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=5)


def reap_own_children() -> None:
    """Kill whatever this process started and is still alive (e.g. the client's p2pd after an error)."""
    kill_all(psutil.Process().children(recursive=True))
