"""Shared fixtures: tiny checkpoints made at test time, and real local swarms as child processes.

Every process a test starts is stopped in teardown (SIGINT, then SIGKILL), and a session
fixture reaps anything left over, so a failing assert leaks nothing.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil
import pytest

from helpers import FAMILIES, LocalSwarm, make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_tiny_checkpoint(family, root / f"tiny-{family}") for family in FAMILIES}


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> Path:
    """A tiny random Llama that speaks SmolLM2's tokenizer and chat template (fast nodes, real text)."""
    from potluck.protocol.checkpoint import resolve_checkpoint

    source = resolve_checkpoint(None).path
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("chat") / "tiny-chat", layers=4, vocab=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return path


@pytest.fixture(scope="module")
def swarm_factory(tmp_path_factory):
    """Module-scoped: call it to get a new LocalSwarm; all are stopped after the module. Its
    children are forks of one process that imported torch, transformers and hivemind once
    (``node.forks``): a node starts in about 1 s instead of 10."""
    swarms: list[LocalSwarm] = []

    def make() -> LocalSwarm:
        swarm = LocalSwarm(tmp_path_factory.mktemp("swarm"), node_args=["--num-threads", "1"], forks=True)
        swarms.append(swarm)
        swarm.start_dht()
        return swarm

    yield make
    for swarm in swarms:
        swarm.stop()


@pytest.fixture(scope="session", autouse=True)
def reap_children():
    """Kill any child process (nodes, p2pd daemons) a test left behind."""
    yield
    children = psutil.Process(os.getpid()).children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=5)
