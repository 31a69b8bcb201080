"""Choosing a chain of nodes that covers blocks 0:n of a model.

For now: from each block, take the ONLINE node that reaches furthest (ties: the faster one),
skipping banned nodes and nodes without cache room. The planned router weighs compute and
measured latency; it replaces ``find_chain`` and keeps its signature.
"""
from __future__ import annotations

from dataclasses import dataclass

from potluck.protocol.errors import NoRoute
from potluck.protocol.records import NodeRecord, NodeState


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int
    record: NodeRecord


def find_chain(records: dict[str, NodeRecord], start: int, end: int, *, banned: frozenset[str] = frozenset(),
               cache_tokens: int = 0) -> list[Hop]:
    """Hops covering blocks start:end in order; NoRoute naming the first uncovered blocks."""
    usable = {p: r for p, r in records.items()
              if r.state == NodeState.ONLINE and p not in banned and r.cache_tokens_left >= cache_tokens}
    chain, block = [], start
    while block < end:
        candidates = [(r.end, r.inference_steps_per_s, p) for p, r in usable.items() if r.start <= block < r.end]
        if not candidates:
            gap_end = min([r.start for r in usable.values() if r.start > block] + [end])
            raise NoRoute(f"no ONLINE node serves blocks {block}:{gap_end} of {end} "
                          f"({len(records)} nodes known, {len(banned)} banned)")
        reach, _, peer_id = max(candidates)
        hop_end = min(reach, end)
        chain.append(Hop(peer_id, block, hop_end, usable[peer_id]))
        block = hop_end
    return chain
