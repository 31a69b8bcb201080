"""Test helpers: the package's tiny checkpoints and local swarms of real `potluck` processes, and the CLI."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch
from transformers import LogitsProcessor

from potluck.client.transport import SwarmConnection
from potluck.node.local_swarm import LocalSwarm, make_tiny_checkpoint  # noqa: F401  (the tests' launcher)
from potluck.protocol import messages as msg

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "phi3", "gpt_oss", "gemma3_text")


NOBODY = "/ip4/127.0.0.1/tcp/1/p2p/QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb"  # a valid address, no one there


def potluck_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "potluck", *args]


class RawStream:
    """A hand-driven inference stream to one node, to send what a well-behaved client never would."""

    def __init__(self, connection: SwarmConnection, peer_id: str, handler: str = msg.INFERENCE_HANDLER):
        self.connection = connection
        self.reader, self.writer = connection.call(connection.open_stream(peer_id, handler, 10))

    def send(self, meta, tensors=()) -> msg.Frame:
        return self.send_bytes(msg.encode_frame(meta, tensors))

    def send_bytes(self, data: bytes) -> msg.Frame:
        async def exchange():
            self.writer.write(data)
            await self.writer.drain()
            return await asyncio.wait_for(msg.read_frame(self.reader), 10)
        return self.connection.call(exchange())

    def expect_error(self, error_type, meta, tensors=()):
        with pytest.raises(error_type) as caught:
            msg.raise_if_error(self.send(meta, tensors))
        return caught.value

    def close(self):
        self.connection.call(asyncio.sleep(0))
        self.writer.close()


def start_serve(path, initial_peers, logs, *extra) -> tuple[subprocess.Popen, str]:
    """`potluck serve` of ``path`` on a free port, its log in ``logs``: the process and its base URL."""
    log = open(logs / "serve.log", "w")
    proc = subprocess.Popen(potluck_command("serve", str(path), "--port", "0", "--initial-peers", *initial_peers,
                                            *extra), stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if not line.startswith("POTLUCK_OPENAI_BASE_URL="):
        proc.kill()
        raise RuntimeError(open(log.name).read()[-3000:])
    return proc, line.strip().split("=", 1)[1]


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(2)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def open_meta(session_id="s1", start=0, end=4, max_length=8):
    return {"type": "open", "session_id": session_id, "start": start, "end": end, "max_length": max_length,
            "batch_size": 1}


def logits_through(model, spans, ids, attention_mask=None, caches=None, start=0):
    """The model's logits with its decoder layers replaced by ``spans`` (each with its own cache)."""
    hidden = model.model.embed_tokens(ids)
    positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    if attention_mask is not None:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    for span, cache in zip(spans, caches or [None] * len(spans)):
        hidden = span(hidden, positions, attention_mask, cache)
    logits = model.lm_head(model.model.norm(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 3's head does this
    return logits if cap is None else torch.tanh(logits / cap) * cap


class AtToken(LogitsProcessor):
    """Calls ``action`` once, when the n-th new token is about to be chosen."""

    def __init__(self, n, action):
        self.n, self.action, self.calls = n, action, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.n:
            self.action()
        return scores
