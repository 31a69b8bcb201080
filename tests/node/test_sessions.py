import pytest
import torch

from potluck.node.sessions import SessionTable
from potluck.node.span import load_span
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.errors import BadRequest, CacheFull, MaxLengthExceeded, UnknownSession
from potluck.protocol.messages import OpenSession


def open_request(session_id="s", max_length=100, batch_size=1):
    return OpenSession(session_id, 0, 2, max_length, batch_size)


def test_sessions_reserve_and_release_cache_tokens():
    table = SessionTable(cache_tokens=300)
    table.open(open_request("a", 100, 2), None)
    assert table.tokens_left == 100
    with pytest.raises(CacheFull):
        table.open(open_request("b", 101), None)
    table.close("a")
    assert table.tokens_left == 300


def test_unknown_and_duplicate_sessions():
    table = SessionTable(cache_tokens=300)
    table.open(open_request("a"), None)
    with pytest.raises(BadRequest):
        table.open(open_request("a"), None)
    with pytest.raises(UnknownSession):
        table.get("never-opened")


def test_steps_may_not_pass_max_length_or_rewind_forward():
    session = SessionTable(1000).open(open_request(max_length=10), None)
    assert session.step_start(None, 10) == 0
    session.cached = 8
    with pytest.raises(MaxLengthExceeded):
        session.step_start(None, 3)
    assert session.step_start(4, 6) == 4
    with pytest.raises(MaxLengthExceeded, match="rewind"):
        session.step_start(9, 1)


def test_a_pool_the_machine_cannot_allocate_refuses_the_session_as_cache_full(tiny_checkpoints):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 2, torch.float32)
    table = SessionTable(cache_tokens=10**13)  # petabytes: the CPU allocator refuses (a RuntimeError)
    with pytest.raises(CacheFull, match="try another node"):
        table.open(open_request(), span)
    assert not table.sessions
