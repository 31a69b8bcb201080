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


def test_nodes_that_stop_answering_do_not_count_and_their_blocks_are_taken_at_once(node, monkeypatch):
    from potluck.protocol.records import NodeRecord

    records = {"me": NodeRecord(model="m", start=0, end=4, state=NodeState.ONLINE, inference_steps_per_s=1.0),
               "twin": NodeRecord(model="m", start=0, end=4, state=NodeState.ONLINE, inference_steps_per_s=1.0),
               "dead": NodeRecord(model="m", start=4, end=8, state=NodeState.ONLINE, inference_steps_per_s=1.0)}

    async def read(*args):
        return dict(records)

    monkeypatch.setattr(moving, "read_block_records", read)
    monkeypatch.setattr(moving, "GAP_WAIT_S", 0.01)
    moves = []

    async def move(self, span):
        moves.append(span)

    monkeypatch.setattr(Rebalancer, "move", move)
    node.speed, node.silent, node.dht = SimpleNamespace(steps_per_s=1.0), set(), None
    rebalancer = Rebalancer(node, 600.0, 0.75)
    assert asyncio.run(rebalancer.check()) is None  # its record says it serves 4:8
    node.silent = {"dead"}  # it did not answer this period's ping
    found = asyncio.run(rebalancer.check())
    assert found.span == (4, 8) and found.fills_gap and "not answering: dead" in found.reason
    asyncio.run(rebalancer._balance_once(gaps_only=True))
    assert moves == [(4, 8)]
    records["dead"] = replace(records["dead"], end=6)  # blocks 6:8 were never served: a weakest point, not a node gone
    records["other"] = NodeRecord(model="m", start=6, end=8, state=NodeState.ONLINE, inference_steps_per_s=0.01)
    node.silent = set()
    assert asyncio.run(rebalancer.check()) is not None  # a slow block: a move for throughput, at its period
    asyncio.run(rebalancer._balance_once(gaps_only=True))
    assert moves == [(4, 8)]  # not when nudged
