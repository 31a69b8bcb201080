"""The node's attention cache: one pool of token slots per span, shared by the sessions on it.

Each block of the span has one keys and one values tensor of token slots [kv heads, slots,
head dim], allocated when the span's first session opens and sized by the node's cache budget
(on a GPU the memory is taken then; on the CPU pages are touched only as tokens are written). A
session owns ``max_length x batch`` slots from the moment it opens, so a step never waits for
memory nor copies a session's cache to grow it; closing gives them back.

A pass through the blocks (``PassCache``) writes its new tokens' keys and values into their
slots and reads each row's slots back as one left-padded tensor per block: one indexing
operation for all rows, not a copy per session. Heads come first so that what a pass reads holds
each row's keys of one head together, as attention reads them (with the slots first, a 32-row
pass through 4 tiny blocks at ~100 cached tokens took 31 ms on a CPU instead of 25, at ~250
50 instead of 34). The slot after the last holds zeros; padding reads it, and the mask hides it
(a masked zero key adds exactly nothing). The one after that is scratch: the filler rows of a
fixed-shape pass (``graphs``) write there.
"""
from __future__ import annotations

import torch

from potluck.protocol.errors import CacheFull
from potluck.protocol.families import kv_shape


def bytes_per_token(config, blocks: int, dtype: torch.dtype) -> int:
    """Keys and values of one token in ``blocks`` blocks of a model with ``config``: a slot's size
    over a span's pool."""
    kv_heads, head_dim = kv_shape(config)
    return 2 * kv_heads * head_dim * blocks * torch.finfo(dtype).bits // 8


class CachePool:
    """Token slots for blocks ``span.start:span.end`` on the span's device and dtype."""

    def __init__(self, span, capacity: int):
        kv_heads, head_dim = kv_shape(span.config)
        shape = (kv_heads, capacity + 2, head_dim)  # then zeros, for padding, and scratch
        self.start, self.device, self.pad, self.scratch = span.start, span.device, capacity, capacity + 1
        self.keys = [torch.empty(shape, dtype=span.dtype, device=span.device) for _ in range(span.start, span.end)]
        self.values = [torch.empty(shape, dtype=span.dtype, device=span.device) for _ in range(span.start, span.end)]
        for tensor in self.keys + self.values:
            tensor[:, capacity].zero_()
        self._free = torch.arange(capacity)  # a stack of free slot numbers (CPU); the first `_top` are free
        self._top = capacity
        self._read = [torch.empty(0, dtype=span.dtype, device=span.device) for _ in range(2)]
        self.fixed = None  # its fixed-shape decoding passes (``graphs.FixedPasses``), once one ran

    def read_buffer(self, which: int, slots: int) -> torch.Tensor:
        """A buffer [kv heads, slots, head dim] for a pass's keys (``which`` 0) or values (1): its
        memory is kept between passes, so a CPU gather writes into memory already mapped (a fresh
        multi-megabyte tensor per block is new pages from the kernel: the gather took 4x as long)."""
        kv_heads, _, head_dim = self.keys[0].shape
        size, buffer = kv_heads * slots * head_dim, self._read[which]
        if buffer.numel() < size:  # grown by half at least: passes read one more token per step
            buffer = self._read[which] = torch.empty(max(size, buffer.numel() * 3 // 2), dtype=buffer.dtype,
                                                     device=buffer.device)
        return buffer[:size].view(kv_heads, slots, head_dim)

    @property
    def slots_in_use(self) -> int:
        return self.pad - self._top

    def take(self, rows: int, length: int) -> torch.Tensor:
        """Slots for ``rows`` sequences of up to ``length`` tokens: [rows, length] (CPU)."""
        count = rows * length
        if count > self._top:  # the session table's budget keeps this from happening
            raise CacheFull(f"{count} cache slots asked, {self._top} free")
        self._top -= count
        return self._free[self._top:self._top + count].clone().view(rows, length)

    def give_back(self, slots: torch.Tensor) -> None:
        flat = slots.reshape(-1)
        self._free[self._top:self._top + len(flat)] = flat
        self._top += len(flat)


class PassCache:
    """Rows of a pool as the transformers cache of one pass: row b holds ``lengths[b]`` tokens in
    the first slots of ``rows[b]`` and gets ``new`` more; rows are left-padded to the longest.
    ``kept``: row b keeps only its first ``kept[b]`` new tokens (short prompts run with longer
    ones); the rest of its new columns write the pool's scratch slot, and only later columns of
    the same row, which causal attention hides from its real tokens, read them."""

    def __init__(self, pool: CachePool, rows: list[torch.Tensor], lengths: list[int], new: int,
                 kept: list[int] | None = None):
        self.pool, self.prefix = pool, max(lengths)
        read, write = slots_read_and_written(rows, lengths, new, self.prefix + new, pool.pad, kept, pool.scratch)
        self._use(read.to(pool.device), write.to(pool.device))

    @classmethod
    def of_slots(cls, pool: CachePool, read: torch.Tensor, write: torch.Tensor) -> "PassCache":
        """A pass reading slots ``read`` [B, prefix + new] and writing ``write`` [B, new], given
        as tensors on the pool's device (a fixed-shape pass fills them in place before each run)."""
        cache = cls.__new__(cls)
        cache.pool, cache.prefix = pool, read.shape[1] - write.shape[1]
        cache._use(read, write)
        return cache

    def _use(self, read: torch.Tensor, write: torch.Tensor) -> None:
        self.read, self.write = read, write  # [B, prefix + new], [B, new]
        # flat, for index_copy_ / index_select: about 5x faster than indexing with the 2-D tensors on a CPU
        self._read_flat, self._write_flat = read.reshape(-1), write.reshape(-1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by each attention layer with its new keys/values [B, heads, new, dim]; returns
        the row's whole keys/values [B, heads, prefix + new, dim]."""
        block = layer_idx - self.pool.start
        kv_heads, _, head_dim = self.pool.keys[block].shape
        whole = []  # views of the pool's read buffers: the next block's update overwrites them
        for which, (pool, new) in enumerate(((self.pool.keys[block], keys), (self.pool.values[block], values))):
            pool.index_copy_(1, self._write_flat, new.transpose(0, 1).reshape(kv_heads, -1, head_dim))
            buffer = self.pool.read_buffer(which, self._read_flat.numel())
            read = torch.index_select(pool, 1, self._read_flat, out=buffer)  # [kv heads, B * tokens, head dim]
            whole.append(read.view(kv_heads, *self.read.shape, head_dim).transpose(0, 1))
        return whole[0], whole[1]


def slots_read_and_written(rows: list[torch.Tensor], lengths: list[int], new: int, width: int, pad: int,
                           kept: list[int] | None = None, scratch: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots a pass reads, [B, width]: row b's ``lengths[b]`` cached and ``new`` tokens
    right-aligned, the zero slot ``pad`` before them; and the slots it writes, [B, new] (CPU).
    ``kept``: row b's new tokens after its first ``kept[b]`` write (and read) ``scratch``."""
    if kept is None:
        write = torch.stack([row[length:length + new] for row, length in zip(rows, lengths)])
        if all(length + new == width for length in lengths):  # no padding (one session, or its own batch)
            return torch.stack([row[:width] for row in rows]), write
    else:
        write = torch.full((len(rows), new), scratch)
        for b, (row, length, keep) in enumerate(zip(rows, lengths, kept)):
            write[b, :keep] = row[length:length + keep]
    read = torch.full((len(rows), width), pad)
    for b, (row, length) in enumerate(zip(rows, lengths)):
        read[b, width - length - new:width - new] = row[:length]
    read[:, width - new:] = write
    return read, write
