"""Choosing the chain of nodes with the least expected time per step for blocks start:end.

A chain is a path through a graph whose states are (next block, previous node): entering node
``s`` after node ``p`` costs the one-way latency p→s (pings nodes publish, or pings the client
measured), running blocks i:j on ``s`` costs (j - i) times its per-block time (from its announced
speed) scaled by its load, and the client pays the last node's one-way latency back. Spans may
overlap; a chain may enter a node part-way and leave it early. Banned, draining, joining and full
nodes are skipped. A little random jitter spreads equal replicas over many clients.

Nodes compute in different dtypes (bfloat16 GPUs beside float32 CPUs). Unless the client allows
mixing, a chain keeps to one dtype: ``find_chain`` with ``dtypes={d}``, or the fastest of the
single-dtype chains when no dtype is fixed yet.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from potluck.protocol.errors import NoRoute
from potluck.protocol.records import NodeRecord, NodeState, shown_name

UNKNOWN_PING = 0.05  # seconds of round trip assumed for a peer nobody measured
UNKNOWN_BLOCK_TIME = 0.05  # seconds per block assumed for a node that announced no speed
EXACT = frozenset({"none"})  # nodes whose weights are the model's own, not quantised
MAX_REASONS = 4  # nodes named in a NoRoute, with why each cannot be used


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int
    record: NodeRecord


@dataclass
class RouteCosts:
    """What the client knows beyond the records: its own pings and the sessions it opened."""

    client_pings: dict[str, float] = field(default_factory=dict)  # peer id -> round trip, seconds
    local_sessions: dict[str, int] = field(default_factory=dict)  # peer id -> sessions this client has open
    jitter: float = 0.25  # relative random noise on compute costs: replicas whose measured speeds differ
    # by less than this (measurements are that noisy) share clients instead of one taking all

    def one_way(self, records: dict[str, NodeRecord], src: str | None, dst: str | None) -> float:
        """One-way latency between two nodes (None = this client)."""
        if src is None or dst is None:
            peer = dst if src is None else src
            return self.client_pings.get(peer, UNKNOWN_PING) / 2 if peer is not None else 0.0
        ping = records[src].pings.get(dst, records[dst].pings.get(src))
        if ping is None:  # nobody measured it: assume the path through this client's view
            ping = (self.client_pings.get(src, UNKNOWN_PING) + self.client_pings.get(dst, UNKNOWN_PING)) / 2
        return ping / 2

    def block_time(self, peer_id: str, record: NodeRecord) -> float:
        """Seconds one block of this node adds to a step, given its load."""
        blocks = record.end - record.start
        base = 1 / (record.inference_steps_per_s * blocks) if record.inference_steps_per_s > 0 else UNKNOWN_BLOCK_TIME
        load = record.active_sessions + self.local_sessions.get(peer_id, 0)
        return base * (1 + load)


def find_chain(records: dict[str, NodeRecord], start: int, end: int, *, banned: frozenset[str] = frozenset(),
               cache_tokens: int = 0, costs: RouteCosts | None = None, rng: random.Random | None = None,
               dtypes: frozenset[str] | None = None, mix_dtypes: bool = True,
               quants: frozenset[str] | None = EXACT, config_id: str = "") -> list[Hop]:
    """The fastest chain of hops covering blocks start:end; NoRoute naming uncovered blocks.

    ``dtypes``: only nodes computing in one of these (None: any). ``mix_dtypes=False``: every hop
    in one dtype, the one whose chain is fastest. ``quants``: only nodes whose weights are stored
    so (default: exact weights only; None: any, 8 and 4 bits included). ``config_id``: only nodes
    whose checkpoint has this shape (``checkpoint.config_id``; "": any, and nodes that announce
    none are taken)."""
    costs = costs or RouteCosts()
    rng = rng or random.Random()
    why_not = {p: _why_not(p, r, banned, cache_tokens, dtypes, quants, config_id) for p, r in records.items()}
    usable = {p: r for p, r in records.items() if why_not[p] is None}
    if mix_dtypes or len({r.dtype for r in usable.values()}) <= 1:
        return _search(usable, records, start, end, costs, rng, why_not)[1]
    found = []
    for dtype in sorted({r.dtype for r in usable.values()}):
        try:
            same_dtype = {p: r for p, r in usable.items() if r.dtype == dtype}
            found.append(_search(same_dtype, records, start, end, costs, rng, why_not))
        except NoRoute:
            continue
    if not found:
        _search(usable, records, start, end, costs, rng, why_not)  # raises, naming the gap, if mixing would not help
        gaps = []  # per dtype, where its chain breaks and why (a node of it may be full, say)
        reasons = {p: why_not[p] or f"computes in {r.dtype}" for p, r in records.items()}
        for dtype in sorted({r.dtype for r in usable.values()}):
            same_dtype = {p: r for p, r in usable.items() if r.dtype == dtype}
            gaps.append(f"in {dtype}, {_describe_gap(same_dtype, records, start, end, reasons)}")
        raise NoRoute(f"no chain of nodes in a single dtype covers blocks {start}:{end} ({'; '.join(gaps)}); "
                      "allow mixed dtypes to route through them: mix_dtypes=True, --mix-dtypes")
    return min(found, key=lambda cost_chain: cost_chain[0])[1]


def _search(usable: dict[str, NodeRecord], records: dict[str, NodeRecord], start: int, end: int, costs: RouteCosts,
            rng: random.Random, why_not: dict[str, str | None]) -> tuple[float, list[Hop]]:
    """Dijkstra over (block, previous node): the least expected time and its chain."""
    noise = {p: 1 + costs.jitter * (2 * rng.random() - 1) for p in usable}
    boundaries = sorted({r.start for r in usable.values()} | {r.end for r in usable.values()} | {end})
    best: dict[tuple[int, str | None], float] = {(start, None): 0.0}
    came_from: dict[tuple[int, str | None], tuple[tuple[int, str | None], Hop]] = {}
    queue: list[tuple[float, int, str]] = [(0.0, start, "")]  # (cost, block, previous peer or "")
    while queue:
        cost, block, prev_key = heapq.heappop(queue)
        prev = prev_key or None
        if cost > best.get((block, prev), float("inf")):
            continue
        if block == end:
            return cost, _unwind(came_from, (block, prev))
        for peer, record in usable.items():
            if not record.start <= block < record.end:
                continue
            entry = cost + costs.one_way(records, prev, peer)
            per_block = costs.block_time(peer, record) * noise[peer]
            for exit_block in (b for b in boundaries if block < b <= min(record.end, end)):
                total = entry + (exit_block - block) * per_block
                if exit_block == end:
                    total += costs.one_way(records, peer, None)
                state = (exit_block, peer)
                if total < best.get(state, float("inf")):
                    best[state] = total
                    came_from[state] = ((block, prev), Hop(peer, block, exit_block, record))
                    heapq.heappush(queue, (total, exit_block, peer))
    raise NoRoute(_describe_gap(usable, records, start, end, why_not))


def _unwind(came_from, state) -> list[Hop]:
    chain = []
    while state in came_from:
        state, hop = came_from[state]
        chain.append(hop)
    return chain[::-1]


def _why_not(peer: str, record: NodeRecord, banned: frozenset[str], cache_tokens: int,
             dtypes: frozenset[str] | None, quants: frozenset[str] | None, config_id: str = "") -> str | None:
    """Why a chain may not go through ``peer`` (None: it may)."""
    if config_id and record.config_id and record.config_id != config_id:
        return ("serves another model under this name: its checkpoint's shape (type, sizes, blocks) differs from "
                "yours")
    if record.state != NodeState.ONLINE:
        return record.state.value
    if peer in banned:
        return "set aside for now after it failed"
    if record.cache_tokens_left < cache_tokens:
        return (f"{record.cache_tokens_left} tokens of cache free, {cache_tokens} asked for: a shorter max_length "
                "(--max-length) may fit")
    if dtypes is not None and record.dtype not in dtypes:
        return (f"computes in {record.dtype}, which this client leaves out (node_dtypes=, --node-dtypes; a session "
                "keeps to one dtype unless mix_dtypes=True, --mix-dtypes)")
    if quants is not None and record.quant not in quants:
        return (f"weights in {record.quant}, which a client uses only if it allows them: allow_quantized=True, "
                "--allow-quantized")
    return None


def _describe_gap(usable: dict[str, NodeRecord], records: dict[str, NodeRecord], start: int, end: int,
                  why_not: dict[str, str | None]) -> str:
    covered = {b for r in usable.values() for b in range(r.start, r.end)}
    missing = [b for b in range(start, end) if b not in covered]
    if not missing:
        return f"no chain covers blocks {start}:{end}"
    first = missing[0]
    last = first
    while last + 1 in missing:
        last += 1
    holders = [p for p, r in records.items() if r.start <= first < r.end]
    reasons = "; ".join(f"{shown_name(records[p].public_name or 'unnamed')} ({p[-6:]}): {why_not[p]}"
                        for p in sorted(holders)[:MAX_REASONS])
    more = f"; {len(holders) - MAX_REASONS} more" if len(holders) > MAX_REASONS else ""
    return (f"no usable node serves blocks {first}:{last + 1} (of {start}:{end}; {len(records)} nodes "
            f"known; " + (f"those holding block {first}: {reasons}{more})" if holders else
                          f"none holds block {first})"))


def explain(chain: list[Hop], records: dict[str, NodeRecord], costs: RouteCosts) -> list[str]:
    """Human-readable lines: each hop's blocks, expected compute and latency, and the total."""
    lines, total, previous = [], 0.0, None
    for hop in chain:
        latency = costs.one_way(records, previous, hop.peer_id)
        compute = (hop.end - hop.start) * costs.block_time(hop.peer_id, hop.record)
        total += latency + compute
        name = hop.record.public_name or "unnamed"
        load = hop.record.active_sessions + costs.local_sessions.get(hop.peer_id, 0)
        lines.append(f"blocks {hop.start:>3}:{hop.end:<3} {name:<20} {hop.peer_id}  "
                     f"compute {compute * 1e3:7.2f} ms  latency in {latency * 1e3:6.2f} ms  load {load}")
        previous = hop.peer_id
    back = costs.one_way(records, previous, None)
    lines.append(f"expected time per step: {(total + back) * 1e3:.2f} ms (including {back * 1e3:.2f} ms back to you)")
    return lines
