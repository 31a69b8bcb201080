"""Bundles: the messages one stream carries in one turn of the event loop, sent as one frame.

Many sessions share a stream between two peers (a client and a node, two nodes of a chain).
When a batch of their steps finishes, every session's next message is written at once; each
as its own frame would cost a frame's whole path (framing, the p2p daemon, a read and a task
wake-up on the other side) per session. ``FrameBatcher`` instead collects what is written
during one loop turn and sends consecutive messages whose tensors differ only in their first
(batch) dimension as one ``bundle`` frame: the parts' metadata in a list, their tensors
concatenated along that dimension. A message alone goes as a plain frame. ``unbundle`` gives a
receiver the parts back as frames, each then validated like any other (the values of their
tensors once for the whole bundle: ``Frame.sane``); order is kept.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import torch

from .errors import BadRequest
from .messages import MAX_TENSORS, Frame, encode_frame, end_stream, values_sane

logger = logging.getLogger(__name__)

BUNDLE = "bundle"
MAX_BUNDLE_PARTS = 64


def unbundle(frame: Frame) -> list[Frame]:
    """The messages of a frame: its parts if it is a bundle, else the frame itself; BadRequest
    if a bundle's parts do not match its tensors."""
    if frame.meta.get("type") != BUNDLE:
        return [frame]
    parts, rows = frame.meta.get("parts"), frame.meta.get("rows")
    if not (isinstance(parts, list) and isinstance(rows, list) and 0 < len(parts) == len(rows) <= MAX_BUNDLE_PARTS):
        raise BadRequest(f"a bundle needs 1 to {MAX_BUNDLE_PARTS} parts, each with its row count")
    if not all(isinstance(p, dict) and p.get("type") != BUNDLE for p in parts):
        raise BadRequest("each part of a bundle must be a message (not a bundle)")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows):
        raise BadRequest("a bundle's row counts must be integers >= 0")
    if any(t.ndim == 0 or t.shape[0] != sum(rows) for t in frame.tensors):
        raise BadRequest(f"a bundle of {sum(rows)} rows carries tensors of shapes "
                         f"{[tuple(t.shape) for t in frame.tensors][:MAX_TENSORS]}")
    if not frame.tensors:
        return [Frame(part) for part in parts]
    pieces, sane = [t.split(rows) for t in frame.tensors], values_sane(frame.tensors)
    return [Frame(part, tuple(piece[i] for piece in pieces), sane) for i, part in enumerate(parts)]


def bundled(messages: list[tuple[dict[str, Any], Sequence[torch.Tensor]]]) -> list[tuple[dict, list[torch.Tensor]]]:
    """``messages`` as frames to send, in order: each run of messages that can share a bundle is one."""
    frames = []
    for run in _runs(messages):
        if len(run) == 1:
            frames.append((run[0][0], list(run[0][1])))
            continue
        meta = {"type": BUNDLE, "parts": [m for m, _ in run], "rows": [t[0].shape[0] if t else 0 for _, t in run]}
        frames.append((meta, [torch.cat(column) for column in zip(*(t for _, t in run))]))
    return frames


def _runs(messages):
    run, shared = [], None
    for meta, tensors in messages:
        signature = _signature(tensors)
        if run and (len(run) == MAX_BUNDLE_PARTS or signature is None or signature != shared):
            yield run
            run = []
        if not run:
            shared = signature
        run.append((meta, tensors))
    if run:
        yield run


def _signature(tensors: Sequence[torch.Tensor]) -> tuple | None:
    """What messages must share to go in one bundle: each tensor's shape past the batch
    dimension, its dtype and device (their tensors then differ only in the batch size each
    shares); None for a message that goes alone (a tensor without dimensions, or tensors of
    different batch sizes)."""
    signature, batch = [], None
    for tensor in tensors:  # a plain loop: a message's signature is taken on every hop of every step
        shape = tensor.shape
        if not shape or (batch is not None and shape[0] != batch):
            return None
        batch = shape[0]
        signature.append((shape[1:], tensor.dtype, tensor.device))
    return tuple(signature)


class FrameBatcher:
    """Writes messages to one stream; those written in one turn of the event loop leave together."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self._pending: list[tuple[dict[str, Any], Sequence[torch.Tensor]]] = []

    def write(self, meta: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> None:
        """Queue a message; ConnectionResetError if the stream is already closed."""
        if self.writer.is_closing():
            raise ConnectionResetError("the stream is closed")
        self._pending.append((meta, tuple(tensors)))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    async def send(self, meta: dict[str, Any], tensors: Sequence[torch.Tensor] = (), timeout: float = 10.0) -> None:
        """``write``, then wait while the stream's buffer is full: TimeoutError if the peer does
        not read for ``timeout`` seconds."""
        self.write(meta, tensors)
        await self.drained(timeout)

    async def drained(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self.writer.drain()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending or self.writer.is_closing():
            return
        try:
            for meta, tensors in bundled(pending):
                self.writer.write(encode_frame(meta, tensors))
        except (ConnectionError, OSError, RuntimeError) as e:  # the peer closed the stream meanwhile
            logger.debug("a stream closed before %d messages could be written: %s", len(pending), e)

    def is_closing(self) -> bool:
        return self.writer.is_closing()

    def backed_up(self) -> bool:
        """Whether bytes written earlier still wait in the stream's buffer (its peer is not keeping
        up: ``send`` would wait for it)."""
        return self.writer.transport.get_write_buffer_size() > 0

    def close(self) -> None:
        """Send what is queued, then end the stream."""
        self.flush()
        self.writer.close()

    async def end(self, reader: asyncio.StreamReader, linger: float) -> None:
        """Send what is queued, then end the stream once the peer has read it (``end_stream``)."""
        self.flush()
        await end_stream(reader, self.writer, linger)
