"""The dashboard's view of the swarm, kept fresh by a background crawler.

Each crawl reads the model index and every block record of every known model in one batched
DHT ``get_many`` (a model seen for the first time costs one more read) and merges the result
into the previous view (``merge``: a pure function). On its own clock, a prober sends each live
node an info request for its round trip and the tokens it has served; a node that fails two in a
row counts as unreachable. A crawl that fails or times out keeps the last good view; records
whose expiration time has passed are marked stale, and forgotten later.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from hivemind.utils import get_dht_time

from potluck.protocol.errors import PotluckError
from potluck.protocol.directory import Found, block_keys, parse_entries, parse_index
from potluck.protocol.records import MODEL_INDEX_KEY, ModelInfo, NodeRecord, NodeState

from ..transport import SwarmConnection, how_to_dial

logger = logging.getLogger(__name__)
UNREACHABLE_AFTER = 2  # failed probes in a row before a node counts as unreachable


@dataclass(frozen=True)
class NodeView:
    """What the dashboard knows about one node's record for one model."""

    peer_id: str
    record: NodeRecord
    expires_at: float  # DHT time the record expires
    refreshed_at: float | None  # DHT time this version was first seen (None: it predates the first crawl)
    stale: bool = False  # expired without a newer record: the node is presumed gone
    ping_s: float | None = None  # info round trip from the dashboard in the last successful probe
    probe_failures: int = 0  # failed probes in a row
    probed: bool = False  # at least one probe was tried
    tokens_served: int | None = None  # the node's "tokens" counter, when it answered
    relayed: bool | None = None  # connected only through a /p2p-circuit relay; None when not connected

    @property
    def reachable(self) -> bool | None:
        return None if not self.probed else self.probe_failures < UNREACHABLE_AFTER

    @property
    def live(self) -> bool:
        """Counts towards coverage: an ONLINE, unexpired record of a node that answers probes."""
        return self.record.state == NodeState.ONLINE and not self.stale and self.reachable is not False


@dataclass(frozen=True)
class SwarmState:
    """One immutable snapshot; the crawler swaps in a new one after each crawl."""

    models: dict[str, ModelInfo] = field(default_factory=dict)  # name -> info
    nodes: dict[str, dict[str, NodeView]] = field(default_factory=dict)  # model -> peer id -> view
    updated_at: float | None = None  # DHT (wall-clock) time of the last successful DHT read
    crawl_seconds: float = 0.0  # duration of the last successful DHT read
    probe_seconds: float = 0.0  # duration of the last round of info probes
    crawls: int = 0  # successful DHT reads so far
    failures: int = 0  # failed or timed-out DHT reads so far
    last_error: str = ""  # why the latest read failed; "" when it succeeded
    records_rejected: int = 0  # node records this dashboard's DHT refused: unsigned, forged or altered
    period: float = 5.0  # seconds between crawls


@dataclass(frozen=True)
class CrawlSettings:
    period: float = 5.0  # seconds between crawls
    timeout: float = 10.0  # seconds a DHT read may take before the last good view is kept
    probe_timeout: float = 2.0  # seconds a node may take to answer an info request
    probe_concurrency: int = 32  # info requests in flight at once
    forget_after: float = 300.0  # seconds after expiry a stale record is dropped from the view




def merge(previous: SwarmState, index: dict[str, ModelInfo], found: Found, now: float,
          forget_after: float) -> dict[str, dict[str, NodeView]]:
    """The new node views: ``found`` (model -> peer -> (record, expiration)) over the previous ones.

    A record read again with the same expiration keeps its first-seen time; one with an older
    expiration than what we hold (a lagging replica) is ignored; a record not read this time is
    kept until it expires (then stale) and dropped ``forget_after`` seconds later.
    """
    merged: dict[str, dict[str, NodeView]] = {}
    for model in set(index) | set(found) | set(previous.nodes):
        views: dict[str, NodeView] = {}
        before, fresh = previous.nodes.get(model, {}), found.get(model, {})
        for peer_id in set(before) | set(fresh):
            old = before.get(peer_id)
            if peer_id in fresh and (old is None or fresh[peer_id][1] > old.expires_at):
                record, expires_at = fresh[peer_id]
                seen = now if previous.crawls > 0 else None
                view = NodeView(peer_id, record, expires_at, seen) if old is None else dataclasses.replace(
                    old, record=record, expires_at=expires_at, refreshed_at=seen)
            else:
                view = old
            if now - view.expires_at > forget_after:
                continue
            views[peer_id] = dataclasses.replace(view, stale=view.expires_at < now)
        if views:
            merged[model] = views
    return merged


class Crawler:
    """Keeps ``state`` fresh from two background tasks on the connection's loop, which owns them
    (``SwarmConnection.close`` cancels them)."""

    def __init__(self, swarm: SwarmConnection, settings: CrawlSettings = CrawlSettings()):
        self.swarm, self.settings = swarm, settings
        self.state = SwarmState(period=settings.period)  # read from any thread: swapped whole, never mutated

    def start(self) -> None:
        """Begin crawling and probing in the background; the connection cancels both when it closes."""
        async def launch() -> None:
            for name, loop in (("crawler", self._crawl_forever), ("prober", self._probe_forever)):
                self.swarm.own(asyncio.create_task(loop(), name=f"potluck-health-{name}"))
        self.swarm.call(launch(), timeout=10)

    async def _crawl_forever(self) -> None:
        await self._every(self.crawl_once)

    async def _probe_forever(self) -> None:
        """Probes run on their own clock: a slow DHT read does not delay noticing a dead node."""
        while self.state.crawls == 0:
            await asyncio.sleep(0.1)
        await self._every(self.probe_once)

    async def _every(self, step: Callable[[], Awaitable[SwarmState]]) -> None:
        while True:
            began = time.monotonic()
            await step()
            await asyncio.sleep(max(0.0, self.settings.period - (time.monotonic() - began)))

    async def crawl_once(self) -> SwarmState:
        """Read the DHT and merge what it says into the view; if the read fails, keep the last good one.

        Every update is applied to ``self.state`` as it is after the await, so the crawler and the
        prober never overwrite each other's work."""
        began = time.perf_counter()
        try:
            index, found = await asyncio.wait_for(self._read(self.state), self.settings.timeout)
        except Exception as e:  # hivemind raises many kinds of errors when peers do not answer
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            logger.warning("DHT read failed, keeping the last good view: %s", reason)
            previous = self.state
            nodes = merge(previous, {}, {}, get_dht_time(), self.settings.forget_after)
            self.state = dataclasses.replace(previous, nodes=nodes, failures=previous.failures + 1, last_error=reason)
            return self.state
        now, previous = get_dht_time(), self.state
        models = {**{m: previous.models[m] for m in previous.nodes if m in previous.models}, **index}
        nodes = merge(previous, index, found, now, self.settings.forget_after)
        self.state = dataclasses.replace(
            previous, models={m: models[m] for m in sorted(models) if m in index or m in nodes}, nodes=nodes,
            updated_at=now, crawl_seconds=time.perf_counter() - began, crawls=previous.crawls + 1, last_error="",
            records_rejected=self.swarm.records_rejected)
        return self.state

    async def _read(self, previous: SwarmState) -> tuple[dict[str, ModelInfo], dict]:
        """The model index and block records: one batched read for the models already known."""
        known = dict(previous.models)
        keys = [MODEL_INDEX_KEY] + [key for info in known.values() for key in block_keys(info.name, info.num_blocks)]
        entries = await self.swarm.dht.get_many(keys, sufficient_expiration_time=float("inf"))
        if not self.swarm.dht.protocol.routing_table.uid_to_peer_id:  # it asked no one: an answer of nothing
            raise PotluckError("no DHT peer is left to ask: every peer this dashboard knew stopped answering "
                               "(check that the swarm runs, and --initial-peers)")
        index = parse_index(entries.get(MODEL_INDEX_KEY))
        new = {m: info for m, info in index.items() if known.get(m) != info}
        if new:  # a model we had not seen: read its blocks too
            more = [key for info in new.values() for key in block_keys(info.name, info.num_blocks)]
            entries = {**entries, **await self.swarm.dht.get_many(more, sufficient_expiration_time=float("inf"))}
        return index, parse_entries(entries, {m: info.num_blocks for m, info in {**known, **index}.items()})

    async def probe_once(self) -> SwarmState:
        """Round trip and tokens served of every node whose record is live; relayed or direct."""
        began, state = time.perf_counter(), self.state
        peers = sorted({p for views in state.nodes.values() for p, v in views.items()
                        if not v.stale and v.record.state != NodeState.OFFLINE})
        gate = asyncio.Semaphore(self.settings.probe_concurrency)
        records = {p: v.record for views in state.nodes.values() for p, v in views.items()}
        results = await asyncio.gather(*(self._probe_one(peer, records[peer], gate) for peer in peers))
        answers = dict(zip(peers, results))
        relayed = await self._relayed()
        nodes = {model: {peer: _probed(view, answers, relayed) for peer, view in views.items()}
                 for model, views in self.state.nodes.items()}
        self.state = dataclasses.replace(self.state, nodes=nodes, probe_seconds=time.perf_counter() - began)
        return self.state

    async def _probe_one(self, peer_id: str, record: NodeRecord,
                         gate: asyncio.Semaphore) -> tuple[float, int | None] | None:
        async with gate:
            try:
                info, elapsed = await self.swarm.info(peer_id, timeout=self.settings.probe_timeout,
                                                      dial=how_to_dial(record, patient=False))
            except PotluckError as e:
                logger.debug("probe of %s failed: %s", peer_id, e)
                return None
            return elapsed, int(info.counters.get("tokens", 0))  # absent until the node computes

    async def _relayed(self) -> dict[str, bool]:
        """peer id -> whether our connection to it goes only through a relay (/p2p-circuit)."""
        try:
            peers = await self.swarm.p2p.list_peers()
        except Exception as e:  # the daemon's control errors; this is only a label
            logger.debug("could not list connected peers: %s", e)
            return {}
        return {info.peer_id.to_base58(): bool(info.addrs) and all("/p2p-circuit" in str(a) for a in info.addrs)
                for info in peers}


def _probed(view: NodeView, answers: dict[str, tuple[float, int | None] | None], relayed: dict[str, bool]) -> NodeView:
    if view.peer_id not in answers:
        return view
    answer = answers[view.peer_id]
    if answer is None:
        return dataclasses.replace(view, probed=True, probe_failures=view.probe_failures + 1)
    ping, tokens = answer
    return dataclasses.replace(view, probed=True, probe_failures=0, ping_s=ping,
                               tokens_served=tokens if tokens is not None else view.tokens_served,
                               relayed=relayed.get(view.peer_id, view.relayed))
