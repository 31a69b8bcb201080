"""A local swarm of real processes: a `potluck dht` bootstrap peer and `potluck node`s on loopback.

The one launcher behind `potluck swarm`, the tests and the benchmarks. Each child's output goes
to a log file (and, with ``echo``, to this process's stderr); a node counts as started once it
logs ONLINE. Children get SIGTERM if this process dies without stopping them (Linux), and
``stop`` sends SIGINT (nodes drain), then SIGKILL after a timeout, then kills any daemon they
left behind. The tests' swarms start children as forks of a process that has imported the heavy
packages once (``forks``). ``make_tiny_checkpoint`` makes the random models tests and benchmarks
run on.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from potluck.protocol.network import INITIAL_PEERS_ENV, LOOPBACK_MADDR

from .forks import Forked, ForkServer, die_with_parent

logger = logging.getLogger(__name__)
ONLINE_LINE = re.compile(r"ONLINE: serving .* as (\w+)")


class SwarmStartError(RuntimeError):
    """A child exited or did not come up in time; the message ends with its last log lines."""


@functools.cache
def shared_fork_server() -> ForkServer:
    """This process's fork server (``forks``), started on first use."""
    return ForkServer()


class Child:
    """One child process whose output lines are kept, logged and searched as they arrive."""

    def __init__(self, name: str, args: Sequence[str], log: Path | None, echo: bool, prefix: Sequence[str] = (),
                 forks: ForkServer | None = None):
        self.name, self.echo = name, echo
        self.proc = forks.start(args) if forks is not None and not prefix else None
        if self.proc is None:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "potluck", *args],  # prefix: e.g. `ip netns exec NAME`
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, text=True, errors="replace",
                start_new_session=True,  # Ctrl-C reaches children once, via stop()
                preexec_fn=die_with_parent)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._pump = threading.Thread(target=self._read, args=(log, echo), name=f"potluck-{name}", daemon=True)
        self._pump.start()

    def _read(self, log: Path | None, echo: bool) -> None:
        with open(log, "w") if log is not None else contextlib.nullcontext() as file:
            for line in self.proc.stdout:
                if file is not None:
                    file.write(line)
                    file.flush()
                if echo:
                    sys.stderr.write(line)
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern, timeout: float, abort: threading.Event) -> re.Match:
        """The first output line matching ``pattern``; SwarmStartError if the child exits first,
        the time runs out or the launch is aborted."""
        deadline, seen = time.monotonic() + timeout, 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if found := pattern.search(line):
                        return found
                seen = len(self.lines)
                if abort.is_set():
                    raise SwarmStartError(f"{self.name}: start aborted")
                if not self._pump.is_alive() or time.monotonic() > deadline:
                    code = self.proc.poll()
                    if code is None and not self._pump.is_alive():  # its output ended: its exit code is near
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            code = self.proc.wait(5)
                    why = f"exited with {code}" if code is not None else f"not up in {timeout:.0f} s"
                    shown = "" if self.echo else ":\n" + "".join(self.lines[-40:])  # echoed lines were seen
                    raise SwarmStartError(f"{self.name} {why}{shown}")
                self._changed.wait(0.2)


class LocalSwarm:
    """Start with ``start_dht()``, then ``start_nodes(...)`` as often as needed; ``stop()`` ends all.
    ``forks``: start children as forks of this process's fork server (``forks``; about 1 s a start
    instead of 10 here, imports being most of a start), except those run under a ``prefix``. Off
    where a child's start-up time or memory is measured."""

    def __init__(self, logs: Path | None = None, *, echo: bool = False, node_args: Sequence[str] = (),
                 forks: bool = False):
        self.logs, self.echo, self.node_args = logs, echo, list(node_args)
        self.forks = shared_fork_server() if forks else None
        self.children: list[Child] = []
        self.initial_peers: list[str] = []
        self.nodes: dict[str, subprocess.Popen | Forked] = {}  # peer id -> its process
        self.node_children: dict[str, Child] = {}  # peer id -> its process and output
        self._abort = threading.Event()

    def start_dht(self, timeout: float = 60, *, prefix: Sequence[str] = (), host_maddr: str = LOOPBACK_MADDR) -> str:
        """A bootstrap peer on loopback; returns its multiaddr (also in ``initial_peers``)."""
        child = self._spawn("dht", ["dht", "--host-maddrs", host_maddr], prefix)
        found = child.wait_for(re.compile(rf"{INITIAL_PEERS_ENV}=(\S+)"), timeout, self._abort)
        self.initial_peers = [found.group(1)]
        return found.group(1)

    def start_nodes(self, model: Path, spans: Sequence[str | tuple[int, int] | None], *extra: str,
                    timeout: float = 300, name: str | None = None, prefix: Sequence[str] = (),
                    each: Sequence[tuple[str, Sequence[str], Sequence[str]]] | None = None) -> list[str]:
        """One node per span (None: the node chooses), started together; waits until each logs
        ONLINE and returns their peer ids. Nodes are named ``{name}-{start}_{end}-{n}`` (or
        ``{name}-auto-{n}``; default name: the model folder's). ``prefix`` goes before each
        command line (e.g. ``ip netns exec NAME``: the nodes run in that network namespace).
        ``each``: per span, its own (name, prefix, extra arguments), e.g. each in a namespace of
        its own with the address it listens on there."""
        started = []
        for span, (node_name, node_prefix, node_extra) in zip(spans, each or [(name, prefix, ())] * len(spans)):
            start, end = span.split(":") if isinstance(span, str) else span or (None, None)
            where = "auto" if start is None else f"{start}_{end}"
            node_name = f"{node_name or Path(model).name}-{where}-{len(self.children)}"
            blocks = [] if start is None else ["--blocks", f"{start}:{end}"]
            args = ["node", str(model), *blocks, "--initial-peers", *self.initial_peers,
                    "--public-name", node_name, *self.node_args, *extra, *node_extra]
            started.append(self._spawn(node_name, args, node_prefix))
        peers = []
        for child in started:
            peer = child.wait_for(ONLINE_LINE, timeout, self._abort).group(1)
            self.nodes[peer], self.node_children[peer] = child.proc, child
            peers.append(peer)
        return peers

    def wait_for_line(self, peer: str, pattern: str, timeout: float = 60) -> re.Match:
        """The first line of node ``peer``'s output that matches ``pattern``, waiting up to ``timeout``."""
        return self.node_children[peer].wait_for(re.compile(pattern), timeout, self._abort)

    def exited(self) -> list[str]:
        """Names of the children that are no longer running."""
        return [c.name for c in self.children if c.proc.poll() is not None]

    def abort(self) -> None:
        """Make a start that is waiting (in another thread) give up at once."""
        self._abort.set()

    def _spawn(self, name: str, args: list[str], prefix: Sequence[str] = ()) -> Child:
        log = None if self.logs is None else self.logs / f"{name}.log"
        child = Child(name, args, log, self.echo, prefix, self.forks)
        self.children.append(child)
        return child

    def kill(self, name: str) -> None:
        """SIGKILL the child named ``name`` (``dht`` for the bootstrap peer) and its p2pd daemon: a
        peer that vanishes without a word."""
        for child in self.children:
            if child.name == name:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()

    def stop(self, timeout: float = 15) -> None:
        """SIGINT every child (nodes drain), SIGKILL what is left after ``timeout``, then whatever
        is left in each child's process group (the p2pd daemon of a killed node)."""
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGINT)
        for child in self.children:
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", child.name, timeout)
                child.proc.kill()
                child.proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)  # each child leads its own group (new session)
        self.children.clear()


def make_tiny_checkpoint(family: str, folder: Path, *, hidden: int = 64, layers: int = 8, vocab: int = 1000,
                         heads: int = 4, kv_heads: int = 2, intermediate: int | None = None, seed: int = 0) -> Path:
    """A random checkpoint of ``family`` (a model_type: llama, mistral, qwen2, qwen3, mixtral,
    qwen3_moe, phi3, gpt_oss), saved as a real one is (config.json + safetensors), for tests and
    benchmarks. Mixture-of-experts families get 4 experts, 2 per token."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {
        "qwen3": {"head_dim": hidden // heads},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
        "qwen3_moe": {"head_dim": hidden // heads, "num_experts": 4, "num_experts_per_tok": 2,
                      "moe_intermediate_size": hidden},
        "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        "gpt_oss": {"head_dim": hidden // heads, "num_local_experts": 4, "num_experts_per_tok": 2,
                    "sliding_window": 8, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        "gemma3_text": {"head_dim": hidden // heads, "sliding_window": 8, "query_pre_attn_scalar": hidden // heads,
                        "final_logit_softcapping": 30.0, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    }.get(family, {})
    config = AutoConfig.for_model(
        family, hidden_size=hidden, intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=512,
        tie_word_embeddings=False, **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder
