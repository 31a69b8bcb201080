"""A node moving to another span (node/moving.py), with the node's other parts stood in for."""
import asyncio
import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import potluck.node.moving as moving
from potluck.node.compute import ComputeLane
from potluck.node.handlers import BlockServicer, ServingLimits
from potluck.node.moving import Rebalancer
from potluck.node.server import NodeConfig, cache_bytes_per_token
from potluck.node.sessions import SessionTable
from potluck.node.span import load_span
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.records import NodeState


class Announcements:
    def __init__(self, node):
        self.node, self.made = node, []

    async def announce(self, state):
        self.made.append((state, self.node.config.start, self.node.config.end))
        return True


@pytest.fixture
def node(tiny_checkpoints):
    checkpoint = resolve_checkpoint(str(tiny_checkpoints["llama"]))
    span = load_span(checkpoint, 0, 4, torch.float32)
    node = SimpleNamespace(checkpoint=checkpoint, device=torch.device("cpu"), peer_id="me",
                           config=NodeConfig(model=None, start=0, end=4, dtype="float32", drain_timeout=0.5),
                           sessions=SessionTable(100))
    node.cache_bytes_per_token = lambda blocks: cache_bytes_per_token(checkpoint, blocks, torch.float32)
    node.servicer = BlockServicer(span, ComputeLane(), node.sessions, ServingLimits(), dict, links=None)
    node.announcer = Announcements(node)
    yield node
    node.servicer.compute.shutdown()


def test_a_move_loads_only_the_missing_blocks_and_announces_joining_then_online(node):
    old = node.servicer.span
    asyncio.run(Rebalancer(node, 1.0, 0.75).move((2, 6)))
    new = node.servicer.span
    assert (new.start, new.end) == (2, 6) and new.blocks[0] is old.blocks[2] and new.blocks[1] is old.blocks[3]
    assert node.announcer.made == [(NodeState.JOINING, 2, 6), (NodeState.ONLINE, 2, 6)]


def test_without_room_for_both_spans_the_old_one_goes_first(node, caplog):
    caplog.set_level(logging.INFO, logger="potluck.node.moving")
    node.config = replace(node.config, max_memory_gib=1e-6)  # room for nothing extra
    asyncio.run(Rebalancer(node, 1.0, 0.75).move((4, 8)))
    assert (node.servicer.span.start, node.servicer.span.end) == (4, 8)
    assert "draining the old span first" in caplog.text


def test_a_move_that_cannot_load_serves_the_old_span_again(node, monkeypatch, caplog):
    old = node.servicer.span

    def broken(*args):
        raise OSError("disk unreadable")

    monkeypatch.setattr(moving, "load_span", broken)
    asyncio.run(Rebalancer(node, 1.0, 0.75).move((4, 8)))
    assert node.servicer.span is old and (node.config.start, node.config.end) == (0, 4)
    assert node.announcer.made == [(NodeState.JOINING, 4, 8), (NodeState.ONLINE, 0, 4)]
    assert "could not move to blocks 4:8 (OSError: disk unreadable); serving 0:4 again" in caplog.text
