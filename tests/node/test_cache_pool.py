"""The cache pool: sessions own disjoint slots from open to close, and a span's pool goes with its last session."""
import pytest
import torch

from potluck.node.cache_pool import PassCache
from potluck.node.sessions import SessionTable
from potluck.node.span import load_span
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.errors import CacheFull
from potluck.protocol.messages import OpenSession


def test_sessions_hold_disjoint_slots_until_they_close(tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 2, torch.float32)
    table = SessionTable(100)
    a = table.open(OpenSession("a", 0, 2, 30, 2), span)
    b = table.open(OpenSession("b", 0, 2, 40, 1), span)
    assert a.pool is b.pool and a.pool.slots_in_use == 100
    assert a.slots.shape == (2, 30) and b.slots.shape == (1, 40)
    assert len(set(a.slots.flatten().tolist()) | set(b.slots.flatten().tolist())) == 100
    with pytest.raises(CacheFull):
        table.open(OpenSession("c", 0, 2, 1, 1), span)
    pool = a.pool
    table.close("a")
    assert pool.slots_in_use == 40 and table.pools
    c = table.open(OpenSession("c", 0, 2, 60, 1), span)  # a's slots serve the next session
    assert set(c.slots.flatten().tolist()).isdisjoint(b.slots.flatten().tolist())
    table.close("b")
    table.close("c")
    assert not table.pools  # the memory went with the last session


def test_a_pass_writes_new_tokens_and_reads_rows_left_padded(tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 2, torch.float32)
    table = SessionTable(100)
    short, long = (table.open(OpenSession(name, 0, 2, 10, 1), span) for name in ("short", "long"))
    pool = short.pool
    kv_heads, _, head_dim = pool.keys[0].shape
    for session, length in ((short, 2), (long, 5)):  # write each session's first tokens as a prefill would
        cache = PassCache(pool, list(session.slots), [0], length)
        keys = torch.full((1, kv_heads, length, head_dim), float(length))
        cache.update(keys, keys, 0)
    cache = PassCache(pool, [short.slots[0], long.slots[0]], [2, 5], 1)
    new = torch.full((2, kv_heads, 1, head_dim), -1.0)
    keys, _ = cache.update(new, new, 0)  # [B, heads, 6, dim]
    assert keys.shape == (2, kv_heads, 6, head_dim) and cache.get_seq_length() == 5
    assert keys[0, 0, :, 0].tolist() == [0, 0, 0, 2, 2, -1]  # padding reads the zero slot
    assert keys[1, 0, :, 0].tolist() == [5, 5, 5, 5, 5, -1]
    assert pool.keys[0][0, short.slots[0, 2], 0] == -1  # the new token's key went to its own slot


def test_passes_of_any_size_read_through_the_pools_buffers_keys_apart_from_values(tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 2, torch.float32)
    table = SessionTable(200)
    a, b = (table.open(OpenSession(name, 0, 2, 50, 1), span) for name in ("a", "b"))
    pool = a.pool
    kv_heads, _, head_dim = pool.keys[0].shape
    for length in (3, 40, 7):  # reads of 6, 80 then 14 slots: the buffers grow, then serve a smaller read
        cache = PassCache(pool, [a.slots[0], b.slots[0]], [0, 0], length)
        tokens = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(2, kv_heads, length, head_dim)
        keys, values = cache.update(tokens + 1000 * length, -tokens, 1)
        assert torch.equal(keys, tokens + 1000 * length) and torch.equal(values, -tokens)
    assert pool.keys[1][0, a.slots[0, 6], 0] == 7006  # the last pass's keys are in the pool itself too
