"""Rebalancing: a node that chose its own blocks looks at the swarm every --balance-period and
moves where it is needed more (``placement.should_move``) without breaking anyone's session.

A move: announce JOINING on the new span (routers send the old span no new session), load the
blocks it lacks (blocks it keeps are shared, not read again), serve the new span, then give the
sessions still computing on the old span up to --drain-timeout to finish and tell the rest to go
elsewhere. Where the memory budget has no room for both spans at once, the old span drains first
and its blocks are dropped before the new ones load. Nodes that see the same need at the same
moment must not all answer it: each waits a random moment and reads the swarm again before it
moves; a move is visible (JOINING) as soon as it starts.

Nodes that did not answer this node's last pings (``Node.silent``) do not count: a node killed
without a word keeps its record for up to 2.5 announce periods. Besides each period's pings, the
nodes that alone hold some block are pinged every ``SOLE_CHECK_S``. When some are silent the node
checks at once, not at its next period, and moves only to cover blocks left with no node (after
a wait of at most ``GAP_WAIT_S``): sessions that lost the only node of some blocks are waiting.
"""
from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from potluck.protocol.checkpoint import DTYPES, config_id
from potluck.protocol.directory import read_block_records
from potluck.protocol.errors import NodeDraining
from potluck.protocol.records import NodeState

from . import hardware, placement
from .pings import ping_all
from .span import BlockSpan, block_bytes, load_span

if TYPE_CHECKING:
    from .server import Node

logger = logging.getLogger(__name__)
GAP_WAIT_S = 5.0  # the longest a node waits before moving to blocks that no live node serves
SOLE_CHECK_S = 5.0  # how often a self-placing node pings the nodes that alone hold some block


class Rebalancer:
    def __init__(self, node: "Node", period: float, quality: float):
        self.node, self.period, self.quality = node, period, quality
        self._nudged = asyncio.Event()

    def nudge(self) -> None:
        """Check now for blocks left with no node (some nodes stopped answering)."""
        self._nudged.set()

    async def run(self) -> None:
        """Check every period (jittered, so nodes started together do not check together), and
        when nudged."""
        while True:
            try:
                await asyncio.wait_for(self._nudged.wait(), self.period * random.uniform(0.5, 1.0))
            except TimeoutError:
                pass
            gaps_only = self._nudged.is_set()
            self._nudged.clear()
            try:
                await self._balance_once(gaps_only)
            except Exception as e:  # e.g. the DHT did not answer: the next period tries again
                logger.warning("rebalancing check failed: %s", e)

    async def watch_sole_holders(self) -> None:
        """Every ``SOLE_CHECK_S``, ping the nodes that alone hold some block (a few, known from the
        last period's pings): one that died is found within seconds, not at the next period."""
        node = self.node
        while True:
            await asyncio.sleep(SOLE_CHECK_S)
            watched = sorted(node.sole_holders - node.silent)
            if not watched:
                continue
            try:
                _, silent = await ping_all(node.p2p, watched)
            except Exception as e:  # the next check tries again
                logger.debug("could not ping the nodes alone on their blocks: %s", e)
                continue
            if silent:
                node.silent = node.silent | silent
                self.nudge()

    async def _balance_once(self, gaps_only: bool = False) -> None:
        """Move if the swarm needs it; ``gaps_only``: only to cover blocks no live node serves."""
        move = await self.check()
        if move is None or (gaps_only and not move.fills_gap):
            return
        wait = min(self.period / 2, GAP_WAIT_S) if move.fills_gap else self.period / 2
        await asyncio.sleep(random.uniform(0, wait))  # another node may answer the same need
        move = await self.check()
        if move is None or (gaps_only and not move.fills_gap):
            logger.info("staying on blocks %d:%d: the swarm changed while waiting to move", *self._span())
            return
        logger.info("moving from blocks %d:%d to %d:%d: %s", *self._span(), *move.span, move.reason)
        await self.move(move.span)

    async def check(self) -> placement.Move | None:
        node = self.node
        if node.servicer.draining or node.servicer.span is None:
            return None
        records = await read_block_records(node.dht, node.checkpoint.name, node.checkpoint.num_blocks,
                                           config_id(node.checkpoint.config))
        silent = sorted(set(records) & node.silent)
        records = {peer: record for peer, record in records.items() if peer not in node.silent}
        move = placement.should_move(records, node.peer_id, self._span(), node.checkpoint.num_blocks,
                                     node.speed.steps_per_s or 1.0, self.quality)
        if move is not None and move.fills_gap and silent:
            move = replace(move, reason=f"{move.reason} (not answering: {', '.join(silent)})")
        return move

    async def move(self, span: tuple[int, int]) -> None:
        node, servicer = self.node, self.node.servicer
        old = servicer.span
        was, kept = (old.start, old.end), {}
        node.config = replace(node.config, start=span[0], end=span[1])
        await node.announcer.announce(NodeState.JOINING)
        began = time.monotonic()
        missing = sum(1 for i in range(*span) if not old.start <= i < old.end)
        try:
            if self._room_for(old.end - old.start + missing):
                servicer.span = await self._load(span, old.blocks_by_index(range(*span)))
                await node.announcer.announce(NodeState.ONLINE)
                await self._drain(old)
            else:
                logger.info("no room for blocks %d:%d beside %d:%d: draining the old span first", *span, *was)
                servicer.span = None
                await self._drain(old)
                kept = old.blocks_by_index(range(*span))
                del old  # its other blocks go once the last session on them has closed
                hardware.release_memory(node.device)
                servicer.span = await self._load(span, kept)
                await node.announcer.announce(NodeState.ONLINE)
        except Exception as e:
            logger.error("could not move to blocks %d:%d (%s: %s); serving %d:%d again", *span, type(e).__name__, e,
                         *was)
            node.config = replace(node.config, start=was[0], end=was[1])
            if servicer.span is None or (servicer.span.start, servicer.span.end) != was:
                servicer.span = await self._load(was, kept)
            await node.announcer.announce(NodeState.ONLINE)
            return
        logger.info("moved: ONLINE on blocks %d:%d after %.1f s (loaded %d blocks, kept %d)", *span,
                    time.monotonic() - began, missing, span[1] - span[0] - missing)

    async def _load(self, span: tuple[int, int], kept: dict) -> BlockSpan:
        node = self.node
        return await asyncio.to_thread(load_span, node.checkpoint, *span, DTYPES[node.config.dtype], node.device,
                                       sys.stderr.isatty(), kept, None, node.config.quant)

    async def _drain(self, old: BlockSpan) -> None:
        """Let sessions on the old span finish (up to --drain-timeout), then send the rest away."""
        servicer, timeout = self.node.servicer, self.node.config.drain_timeout
        deadline = time.monotonic() + timeout
        while servicer.sessions_on(old) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if left := servicer.sessions_on(old):
            logger.warning("telling %d sessions still on blocks %d:%d after %.0f s to go elsewhere", len(left),
                           old.start, old.end, timeout)
            await servicer.evict(NodeDraining(f"node {self.node.peer_id} moved off blocks {old.start}:{old.end}; "
                                              "continue on another node"), span=old)

    def _room_for(self, blocks: int) -> bool:
        """Whether ``blocks`` blocks and the cache budget fit at once: within --max-memory if set,
        else the new blocks in the memory free now."""
        node = self.node
        dtype = DTYPES[node.config.dtype]
        per_block = block_bytes(node.checkpoint, 0, dtype, node.config.quant)
        cache = node.sessions.cache_tokens * node.cache_bytes_per_token(node.config.end - node.config.start)
        if node.config.max_memory_gib is not None:
            return blocks * per_block + cache <= node.config.max_memory_gib * 2**30
        current = node.servicer.span
        return (blocks - (current.end - current.start)) * per_block + cache <= hardware.usable_memory(node.device)

    def _span(self) -> tuple[int, int]:
        return self.node.config.start, self.node.config.end
