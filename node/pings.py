"""Round trips from this node to the other nodes of its model, published in its record.

Clients route with them: the cost of handing a step from one node to the next is half their
round trip. Measured each announce period with an info request on a fresh stream. A node that
does not answer is *silent*: its record may outlive it by up to 2.5 periods (a node killed
without a word), and a self-placing node does not count it as serving its blocks (``moving``).
"""
from __future__ import annotations

import asyncio

from hivemind.p2p import P2P

from potluck.protocol.errors import PotluckError
from potluck.protocol.records import NodeRecord, NodeState
from potluck.protocol.replies import request_info

MAX_PEERS = 16  # pinged per period; neighbours of our span first
AT_ONCE = 4  # pings in flight together: a few silent peers cost one timeout, not one each, and round trips
# are not measured under the load of sixteen requests at once


async def measure_pings(p2p: P2P, records: dict[str, NodeRecord], self_id: str, start: int, end: int,
                        timeout: float = 2.0) -> tuple[dict[str, float], set[str]]:
    """Round trips to the ONLINE nodes among ``records`` (up to ``MAX_PEERS``), and the nodes
    pinged that did not answer."""
    peers = [p for p, r in records.items() if p != self_id and r.state == NodeState.ONLINE]
    peers.sort(key=lambda p: (records[p].start != end and records[p].end != start, p))  # neighbours first
    return await ping_all(p2p, peers[:MAX_PEERS], timeout)


def sole_holders(records: dict[str, NodeRecord], self_id: str) -> set[str]:
    """The ONLINE nodes other than this one that alone hold some block: those whose death leaves
    blocks with no node."""
    holders: dict[int, list[str]] = {}
    for peer_id, record in records.items():
        if record.state == NodeState.ONLINE:
            for block in range(record.start, record.end):
                holders.setdefault(block, []).append(peer_id)
    return {peers[0] for peers in holders.values() if len(peers) == 1 and peers[0] != self_id}


async def ping_all(p2p: P2P, peers: list[str], timeout: float = 2.0) -> tuple[dict[str, float], set[str]]:
    """Round trips to ``peers``, and those that did not answer."""
    pings, silent, at_once = {}, set(), asyncio.Semaphore(AT_ONCE)

    async def ping(peer_id: str) -> None:
        async with at_once:
            try:
                _, pings[peer_id] = await request_info(p2p, peer_id, timeout)
            except PotluckError:
                silent.add(peer_id)

    await asyncio.gather(*(ping(peer_id) for peer_id in peers))
    return {peer_id: round(rtt, 6) for peer_id, rtt in pings.items()}, silent
