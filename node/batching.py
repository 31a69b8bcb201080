"""Running the scheduler's batches: the tensor side of ``scheduler``.

Decoding steps of several sessions run as one pass through their span: the pass reads each
session's cache from the pool as one left-padded batch (``cache_pool.PassCache``; a session's
tokens right-aligned, its padding masked out), runs once on the stacked new tokens with each
session's own positions, and writes each new key and value into its session's slots. Attention
over padding that is masked adds exact zeros, so a session's result does not depend on the
company it keeps beyond float rounding. A long prefill runs a chunk at a time on its session's
cache; short prompts of several sessions run as one such pass, each padded at its end to the
longest (causal attention keeps that padding from its real tokens; it writes a scratch slot).
Cache-less forwards of the same length through the same blocks run stacked along the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from potluck.protocol.errors import UnknownSession

from .cache_pool import PassCache
from .graphs import decode_fixed
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
        self.check_open()
        mask = None if self.mask is None else self.mask[:, : self.start + end]
        out = self.session.step(self.hidden[:, begin:end], self.positions[:, begin:end], mask, self.start + begin,
                                self.rope_until() if self.session.span.rope_by_length else None)
        self.outputs.append(out)
        return out

    def rope_until(self) -> list[int]:
        """Each row's last position in the whole step: a rope scaled by length takes it for every chunk."""
        return self.positions.amax(1).tolist()

    def result(self) -> torch.Tensor:
        self.check_open()
        return self.outputs[0] if len(self.outputs) == 1 else torch.cat(self.outputs, dim=1)

    def check_open(self) -> None:
        if self.session.closed:  # closed while this step waited: its slots may be another session's now
            raise UnknownSession(f"session {self.session.id} was closed before its step ran")


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

    def result(self) -> torch.Tensor:
        return self.output


def forward_together(works: list[ForwardWork]) -> list[torch.Tensor]:
    """Forwards of one length through the same blocks of a span, in one pass; one output each.
    A forward without a mask attends to all its tokens: in company, its mask is all ones."""
    first = works[0]
    hidden, positions = torch.cat([w.hidden for w in works]), torch.cat([w.positions for w in works])
    masks = None if all(w.mask is None for w in works) else torch.cat(
        [torch.ones_like(w.positions) if w.mask is None else w.mask for w in works])
    out = first.span(hidden, positions, masks, None, first.start, first.end)
    outputs = out.split([w.hidden.shape[0] for w in works])
    for work, output in zip(works, outputs):
        work.output = output
    return list(outputs)


def decode_together(works: list[StepWork], graphs: bool = False) -> list[torch.Tensor]:
    """One new token for each session (same span and blocks), in one pass; outputs [1, 1, H] each.
    ``graphs``: a fixed-shape pass (``graphs.FixedPasses``), replayed from a CUDA graph on a GPU."""
    works = [work for work in works if not work.session.closed]  # their results raise UnknownSession
    if not works:
        return []
    first = works[0].session
    out = decode_fixed(works, capture=first.span.device.type == "cuda") if graphs else None
    if out is None and len(works) == 1:
        return [works[0].chunk(0, 1)]
    return _noted(works, out if out is not None else _padded_pass(works, 1))


def prefill_together(works: list[StepWork]) -> list[torch.Tensor]:
    """The whole prompts of several sessions of one sequence each (same span and blocks), in one
    pass; outputs [1, T, H] each, T its own length."""
    works = [work for work in works if not work.session.closed]
    if len(works) <= 1:
        return [work.chunk(0, work.hidden.shape[1]) for work in works]
    return _noted(works, _padded_pass(works, max(work.hidden.shape[1] for work in works)))


def _padded_pass(works: list[StepWork], new: int) -> torch.Tensor:
    """Every work's new tokens (at most ``new``, padded at the end to it) on its session's cache,
    the rows left-padded to the longest cache: [B, new, H]."""
    first = works[0].session
    span, start, end = first.span, first.request.start, first.request.end
    lengths = [work.start for work in works]  # a client that rewound (after a failover) starts earlier
    kept = [work.hidden.shape[1] for work in works]
    cache = PassCache(first.pool, [work.session.slots[0] for work in works], lengths, new,
                      None if min(kept) == new else kept)
    hidden = torch.cat([_padded(w.hidden, new) for w in works]).to(span.device, span.dtype)  # [B, new, H]
    positions = torch.cat([_padded(w.positions, new) for w in works]).to(span.device)  # [B, new]
    padding = cache.prefix - torch.tensor(lengths).unsqueeze(1)  # [B, 1] pad slots before each row
    attend = (torch.arange(cache.prefix + new).unsqueeze(0) >= padding).to(span.device)  # [B, prefix + new]
    rope_until = [row for work in works for row in work.rope_until()] if span.rope_by_length else None
    return span(hidden, positions, attend, cache, start, end, rope_until)


def _padded(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``tensor`` [1, T, ...] made ``length`` long by repeating its last token (a valid position)."""
    missing = length - tensor.shape[1]
    return tensor if not missing else torch.cat([tensor, tensor[:, -1:].expand(1, missing, *tensor.shape[2:])], 1)


def _noted(works: list[StepWork], out: torch.Tensor) -> list[torch.Tensor]:
    """Each work's rows of ``out`` [B, T, H] (its own tokens), recorded as its result."""
    rows = []
    for work, row in zip(works, out.split(1)):
        row = row[:, :work.hidden.shape[1]]
        work.session.cached = work.start + row.shape[1]
        work.outputs.append(row)
        rows.append(row)
    return rows
