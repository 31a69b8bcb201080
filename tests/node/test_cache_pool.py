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


def span_on_a_gpu(tiny_checkpoints, monkeypatch, free_gib: float):
    """Blocks 0:2 of the tiny Llama on ``meta`` (standing in for a GPU), which reports ``free_gib``
    free (a list: change its item to change what is free)."""
    from potluck.node import hardware
    from tests.devices import OTHER_DEVICE

    free = [free_gib]
    monkeypatch.setattr(hardware, "free_device_bytes",
                        lambda device: int(free[0] * 2**30) if device == OTHER_DEVICE else None)
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 2, torch.float32, OTHER_DEVICE)
    return span, free


def test_a_default_budget_shrinks_to_what_the_gpu_has_free_when_the_pool_is_made(tiny_checkpoints, monkeypatch):
    from potluck.node.cache_pool import bytes_per_token
    from potluck.node.hardware import GPU_CACHE_SHARE

    span, free = span_on_a_gpu(tiny_checkpoints, monkeypatch, 1.0)
    per_slot = bytes_per_token(span.config, 2, torch.float32)  # 2 blocks x keys and values x kv heads x dim x 4
    assert per_slot == 2 * 2 * span.config.num_key_value_heads * span.config.head_dim * 4
    budget = int(GPU_CACHE_SHARE * 2**30) // per_slot  # its share of 1 GiB, as at load
    announced = []
    table = SessionTable(budget, on_change=lambda: announced.append(table.tokens_left), fit_to_device=True)
    free[0] = 0.98  # a little less free since: within the tolerance, the budget stays
    first = table.open(OpenSession("first", 0, 2, 100, 1), span)
    assert table.cache_tokens == budget and first.pool.pad == budget
    table.close("first")
    free[0] = 0.25  # another node on the GPU took most of it before this span's pool was made again
    shrunk = int(GPU_CACHE_SHARE * 0.25 * 2**30) // per_slot
    second = table.open(OpenSession("second", 0, 2, 100, 1), span)
    assert table.cache_tokens == shrunk and second.pool.pad == shrunk  # the pool holds what the node announces
    assert announced[-2:] == [shrunk, shrunk - 100]  # re-announced smaller, then with the session in it
    with pytest.raises(CacheFull, match=f"only {shrunk - 100} of {shrunk}"):
        table.open(OpenSession("too-big", 0, 2, shrunk, 1), span)


def test_a_budget_the_operator_set_that_no_longer_fits_refuses_sessions_until_memory_frees(tiny_checkpoints,
                                                                                          monkeypatch):
    from potluck.node.cache_pool import bytes_per_token

    span, free = span_on_a_gpu(tiny_checkpoints, monkeypatch, 0.001)
    budget = 2**20 // bytes_per_token(span.config, 2, torch.float32) * 2  # 2 MiB of cache, with 1 MiB free
    table = SessionTable(budget)
    with pytest.raises(CacheFull, match="lower --cache-gib or --cache-tokens"):
        table.open(OpenSession("s", 0, 2, 10, 1), span)
    assert not table.sessions and not table.pools and table.cache_tokens == budget
    free[0] = 0.01
    assert table.open(OpenSession("s", 0, 2, 10, 1), span).pool.pad == budget


def test_a_pool_the_gpu_cannot_hold_refuses_the_session_and_the_table_keeps_serving(tiny_checkpoints, monkeypatch):
    from potluck.node.cache_pool import CachePool

    span, _ = span_on_a_gpu(tiny_checkpoints, monkeypatch, 1.0)
    table = SessionTable(100, fit_to_device=True)

    def taken_meanwhile(pool, span, capacity):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(CachePool, "__init__", taken_meanwhile)
        with pytest.raises(CacheFull, match="try another node"):
            table.open(OpenSession("s", 0, 2, 10, 1), span)
    assert not table.sessions and not table.pools and table.tokens_left == 100
    assert table.open(OpenSession("s", 0, 2, 10, 1), span).pool.pad == 100
