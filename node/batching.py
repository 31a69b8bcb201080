"""Running the scheduler's batches: the tensor side of ``scheduler``.

Decoding steps of several sessions run as one pass through their span: each session's cached
keys and values are copied into one left-padded batch cache (a session's tokens right-aligned,
its padding masked out), the span runs once on the stacked new tokens with each session's own
positions, and each session's cache gets back the one new key and value of its row. Attention
over padding that is masked adds exact zeros, so a session's result does not depend on the
company it keeps beyond float rounding. A prefill runs a chunk at a time on its session's cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from potluck.protocol.families import kv_shape

from .sessions import Session
from .span import BlockSpan


@dataclass
class StepWork:
    """A session step's inputs, validated by the handler, and the outputs of its chunks so far."""

    session: Session
    hidden: torch.Tensor  # [B, T, H]
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, start + T], 1 = attend; None = no padding
    start: int  # where in the session's cache the step begins
    outputs: list[torch.Tensor] = field(default_factory=list)  # [B, chunk, H] each

    def chunk(self, begin: int, end: int) -> torch.Tensor:
        """Run tokens begin:end of this step on its session's cache (rewinding first if asked)."""
        mask = None if self.mask is None else self.mask[:, : self.start + end]
        out = self.session.step(self.hidden[:, begin:end], self.positions[:, begin:end], mask, self.start + begin)
        self.outputs.append(out)
        return out

    def result(self) -> torch.Tensor:
        return self.outputs[0] if len(self.outputs) == 1 else torch.cat(self.outputs, dim=1)


@dataclass
class ForwardWork:
    """A cache-less forward through blocks start:end of a span."""

    span: BlockSpan
    hidden: torch.Tensor  # [B, T, H]
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, T]
    start: int
    end: int

    output: torch.Tensor | None = None

    def run(self) -> torch.Tensor:
        self.output = self.span(self.hidden, self.positions, self.mask, None, self.start, self.end)
        return self.output

    def result(self) -> torch.Tensor:
        return self.output


def decode_together(works: list[StepWork]) -> list[torch.Tensor]:
    """One new token for each session (same span and blocks), in one pass; outputs [1, 1, H] each."""
    if len(works) == 1:
        return [works[0].chunk(0, 1)]
    first = works[0].session
    span, start, end = first.span, first.request.start, first.request.end
    for work in works:  # a client that rewinds (after a failover) drops the tokens past its start
        if work.start < work.session.cached:
            span.truncate(work.session.cache, work.start)
    lengths = [work.start for work in works]
    longest = max(lengths)
    batch = _padded_cache([w.session.cache for w in works], lengths, longest, start, end, span)
    hidden = torch.cat([w.hidden for w in works]).to(span.device, span.dtype)  # [B, 1, H]
    positions = torch.cat([w.positions for w in works]).to(span.device)  # [B, 1]
    attend = torch.zeros(len(works), longest + 1, dtype=torch.bool, device=span.device)  # [B, longest + 1]
    for row, length in enumerate(lengths):
        attend[row, longest - length:] = True
    out = span(hidden, positions, attend, batch, start, end)  # [B, 1, H]
    for row, work in enumerate(works):
        for index in range(start, end):
            layer = batch.layers[index]
            work.session.cache.update(layer.keys[row:row + 1, :, -1:], layer.values[row:row + 1, :, -1:], index)
        work.session.cached = work.start + 1
    rows = list(out.split(1))
    for work, row in zip(works, rows):
        work.outputs.append(row)
    return rows


def _padded_cache(caches: list[DynamicCache], lengths: list[int], longest: int, start: int, end: int,
                  span: BlockSpan) -> DynamicCache:
    """One cache of ``len(caches)`` rows for blocks start:end: row b holds cache b's tokens at the
    right end, zeros before them."""
    kv_heads, head_dim = kv_shape(span.config)
    batch = DynamicCache()
    for index in range(start, end):
        keys = torch.zeros(len(caches), kv_heads, longest, head_dim, dtype=span.dtype, device=span.device)
        values = torch.zeros_like(keys)
        for row, (cache, length) in enumerate(zip(caches, lengths)):
            if length:
                layer = cache.layers[index]
                keys[row, :, longest - length:] = layer.keys[0, :, :length]
                values[row, :, longest - length:] = layer.values[0, :, :length]
        batch.update(keys, values, index)
    return batch
