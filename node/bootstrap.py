"""`potluck dht`: a bootstrap peer other peers join through; it serves the DHT and nothing else."""
from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from potluck.protocol.network import INITIAL_PEERS_ENV, join_swarm

logger = logging.getLogger(__name__)


async def run_bootstrap(initial_peers: Sequence[str], host_maddrs: Sequence[str], identity_path: str | None,
                        stop: asyncio.Event) -> None:
    p2p, dht = await join_swarm(initial_peers, host_maddrs, identity_path=identity_path)
    try:
        maddrs = await p2p.get_visible_maddrs()
        print(f"{INITIAL_PEERS_ENV}={maddrs[0]}", flush=True)
        logger.info("bootstrap peer listening; other peers join with the line above")
        await stop.wait()
    finally:
        await dht.shutdown()
        await p2p.shutdown()
