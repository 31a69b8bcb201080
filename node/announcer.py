"""Keeps a node's record on the DHT: stored at every block key it serves, refreshed each period."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from potluck.protocol.records import (
    MODEL_INDEX_KEY, RECORD_TTL_PERIODS, ModelInfo, NodeRecord, NodeState, block_key, pack,
)

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(self, dht: DHTNode, peer_id: str, model: ModelInfo, make_record: Callable[[NodeState], NodeRecord],
                 period: float):
        self.dht, self.peer_id, self.model, self.make_record, self.period = dht, peer_id, model, make_record, period
        self.state = NodeState.JOINING
        self.min_gap = min(1.0, period)  # seconds between announcements triggered by nudges
        self._nudged = asyncio.Event()

    async def announce(self, state: NodeState | None = None, ttl: float | None = None) -> bool:
        """Store the record now, at every block of the span and in the model index."""
        self.state = state or self.state
        record = self.make_record(self.state)
        expiration = get_dht_time() + (ttl if ttl is not None else self.period * RECORD_TTL_PERIODS)
        keys = [block_key(record.model, i) for i in range(record.start, record.end)] + [MODEL_INDEX_KEY]
        values = [pack(record)] * (len(keys) - 1) + [pack(self.model)]
        subkeys = [self.peer_id] * len(keys)  # the index entry too: only this node can write or withdraw it
        try:
            stored = await self.dht.store_many(keys, values, expiration, subkeys=subkeys)
        except Exception as e:  # the DHT raises various errors when no peer answers; retried next period
            logger.warning("could not announce %s: %s", self.state.name, e)
            return False
        reached = sum(stored.values())
        if reached == 0:
            logger.warning("announcement %s reached no DHT peer; retrying next period", self.state.name)
        elif reached < len(keys):  # usual in small swarms: the record is stored, just on fewer peers
            logger.debug("announcement %s reached %d of %d keys", self.state.name, reached, len(keys))
        return reached == len(keys)

    def nudge(self) -> None:
        """Announce again soon (within ``min_gap``): e.g. the node's load changed."""
        self._nudged.set()

    async def run(self, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """Re-announce every period (sooner when nudged) until cancelled; ``before`` runs ahead of
        the first announcement of each period (e.g. measuring pings, the status line), nudged or not:
        on a node whose sessions come and go every few seconds, every announcement is a nudge's."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            try:
                await asyncio.wait_for(self._nudged.wait(), max(0.0, last + self.period - loop.time()))
                await asyncio.sleep(self.min_gap)  # gather the changes of a burst into one store
            except asyncio.TimeoutError:
                pass
            if before is not None and loop.time() - last >= self.period:
                last = loop.time()
                await before()
            self._nudged.clear()
            await self.announce()
