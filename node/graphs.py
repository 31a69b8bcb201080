"""Decoding passes at fixed shapes, replayed from CUDA graphs on a GPU (``potluck node --cuda-graphs``).

On a GPU a decoding step of a few sessions costs what launching its kernels costs, not what the
GPU does: about 45 kernels a block, each launched from Python (741 for 16 blocks of an 8B model,
about 10 us each, measured on an H100, against 8.4 ms of GPU work). A CUDA graph records a pass
once and replays all of its kernels with one launch. A graph needs fixed shapes and fixed
memory, so a pass runs in a bucket: its rows rounded up to a power of two (filler rows attend to
the pool's zero slot only and write its scratch slot), its cache length rounded up to a multiple
of ``LENGTH_STEP`` (each row right-aligned, what is not its own masked, as in any batch), and its
inputs copied into the bucket's own tensors before each run. Attention over masked slots adds
exact zeros, so a session gets what it gets in any other batch.

A bucket's graph is captured the first time it is used and kept with the pool (at most
``MAX_GRAPHS``, the least recently used goes first). Where graphs are off (a CPU) the same
fixed-shape pass runs eagerly: the CPU tests check it against each session alone. A mixture of
experts picks its experts with data-dependent operations (``nonzero``: the CPU waits for the GPU),
which a graph cannot hold: its passes go the usual way; so do those of any pass whose capture
fails, said once in the log.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from .cache_pool import CachePool, PassCache, slots_read_and_written

logger = logging.getLogger(__name__)
LENGTH_STEP = 256  # cache lengths of one bucket: attention reads up to this many masked slots more
MAX_GRAPHS = 16  # buckets a pool keeps captured


class Bucket:
    """The tensors of one fixed shape, on the pool's device: a pass reads them, runs are filled into them."""

    def __init__(self, pool: CachePool, span, start: int, end: int, rows: int, length: int):
        device = pool.device
        self.pool, self.span, self.start, self.end = pool, span, start, end
        self.hidden = torch.zeros(rows, 1, span.config.hidden_size, dtype=span.dtype, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.attend = torch.zeros(rows, length, dtype=torch.bool, device=device)  # [rows, cache + new]
        self.read = torch.full((rows, length), pool.pad, dtype=torch.long, device=device)
        self.write = torch.full((rows, 1), pool.scratch, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None  # where the graph leaves its result
        self.buffers: list[torch.Tensor] = []  # the pool's read buffers the graph writes into: kept alive

    def forward(self) -> torch.Tensor:
        cache = PassCache.of_slots(self.pool, self.read, self.write)
        return self.span(self.hidden, self.positions, self.attend, cache, self.start, self.end)

    def fill(self, hidden, positions, attend, read, write) -> None:
        for mine, given in ((self.hidden, hidden), (self.positions, positions), (self.attend, attend),
                            (self.read, read), (self.write, write)):
            mine.copy_(given)

    def capture(self, memory) -> None:
        """Record the pass as a CUDA graph (after a warm-up run: libraries set themselves up then).
        Filler inputs only: the warm-up writes nothing but the scratch slot."""
        rows, length = self.read.shape
        for which in (0, 1):  # sized now, so that the pass allocates no read buffer while captured
            self.buffers.append(self.pool.read_buffer(which, rows * length))
        self.attend[:, -1] = True
        with torch.cuda.device(self.pool.device):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the node's event loop may copy earlier results to the CPU meanwhile
            with torch.cuda.graph(graph, pool=memory, capture_error_mode="thread_local"):
                self.output = self.forward()
        self.graph = graph

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.output


class FixedPasses:
    """A pool's fixed-shape decoding passes, by bucket; captured as CUDA graphs if ``capture``."""

    def __init__(self, pool: CachePool, capture: bool):
        self.pool, self.capture = pool, capture
        self.usable = True  # False once a pass could not be captured: decoding passes go the usual way
        self.replays = 0  # passes run from a CUDA graph
        self.buckets: OrderedDict[tuple[int, int, int, int], Bucket] = OrderedDict()
        self.memory = torch.cuda.graph_pool_handle() if capture else None  # one memory pool for all its graphs

    @torch.inference_mode()
    def run(self, works: list) -> torch.Tensor:
        """One new token for each of ``works`` (``batching.StepWork``s of one span and block range,
        sessions of one row): their outputs [len(works), 1, H]."""
        session, starts, count = works[0].session, [work.start for work in works], len(works)
        rows = 1 << (count - 1).bit_length()
        length = -(-(max(starts) + 1) // LENGTH_STEP) * LENGTH_STEP  # the longest cache and its new token
        bucket = self._bucket(session.span, session.request.start, session.request.end, rows, length)
        read, write = torch.full((rows, length), self.pool.pad), torch.full((rows, 1), self.pool.scratch)
        read[:count], write[:count] = slots_read_and_written([work.session.slots[0] for work in works], starts, 1,
                                                             length, self.pool.pad)
        cached = torch.tensor(starts + [0] * (rows - count)).unsqueeze(1)  # filler rows: the zero slot only
        attend = torch.arange(length) >= length - 1 - cached  # [rows, length]
        hidden = torch.zeros(rows, 1, bucket.hidden.shape[2], dtype=bucket.hidden.dtype)
        hidden[:count] = torch.cat([work.hidden for work in works])
        positions = torch.zeros(rows, 1, dtype=torch.long)
        positions[:count] = torch.cat([work.positions for work in works])
        bucket.fill(hidden, positions, attend, read, write)
        out = bucket.run()[:count].clone()  # the next run overwrites the bucket's output
        self.replays += bucket.graph is not None
        return out

    def _bucket(self, span, start: int, end: int, rows: int, length: int) -> Bucket:
        key = (start, end, rows, length)
        if key in self.buckets:
            self.buckets.move_to_end(key)
            return self.buckets[key]
        bucket = Bucket(self.pool, span, start, end, rows, length)
        if self.capture:
            try:
                bucket.capture(self.memory)
            except Exception as e:
                self.usable = False
                logger.warning("decoding passes of blocks %d:%d run without CUDA graphs: capturing one "
                               "failed (%s: %s)", start, end, type(e).__name__, e)
                raise
        self.buckets[key] = bucket
        if len(self.buckets) > MAX_GRAPHS:
            self.buckets.popitem(last=False)
        return bucket


def decode_fixed(works: list, capture: bool) -> torch.Tensor | None:
    """``works``' outputs [B, 1, H] from a fixed-shape pass of their pool (a CUDA graph if
    ``capture``); None where the pool cannot run one (capturing failed)."""
    pool, config = works[0].session.pool, works[0].session.span.config
    if pool.fixed is None:
        pool.fixed = FixedPasses(pool, capture)
        if capture and getattr(config, "num_experts_per_tok", None):  # not even tried: see the module's doc
            pool.fixed.usable = False
            logger.warning("decoding passes run without CUDA graphs: a mixture of experts picks its experts "
                           "with data-dependent operations, which a graph cannot hold")
    if not pool.fixed.usable:
        return None
    try:
        return pool.fixed.run(works)
    except Exception:
        if pool.fixed.usable:
            raise
        return None  # capturing failed: the pass runs the usual way
