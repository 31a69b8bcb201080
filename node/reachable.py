"""Whether other machines can reach this node, and what it does when they cannot.

A node joining a swarm beyond this machine asks peers to dial it back (``protocol.reachability``)
before it announces anything. When none can (a home router that forwards no port), it starts its
P2P daemon again behind NAT: relay slots reserved on its initial peers (``protocol.network``), and
its record names the circuit addresses clients dial it through. It asks again every period and
says in the log what changed and what the owner can do.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from potluck.protocol import reachability
from potluck.protocol.directory import read_block_records
from potluck.protocol.errors import PotluckError
from potluck.protocol.network import join_swarm, leave_swarm, p2p_options, relay_addresses, relays_of

logger = logging.getLogger(__name__)


async def ask(p2p: P2P, dht: DHTNode, initial_peers: Sequence[str], model: str, num_blocks: int,
              own_id: str) -> tuple[reachability.Reachability, list[str]]:
    """Have the initial peers, then other nodes of the model, dial this peer back: (what they
    found, the addresses asked about)."""
    peers, addresses = [m.split("/p2p/")[-1] for m in initial_peers], []
    try:
        records = await asyncio.wait_for(read_block_records(dht, model, num_blocks), 30)
        peers += [p for p in records if p != own_id and p not in peers]
        addresses = [str(m) for m in await p2p.get_visible_maddrs()]
        return await reachability.check(p2p, peers, addresses), addresses
    except (asyncio.TimeoutError, OSError, ValueError, PotluckError) as e:  # ValueError: no address yet
        logger.debug("reachability check failed: %s", e)
        return reachability.Reachability(reachability.UNKNOWN), addresses


async def join(initial_peers: Sequence[str], host_maddrs: Sequence[str] | None,
               announce_maddrs: Sequence[str] | None, identity: str | None, public: bool, relay_service: bool,
               model: str, num_blocks: int) -> tuple[P2P, DHTNode, reachability.Reachability | None, list[str]]:
    """``join_swarm`` for a node: (p2p, dht, what peers found when they dialled it back (None in a
    swarm on this machine), the circuit addresses it is reached at ([] when reached directly)).
    A node that no peer can dial joins again behind NAT, with the same identity."""
    def join_as(behind_nat: bool):
        return join_swarm(initial_peers, host_maddrs, announce_maddrs, identity, public=public,
                          relay_service=relay_service, behind_nat=behind_nat)

    p2p, dht = await join_as(False)
    beyond = p2p_options(initial_peers, host_maddrs, public=public)["nat_port_map"]
    if not beyond:
        return p2p, dht, None, []
    found, _ = await ask(p2p, dht, initial_peers, model, num_blocks, p2p.peer_id.to_base58())
    if found.state != reachability.RELAYED or not relays_of(initial_peers):
        return p2p, dht, found, []
    logger.info("no peer could connect to this node; joining again through relays on %s",
                " ".join(relays_of(initial_peers)))
    await leave_swarm(p2p, dht)
    p2p, dht = await join_as(True)
    return p2p, dht, found, relay_addresses(initial_peers)


def explain(found: reachability.Reachability, addresses: list[str], relays: Sequence[str]) -> None:
    """One log line on how other machines reach this node, and what to do when they cannot."""
    if found.state == reachability.DIRECT:
        logger.info("other machines reach this node directly at %s (checked by %d peers)", " ".join(found.reached),
                    found.asked)
    elif found.state == reachability.RELAYED:
        port = next((a.split("/tcp/")[1].split("/")[0] for a in addresses if "/tcp/" in a), "PORT")
        via = (f"clients reach it through the relay{'s' if len(relays) > 1 else ''} "
               f"{' '.join(r.split('/p2p/')[0] for r in relays)} (each step pays a trip to the relay)" if relays else
               "it serves only peers it has connected to itself")
        logger.warning("other machines cannot connect to this node (%d peers tried; behind NAT or a firewall): %s. "
                       "To be reached directly, forward TCP port %s on your router to this machine and start with "
                       "--host-maddrs /ip4/0.0.0.0/tcp/%s --announce-maddrs /ip4/YOUR_PUBLIC_IP/tcp/%s",
                       found.asked, via, port, port, port)
    else:
        logger.info("no peer answered whether this node can be reached from other machines; asking again later")
