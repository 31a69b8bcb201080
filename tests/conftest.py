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
import torch

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


@pytest.fixture(scope="session")
def phi3_longrope(tmp_path_factory) -> Path:
    """A tiny Phi-3 whose rope switches to its long factors past 16 positions (as Phi-3-mini-128k's
    does past 4096), its attention sharpened so that the factors change its tokens; SmolLM2's
    tokenizer, so `potluck serve` runs it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from potluck.protocol.checkpoint import resolve_checkpoint

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)],
            "original_max_position_embeddings": 16}
    config = AutoConfig.for_model("phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                  max_position_embeddings=128, original_max_position_embeddings=16,
                                  rope_parameters=rope, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[:64 + 32] *= 6  # queries and keys
    path = tmp_path_factory.mktemp("phi3") / "tiny-phi3-longrope"
    model.save_pretrained(path)
    source = resolve_checkpoint(None).path
    for name in ("tokenizer.json", "tokenizer_config.json"):
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
