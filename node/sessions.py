"""Inference sessions and the attention-cache budget they reserve against.

A session reserves ``max_length x batch_size`` cache tokens when it opens and gives them back
when it closes, so a node never promises more cache than its budget; ``tokens_left`` is what
the node announces. The cache itself lives in the span's ``CachePool``: a session owns its slots
there from open to close.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from potluck.protocol.errors import BadRequest, CacheFull, MaxLengthExceeded, UnknownSession
from potluck.protocol.messages import OpenSession
from . import hardware
from .cache_pool import CachePool, PassCache, bytes_per_token
from .span import BlockSpan

logger = logging.getLogger(__name__)
SHRINK_TOLERANCE = 0.05  # a default budget shrinks only when its share of the free memory is this much less


@dataclass
class Session:
    request: OpenSession
    span: BlockSpan | None  # the blocks it computes on: a node moving elsewhere keeps them for it
    pool: CachePool | None = None  # the span's cache (None without a span)
    slots: torch.Tensor | None = None  # [batch, max_length] its slots in the pool (CPU)
    peer: str = ""  # the peer that opened it
    previous: str | None = None  # the only peer whose pushes it takes (the chain's previous node)
    cached: int = 0  # tokens in the cache
    closed: bool = False  # its slots went back to the pool: a step still queued for it must not run
    opened_at: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.request.session_id

    @property
    def reserved(self) -> int:
        return self.request.max_length * self.request.batch_size

    def step_start(self, start_from: int | None, new_tokens: int) -> int:
        """Where in the cache a step begins (``start_from``, or after what it holds); raises if the
        step would not fit or rewinds past the cache's end."""
        start = self.cached if start_from is None else start_from
        if start > self.cached:
            raise MaxLengthExceeded(f"cannot rewind session {self.id} to {start}: it holds {self.cached} tokens")
        if start + new_tokens > self.request.max_length:
            raise MaxLengthExceeded(
                f"session {self.id} reserved max_length={self.request.max_length}; "
                f"{start} + {new_tokens} new tokens would exceed it (open the session with a larger max_length)"
            )
        return start

    def step(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
             start: int, rope_until: list[int] | None = None) -> torch.Tensor:
        """Runs on the compute thread: append after the first ``start`` cached tokens (a rewind
        when the cache holds more: later tokens are overwritten). ``rope_until``: see ``BlockSpan``."""
        cache = PassCache(self.pool, list(self.slots), [start] * len(self.slots), hidden.shape[1])
        out = self.span(hidden, positions, mask, cache, self.request.start, self.request.end, rope_until)
        self.cached = start + hidden.shape[1]
        return out


class SessionTable:
    """All open sessions of a node, with the cache budget they reserve against.

    On a GPU a span's pool takes its memory whole when the span's first session opens, and other
    processes on the same GPU (other nodes, a client) may have taken memory since the budget was
    set. So the budget is checked against the memory free then: a default one (``fit_to_device``:
    a share of what was free after loading) shrinks to the same share of what is free now, and the
    node announces the smaller one; a budget the operator set that no longer fits refuses the
    session (CacheFull, which sends the client to another node) with a line naming the options."""

    def __init__(self, cache_tokens: int, on_change: Callable[[], None] = lambda: None, fit_to_device: bool = False):
        self.cache_tokens = cache_tokens
        self.fit_to_device = fit_to_device
        self.sessions: dict[str, Session] = {}  # session_id -> session
        self.pools: dict[BlockSpan, CachePool] = {}  # span -> the cache of its sessions, while it has some
        self.on_change = on_change  # called when a session opens or closes (the node re-announces its load)

    @property
    def tokens_left(self) -> int:
        return self.cache_tokens - sum(s.reserved for s in self.sessions.values())

    def held_by(self, peer: str) -> tuple[int, int]:
        """(sessions, cache tokens reserved) of one peer."""
        mine = [s for s in self.sessions.values() if s.peer == peer]
        return len(mine), sum(s.reserved for s in mine)

    def open(self, request: OpenSession, span: BlockSpan | None, peer: str = "") -> Session:
        if request.session_id in self.sessions:
            raise BadRequest(f"session {request.session_id} is already open")
        if span is not None and span not in self.pools:
            self._fit_budget(span)
        needed = request.max_length * request.batch_size
        if needed > self.tokens_left:
            raise CacheFull(
                f"session needs {needed} cache tokens (max_length x batch), only {self.tokens_left} of "
                f"{self.cache_tokens} are free here"
            )
        session = Session(request, span, peer=peer, previous=request.previous)
        if span is not None:
            if span not in self.pools:
                self.pools[span] = self._new_pool(span)
            session.pool = self.pools[span]
            session.slots = session.pool.take(request.batch_size, request.max_length)
        self.sessions[request.session_id] = session
        logger.debug("opened session %s (%d tokens)", request.session_id, needed)
        self.on_change()
        return session

    def _fit_budget(self, span: BlockSpan) -> None:
        """Before ``span``'s pool is made: the budget within the device memory free now."""
        free = hardware.free_device_bytes(span.device)
        if free is None:
            return
        per_slot = bytes_per_token(span.config, span.end - span.start, span.dtype)
        if self.fit_to_device:  # the default: its share of what is free now, unless only a little short of it
            fits = int(hardware.GPU_CACHE_SHARE * free) // per_slot
            if fits < (1 - SHRINK_TOLERANCE) * self.cache_tokens:
                logger.warning("%s has %.2f GiB free now (other processes took memory since this node loaded): the "
                               "cache budget shrinks from %d to %d tokens", span.device, free / 2**30,
                               self.cache_tokens, fits)
                self.cache_tokens = fits
                self.on_change()
        elif free // per_slot < self.cache_tokens:
            logger.warning("a session was refused: the cache budget no longer fits in %s's free memory (%.2f GiB); "
                           "restart the node with a lower --cache-gib or --cache-tokens", span.device, free / 2**30)
            raise CacheFull(f"this node's cache budget ({self.cache_tokens} tokens, "
                            f"{self.cache_tokens * per_slot / 2**30:.2f} GiB) does not fit in the {free / 2**30:.2f} "
                            f"GiB free on {span.device} now: start the node with a lower --cache-gib or --cache-tokens")

    def _new_pool(self, span: BlockSpan) -> CachePool:
        try:
            return CachePool(span, self.cache_tokens)
        except RuntimeError as e:  # out of memory: another process took it meanwhile (or, on a CPU, the
            hardware.release_memory(span.device)  # budget is more than the system lets one process map)
            logger.warning("a session was refused: the cache pool (%d tokens) cannot be allocated on %s (%s); "
                           "restart the node with a lower --cache-gib or --cache-tokens", self.cache_tokens,
                           span.device, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
            raise CacheFull(f"the cache pool ({self.cache_tokens} tokens) does not fit in {span.device}'s free "
                            f"memory now; try another node") from None

    def get(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise UnknownSession(f"no open session {session_id!r} on this node (open it first)") from None

    def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        session.closed = True
        if session.pool is not None:
            session.pool.give_back(session.slots)
            if not any(s.pool is session.pool for s in self.sessions.values()):
                del self.pools[session.span]  # its memory goes with the last session on that span
        logger.debug("closed session %s", session_id)
        self.on_change()
