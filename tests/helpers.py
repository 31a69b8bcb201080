"""Test helpers: tiny checkpoints made at test time, and local swarms of real `potluck` processes."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def make_tiny_checkpoint(family: str, folder: Path, *, hidden: int = 64, layers: int = 8, vocab: int = 1000,
                         seed: int = 0) -> Path:
    """A random checkpoint of ``family``, saved as a real one is (config.json + safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False,
        **({"head_dim": hidden // 4} if family == "qwen3" else {}),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def potluck_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "potluck", *args]


class LocalSwarm:
    """A bootstrap peer and nodes, each a real `potluck` process on loopback."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.processes: list[subprocess.Popen] = []
        self.initial_peers: list[str] = []
        self.nodes: dict[str, subprocess.Popen] = {}  # peer id -> process

    def start_dht(self, timeout: float = 60) -> str:
        proc = self._spawn("dht", ["dht", "--host-maddrs", LOOPBACK], stdout=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("POTLUCK_INITIAL_PEERS="):
                self.initial_peers = [line.strip().split("=", 1)[1]]
                return self.initial_peers[0]
            if proc.poll() is not None:
                break
        raise RuntimeError(f"bootstrap peer did not start: {(self.logs / 'dht.log').read_text()[-2000:]}")

    def start_nodes(self, model: Path, spans: list[str], *extra: str, timeout: float = 120) -> list[str]:
        """Start one node per span (concurrently) and wait until each logs ONLINE; returns peer ids."""
        started = []
        for i, span in enumerate(spans):
            name = f"{model.name}-{span.replace(':', '_')}-{len(self.processes)}"
            args = ["node", str(model), "--blocks", span, "--initial-peers", *self.initial_peers,
                    "--public-name", name, "--num-threads", "1", *extra]
            started.append((name, self._spawn(name, args)))
        return [self._wait_online(name, proc, timeout) for name, proc in started]

    def _spawn(self, name: str, args: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(potluck_command(*args), stderr=log, text=True, **kwargs)
        self.processes.append(proc)
        return proc

    def _wait_online(self, name: str, proc: subprocess.Popen, timeout: float) -> str:
        log = self.logs / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"ONLINE: serving .* as (\w+)", log.read_text())
            if found:
                self.nodes[found.group(1)] = proc
                return found.group(1)
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"node {name} did not come ONLINE:\n{log.read_text()[-3000:]}")

    def stop(self, timeout: float = 15) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.processes:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
