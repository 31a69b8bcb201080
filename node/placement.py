"""Where a node should sit in its model's swarm: pure functions over node records.

A block's *throughput* is the sum of the announced steps per second of the live nodes holding it
(ONLINE and JOINING: a node that is still loading has claimed its blocks; until it has measured
itself it counts as fast as the node deciding). A node takes the contiguous span that most
raises the swarm's weakest point: compared as sorted lists of block throughputs, smallest first
(the lowest block first, then the next lowest...), so uncovered blocks are filled before any
block gets a second replica. Of spans that leave the same weakest points, it takes one whose ends
meet other nodes' ends or the model's (fewest places where a block's throughput differs from the
next one's): on an empty swarm of 30 blocks, a node of 10 taking 2:12 would leave 0:2 for a node
of 10 that can only cover it by leaving 2 other blocks bare. How many blocks it takes follows
from its memory. Later, a node
moves only where that raises the weakest point by a clear margin, and never off a block it
alone serves.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from potluck.protocol.records import NodeRecord, NodeState

CLAIMING = frozenset({NodeState.ONLINE, NodeState.JOINING})


@dataclass(frozen=True)
class Move:
    """A better span for a node already serving, and why (for the log)."""

    span: tuple[int, int]
    reason: str
    fills_gap: bool = False  # it covers blocks no node serves now


@dataclass(frozen=True)
class Sizing:
    """How many blocks a node takes, and why (for the log)."""

    blocks: int
    reason: str


def block_throughputs(records: dict[str, NodeRecord], num_blocks: int, own_speed: float,
                      exclude: str | None = None) -> list[float]:
    """Total announced steps/s per block of the nodes holding it, ``exclude`` left out."""
    totals = [0.0] * num_blocks
    for peer_id, record in records.items():
        if peer_id == exclude or record.state not in CLAIMING:
            continue
        speed = record.inference_steps_per_s or own_speed  # a JOINING node has not measured itself yet
        for block in range(record.start, min(record.end, num_blocks)):
            totals[block] += speed
    return totals


def choose_span(throughputs: list[float], length: int, own_speed: float,
                rng: random.Random | None = None) -> tuple[int, int]:
    """The span of ``length`` blocks whose cover leaves the best weakest point, then the fewest
    changes of throughput from one block to the next (ties at random)."""
    length = min(length, len(throughputs))
    scored = {start: (_after(throughputs, start, length, own_speed), -_edges(throughputs, start, length, own_speed))
              for start in range(len(throughputs) - length + 1)}
    best = max(scored.values())
    start = (rng or random).choice([s for s, score in scored.items() if score == best])
    return start, start + length


def better_span(records: dict[str, NodeRecord], me: str, span: tuple[int, int], num_blocks: int,
                own_speed: float) -> tuple[int, int] | None:
    """Looked at again right after claiming ``span``: where ``me`` should go instead, or None.

    Nodes that read the swarm at the same moment may claim overlapping spans. Of two overlapping
    claims the later peer id yields: it moves if some other span is now strictly better for the
    swarm; the earlier one stays, so the two never both move."""
    start, end = span
    overlapped = any(p < me and r.state in CLAIMING and r.start < end and start < r.end for p, r in records.items())
    if not overlapped:
        return None
    throughputs = block_throughputs(records, num_blocks, own_speed, exclude=me)
    best = choose_span(throughputs, end - start, own_speed)
    better = _after(throughputs, best[0], end - start, own_speed) > _after(throughputs, start, end - start, own_speed)
    return best if better else None


def should_move(records: dict[str, NodeRecord], me: str, span: tuple[int, int], num_blocks: int,
                own_speed: float, quality: float) -> Move | None:
    """Where a serving node should move, or None: only off blocks someone else also serves, and
    only if the move leaves fewer uncovered blocks, or raises the weakest block's throughput so
    that now / after < ``quality`` (like Petals' --balance_quality; 1.0 takes any gain)."""
    start, end = span
    others = block_throughputs(records, num_blocks, own_speed, exclude=me)
    if any(others[i] == 0 for i in range(start, min(end, num_blocks))):
        return None  # it alone serves some of its blocks: leaving would uncover them
    best = choose_span(others, end - start, own_speed)
    now, after = _after(others, start, end - start, own_speed), _after(others, best[0], end - start, own_speed)
    gaps_now, gaps_after = now.count(0.0), after.count(0.0)
    if gaps_after < gaps_now:
        return Move(best, f"{gaps_now} blocks have no node; moving leaves {gaps_after}", fills_gap=True)
    if gaps_now or after[0] <= 0 or now[0] / after[0] >= quality:
        return None
    return Move(best, f"the weakest block would go from {now[0]:.1f} to {after[0]:.1f} steps/s "
                      f"(ratio {now[0] / after[0]:.2f} < --balance-quality {quality:g})")


def size_span(num_blocks: int, block_bytes: int, memory_bytes: int, cache_bytes: int) -> Sizing:
    """As many blocks as fit in ``memory_bytes`` once the cache budget is set aside (at least one,
    at most the model)."""
    room = memory_bytes - cache_bytes
    fit = max(0, room // block_bytes)
    blocks = max(1, min(num_blocks, fit))
    reason = (f"{_size(room)} for weights ({_size(memory_bytes)} memory - {_size(cache_bytes)} cache) / "
              f"{_size(block_bytes)} per block = {fit}")
    if fit > num_blocks:
        reason += f", capped at the model's {num_blocks}"
    elif fit < 1:
        reason += "; taking 1 block anyway (pass --max-memory or --num-blocks to choose)"
    return Sizing(blocks, reason)


def _size(count: int) -> str:
    """Bytes in GiB, or in MiB below one GiB (a tiny model's block is 0.00 GiB)."""
    return f"{count / 2**30:.1f} GiB" if abs(count) >= 2**30 else f"{count / 2**20:.1f} MiB"


def _after(throughputs: list[float], start: int, length: int, own_speed: float) -> list[float]:
    return sorted(_added(throughputs, start, length, own_speed))


def _edges(throughputs: list[float], start: int, length: int, own_speed: float) -> int:
    """Blocks whose throughput differs from the next block's, once the span is added."""
    added = _added(throughputs, start, length, own_speed)
    return sum(a != b for a, b in zip(added, added[1:]))


def _added(throughputs: list[float], start: int, length: int, own_speed: float) -> list[float]:
    return [t + own_speed if start <= i < start + length else t for i, t in enumerate(throughputs)]
