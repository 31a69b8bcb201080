"""Measures how fast this node runs its span, for its record (routing weighs nodes by it)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .span import BlockSpan


@dataclass(frozen=True)
class Speed:
    """How fast a node runs its whole span, as its record announces."""

    steps_per_s: float = 0.0  # one-token inference steps per second
    forward_tokens_per_s: float = 0.0  # tokens per second of a long cache-less forward

    def best_of(self, other: "Speed") -> "Speed":
        """Each figure's better value: contention only ever slows a measurement down."""
        return Speed(max(self.steps_per_s, other.steps_per_s),
                     max(self.forward_tokens_per_s, other.forward_tokens_per_s))


def measure(span: BlockSpan, steps: int = 16, forward_tokens: int = 128, repeats: int = 3) -> Speed:
    """How fast one-token steps and a long forward run through the span.

    Nodes often start while others load beside them; taking each figure's best repeat keeps a
    moment of contention from being announced as the node's speed."""
    hidden = torch.randn(1, forward_tokens, span.config.hidden_size, dtype=span.dtype, device=span.device)
    positions = torch.arange(forward_tokens, device=span.device).unsqueeze(0)
    span(hidden[:, :8], positions[:, :8], None, DynamicCache())  # warm-up
    _synchronize(span.device)
    step_times = []
    cache = DynamicCache()
    span(hidden[:, :1], positions[:, :1], None, cache)
    for i in range(1, steps + 1):
        began = time.perf_counter()
        span(hidden[:, i:i + 1], positions[:, i:i + 1], None, cache)
        _synchronize(span.device)
        step_times.append(time.perf_counter() - began)
    forward_times = []
    for _ in range(repeats):
        began = time.perf_counter()
        span(hidden, positions, None, None)
        _synchronize(span.device)
        forward_times.append(time.perf_counter() - began)
    fastest_half = sorted(step_times)[: max(1, steps // 2)]
    return Speed(len(fastest_half) / sum(fastest_half), forward_tokens / min(forward_times))


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timing covers the computation and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
