"""`potluck dht`: a bootstrap peer other peers join through; it serves the DHT and nothing else.

On loopback unless asked to be public (--public, --host-maddrs, or initial peers beyond
loopback); it answers nodes' reachability checks and relays for nodes behind NAT (with the full
relay service unless --no-relay-service); it prints the addresses others can use, as a line
POTLUCK_INITIAL_PEERS=... that a shell can export. It keeps its peer id across restarts (see
``identity``), so that line stays valid as long as the port does (fix it with --host-maddrs
/ip4/0.0.0.0/tcp/PORT).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from hivemind.p2p import P2P

from potluck.protocol.identity import identity_path
from potluck.protocol.network import (INITIAL_PEERS_ENV, dialable, join_swarm, leave_swarm, p2p_options,
                                     wait_for_stop)
from potluck.protocol.reachability import serve_dialback

logger = logging.getLogger(__name__)


async def run_bootstrap(initial_peers: Sequence[str], host_maddrs: Sequence[str], announce_maddrs: Sequence[str],
                        identity: str | None, public: bool, stop: asyncio.Event, relay_service: bool = True) -> None:
    reachable = p2p_options(initial_peers, host_maddrs, public=public)["nat_port_map"]
    key = identity_path(identity, "dht", "--identity-path")
    p2p, dht = await join_swarm(initial_peers, host_maddrs, announce_maddrs, key, public=public,
                                relay_service=relay_service, relay_public=True)
    try:
        await serve_dialback(p2p)  # nodes ask their bootstrap peers whether others can reach them
        await print_join_address(p2p, reachable, "bootstrap peer ready")
        await wait_for_stop(p2p, stop)
    finally:
        await leave_swarm(p2p, dht)


async def print_join_address(p2p: P2P, reachable: bool, ready: str) -> None:
    """Print ``POTLUCK_INITIAL_PEERS=...`` with the addresses others join this peer at (those other
    machines can dial, where it is reachable beyond loopback), and log how to use it."""
    maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    shown = dialable(maddrs) if reachable else maddrs
    if reachable and not shown:
        logger.warning("no address here other peers could dial (only loopback); pass --announce-maddrs "
                       "or --host-maddrs with this machine's public address")
        shown = maddrs
    print(f"{INITIAL_PEERS_ENV}={','.join(shown)}", flush=True)
    logger.info("%s; others join with --initial-peers %s%s", ready, shown[0],
                f" (or any of {len(shown)} addresses above)" if len(shown) > 1 else "")
