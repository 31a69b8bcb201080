"""Measures how fast this node runs its span, for its record (routing weighs nodes by it)."""
from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from potluck.protocol.span import BlockSpan


def measure(span: BlockSpan, dtype: torch.dtype, device: str, steps: int = 8, forward_tokens: int = 128) -> tuple[float, float]:
    """Returns (one-token inference steps per second, forward tokens per second) through the span."""
    hidden = torch.randn(1, forward_tokens, span.config.hidden_size, dtype=dtype, device=device)
    positions = torch.arange(forward_tokens, device=device).unsqueeze(0)
    span(hidden[:, :8], positions[:, :8], None, DynamicCache())  # warm-up
    cache = DynamicCache()
    span(hidden[:, :1], positions[:, :1], None, cache)
    began = time.perf_counter()
    for i in range(1, steps + 1):
        span(hidden[:, i:i + 1], positions[:, i:i + 1], None, cache)
    step_rate = steps / (time.perf_counter() - began)
    began = time.perf_counter()
    span(hidden, positions, None, None)
    forward_rate = forward_tokens / (time.perf_counter() - began)
    return step_rate, forward_rate
