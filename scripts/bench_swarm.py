"""Helpers for ``scripts/bench``: a tiny checkpoint, a loopback swarm of real processes, peak RSS, step timing.

Every process a ``LocalSwarm`` starts (and the p2pd daemons those start) is stopped by ``stop()``:
SIGINT, then SIGKILL after a timeout. Children also get SIGTERM if the bench itself dies.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import torch

from potluck.client.session import InferenceSession

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
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
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    return folder


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


def _die_with_parent() -> None:
    """In the child: SIGTERM when the bench dies without stopping us (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


class LocalSwarm:
    """A `potluck dht` bootstrap peer and `potluck node` processes on loopback."""

    def __init__(self, logs: Path, node_threads: int):
        self.logs, self.node_threads = logs, node_threads
        self.processes: list[subprocess.Popen] = []

    def start_dht(self, timeout: float = 60) -> str:
        proc, log = self._spawn("dht", ["dht", "--host-maddrs", LOOPBACK])
        found = self._wait_for(proc, log, r"POTLUCK_INITIAL_PEERS=(\S+)", timeout)
        return found.group(1)

    def start_nodes(self, model: Path, spans: list[tuple[int, int]], maddr: str, *extra: str,
                    timeout: float = 300) -> list[tuple[str, int]]:
        """Start one node per span at once; wait until each logs ONLINE. Returns (peer id, pid) per node."""
        started = [self._spawn(f"node{i}-{a}_{b}", ["node", str(model), "--blocks", f"{a}:{b}", "--initial-peers",
                                                      maddr, "--public-name", f"bench{i}-{a}_{b}",
                                                      "--num-threads", str(self.node_threads), *extra])
                   for i, (a, b) in enumerate(spans)]
        return [(self._wait_for(proc, log, r"ONLINE: serving .* as (\w+)", timeout).group(1), proc.pid)
                for proc, log in started]

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "potluck", *args], stdout=f, stderr=f,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        self.processes.append(proc)
        return proc, log

    @staticmethod
    def _wait_for(proc: subprocess.Popen, log: Path, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, log.read_text())
            if found:
                return found
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{log.stem} did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")

    def stop(self, timeout: float = 15) -> None:
        """SIGINT every process, SIGKILL what is left after ``timeout``, then any daemon they left behind."""
        descendants = []
        for proc in self.processes:
            try:
                descendants += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.processes:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("pid %d did not stop in %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
        kill_all(descendants)
        self.processes.clear()


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
