"""The client's view of one model's swarm: node records, bans, pings, routes and forward passes.

``SwarmView`` refreshes the records and the client's pings to nodes in the background, keeps
a ban list of nodes that failed recently, and routes with ``routing.find_chain``. Cache-less
forward passes retry a failed hop on a replacement, with backoff, before giving up.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import numbers
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import torch

from potluck.protocol import messages as msg
from potluck.protocol import replies
from potluck.protocol.checkpoint import DTYPES
from potluck.protocol.directory import parse_index, read_block_records
from potluck.protocol.errors import BadRequest, NodeUnavailable, NoRoute, PeerLimitReached, PotluckError
from potluck.protocol.network import connect_through
from potluck.protocol.records import MODEL_INDEX_KEY, NodeRecord, NodeState

from .routing import EXACT, Hop, RouteCosts, find_chain
from .transport import SwarmConnection, how_to_dial

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class FailoverPolicy:
    request_timeout: float = 5.0  # seconds a node may take to answer, plus the time its work needs
    slack: float = 4.0  # allow this many times a node's announced compute time for a message
    ban_time: float = 30.0  # seconds a failed node is not routed through
    max_retries: int = 4  # replacement chains tried for one failed step
    backoff: float = 0.1  # seconds before the first retry, doubling after each
    probe_timeout: float = 1.0  # seconds a node may take to answer an info request after a chain timed out
    wrong_result_ban: float = 3600.0  # seconds a node caught computing wrong (verification) is not routed through
    relay_grace: float = 10.0  # seconds: a relayed connection to a node cut again sooner is the node's failure
    route_wait: float = 60.0  # seconds a session that lost the only node of some blocks waits for another to
    # take them (self-placing nodes move to blocks no live node serves) before it fails; 0: fail at once

    def __post_init__(self) -> None:
        """BadRequest naming a setting that is not a finite number of 0 or more (request_timeout: above 0;
        max_retries: a whole number)."""
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            whole = setting.name == "max_retries"
            if (isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real)
                    or not math.isfinite(value) or value < 0 or (setting.name == "request_timeout" and value == 0)):
                least = "above 0" if setting.name == "request_timeout" else "0 or more"
                raise BadRequest(f"{setting.name}={value!r}: pass {'a whole number' if whole else 'seconds'}, "
                                 f"{least} (FailoverPolicy)")


@dataclass
class SwarmView:
    swarm: SwarmConnection
    model: str
    num_blocks: int
    policy: FailoverPolicy = field(default_factory=FailoverPolicy)
    handoff: bool = True  # nodes pass a step's activations along the chain themselves
    dtypes: frozenset[str] | None = None  # route only through nodes computing in these (None: any)
    mix_dtypes: bool = False  # one chain may hold nodes of different dtypes
    allow_quantized: bool = False  # route through nodes with 8- or 4-bit weights too (close, not exact)
    config_id: str = ""  # route only through nodes whose checkpoint has this shape ("": any)
    refresh_period: float = 5.0  # seconds between background reads of the records
    verify: float = 0.0  # share of steps checked against other replicas (``verification``)
    verify_counts: Counter = field(default_factory=Counter)  # steps verified, mismatches, nodes banned...
    rng: random.Random = field(default_factory=random.Random)  # which steps are verified
    records: dict[str, NodeRecord] = field(default_factory=dict)
    costs: RouteCosts = field(default_factory=RouteCosts)
    banned: dict[str, float] = field(default_factory=dict)  # peer id -> monotonic time the ban ends
    relay_cuts: dict[str, float] = field(default_factory=dict)  # peer id -> when its relayed connection was cut
    _said: dict = field(default_factory=dict)  # what ``first_time`` was asked about -> when it was last said
    _refresher: asyncio.Task | None = None
    _refreshed_at: float = float("-inf")

    # --- the view ------------------------------------------------------------------------------

    async def refresh(self) -> None:
        records = await asyncio.wait_for(read_block_records(self.swarm.dht, self.model, self.num_blocks),
                                         self.policy.request_timeout * 2)
        self.records, self._refreshed_at = records, time.monotonic()
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_forever())
            self.swarm.own(self._refresher)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_period)
            try:
                await self.refresh()
                await self.measure_pings()
            except (asyncio.TimeoutError, PotluckError, OSError) as e:
                logger.debug("background refresh failed: %s", e)

    async def measure_pings(self) -> None:
        """Round trips from this client to every ONLINE node, for routing."""
        for peer_id, record in list(self.records.items()):
            if record.state == NodeState.ONLINE and peer_id not in self.banned:
                try:
                    _, self.costs.client_pings[peer_id] = await self.swarm.info(
                        peer_id, timeout=2.0, dial=how_to_dial(record, patient=False))  # a relay's trip counts
                except PotluckError:
                    continue

    def unban(self, peer_id: str) -> None:
        if self.banned.pop(peer_id, None) is not None:
            logger.info("node %s answers again: no longer set aside", peer_id)

    def first_time(self, key, seconds: float) -> bool:
        """Whether ``key`` was not seen in the last ``seconds`` (then it is, from now): for what many
        sessions meet at once being said once."""
        now = time.monotonic()
        if self._said.get(key, float("-inf")) > now - seconds:
            return False
        self._said[key] = now
        return True

    def ban(self, peer_id: str, reason: str, seconds: float | None = None) -> None:
        seconds = self.policy.ban_time if seconds is None else seconds
        until, was = time.monotonic() + seconds, self.banned.get(peer_id, 0.0)
        if until > was + 1.0:  # said once, not by each of the sessions that met the same failure
            logger.warning("banning node %s for %.0f s: %s", peer_id, seconds, reason)
        self.banned[peer_id] = max(was, until)

    async def relay_cut(self, hop: Hop) -> bool:
        """Whether a relayed node's failure is its relayed connection being cut rather than the node
        (libp2p's default relay, which p2pd may run instead of its full one, cuts a connection after
        128 KiB each way or 2 minutes): its relay connects to it again, and its connection was not
        cut within ``relay_grace`` seconds. Such a node is not banned: the session goes on with it
        over the new connection, its cache replayed."""
        if hop.record.reachability != "relayed" or not hop.record.relays:
            return False
        now = time.monotonic()
        if now - self.relay_cuts.get(hop.peer_id, float("-inf")) < self.policy.relay_grace:
            return False
        if not await connect_through(self.swarm.p2p, hop.peer_id, hop.record.relays):
            return False
        self.relay_cuts[hop.peer_id] = now
        logger.info("the relayed connection to node %s was cut; reconnected through its relay", hop.peer_id)
        return True

    def _active_bans(self) -> frozenset[str]:
        now = time.monotonic()
        self.banned = {p: until for p, until in self.banned.items() if until > now}
        return frozenset(self.banned)

    async def route(self, start: int = 0, end: int | None = None, cache_tokens: int = 0,
                    dtype: str | None = None, avoid: frozenset[str] = frozenset(),
                    quant: str | None = None) -> list[Hop]:
        """The fastest chain for blocks start:end (in ``dtype``, for the rest of a chain in that
        dtype, unless mixing is allowed; only through nodes storing weights as ``quant`` if given,
        else as the client allows), not through the nodes in ``avoid``. Routes on the current
        view (kept fresh in the background, so a failover does not wait on the DHT) and reads the DHT
        again only when the view is empty or has no chain."""
        end = self.num_blocks if end is None else end
        if not self.records or time.monotonic() - self._refreshed_at > 3 * self.refresh_period:
            await self.refresh()
        dtypes = self.dtypes if dtype is None or self.mix_dtypes else frozenset({dtype})
        quants = frozenset({quant}) if quant else None if self.allow_quantized else EXACT
        for attempt in range(2):
            try:
                return find_chain(self.records, start, end, banned=self._active_bans() | avoid,
                                  cache_tokens=cache_tokens, costs=self.costs, dtypes=dtypes,
                                  mix_dtypes=self.mix_dtypes, quants=quants, config_id=self.config_id)
            except NoRoute:
                if attempt == 1:
                    if not self.records:
                        raise NoRoute(await self._no_such_model()) from None
                    raise
                await self.refresh()  # nodes may have joined since the last read
        raise AssertionError("unreachable")

    async def _no_such_model(self) -> str:
        """Why no node is known at all: the models this swarm does serve (its model index), if any."""
        try:
            entries = await asyncio.wait_for(self.swarm.dht.get_many([MODEL_INDEX_KEY], sufficient_expiration_time=
                                                                     float("inf")), self.policy.request_timeout)
            served = sorted(parse_index(entries.get(MODEL_INDEX_KEY)))
        except Exception:  # only what the message says depends on it
            served = None
        named = f"no node of this swarm serves a model named {self.model!r}"
        if served:
            return f"{named}; it serves {', '.join(map(repr, served))} (the name is --model-name, or model_name=)"
        if served == []:
            return f"{named}, nor any other yet (check --initial-peers, or wait for nodes to come ONLINE)"
        return f"{named} (check --model-name or model_name=, and --initial-peers)"

    def chain_dtype(self, hops: list[Hop]) -> str | None:
        """The dtype the rest of a chain must keep to (None where the client allows mixing)."""
        return None if self.mix_dtypes or not hops else hops[0].record.dtype

    def timeout_for(self, hops: list[Hop], tokens: int) -> float:
        """How long ``hops`` may take for ``tokens`` new tokens before the step counts as hung. A node
        that announces no forward speed (``--throughput``) is taken to compute a long prompt's tokens
        at least as fast as one-token steps."""
        expected = 0.0
        for hop in hops:
            per_span = hop.record.forward_tokens_per_s or hop.record.inference_steps_per_s
            speed = per_span * (hop.record.end - hop.record.start) / (hop.end - hop.start)
            expected += tokens / speed if speed > 0 else 0.0
        return self.policy.request_timeout + self.policy.slack * expected

    # --- forward --------------------------------------------------------------------------------

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Whole sequences through every block, no cache kept on the nodes; failed hops are replaced."""
        check_hidden(hidden, positions)
        return self.swarm.call(self.forward_async(hidden, positions, mask, 0, self.num_blocks))

    async def forward_async(self, hidden, positions, mask, start: int, end: int, dtype: str | None = None,
                            avoid: frozenset[str] = frozenset(), used: list[Hop] | None = None,
                            quant: str | None = None) -> torch.Tensor:
        """Blocks start:end without a cache, not through the nodes in ``avoid`` (and only nodes
        storing weights as ``quant`` if given); the hops that computed it are appended to ``used``."""
        from .hops import forward_hop  # hops builds on this module

        block = start

        async def rest_of_the_chain() -> torch.Tensor:  # from the first block not yet computed
            nonlocal hidden, block, dtype
            for hop in await self.route(block, end, dtype=dtype, avoid=avoid, quant=quant):
                dtype = self.chain_dtype([hop])
                hidden, block = await forward_hop(self, hop, hidden.to(wire_dtype(hop, hidden.dtype)), positions,
                                                  mask), hop.end
                if used is not None:
                    used.append(hop)
            return hidden

        given = hidden.dtype
        return (await self.retrying(rest_of_the_chain)).to(given)

    async def forward_request(self, hop: Hop, hidden: torch.Tensor, positions: torch.Tensor,
                              mask: torch.Tensor | None) -> torch.Tensor:
        """One cache-less forward message through ``hop``: its output hidden states."""
        frame = await self.swarm.request(
            hop.peer_id, msg.FORWARD_HANDLER, msg.Forward(hop.start, hop.end).to_meta(),
            [hidden, positions, *([] if mask is None else [mask])],
            self.timeout_for([hop], hidden.shape[0] * hidden.shape[1]), how_to_dial(hop.record))
        return expect_hidden(frame, hop, hidden.shape)

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` until it works. A retriable failure bans the node that caused it and backs
        off (doubling) before the next try; a failure that is not retriable, names no node, or is
        the last the policy allows is raised. A node that refuses this client past its share
        (``PeerLimitReached``: a session larger than one peer may hold there, say) is well: it is
        routed around only while this retries, and if no other node is left its refusal is raised,
        not the NoRoute it leads to."""
        refused, set_aside = None, []
        try:
            for tries in range(self.policy.max_retries + 1):
                try:
                    return await attempt()
                except NoRoute:
                    if refused is not None:
                        raise refused from None
                    raise
                except PotluckError as error:
                    if not error.retriable or error.peer_id is None or tries == self.policy.max_retries:
                        raise
                    if isinstance(error, PeerLimitReached):
                        refused = error
                        if error.peer_id not in self._active_bans():
                            until = time.monotonic() + self.policy.ban_time
                            set_aside.append((error.peer_id, until))
                            logger.info("node %s refused this client: %s", error.peer_id, error)
                            self.banned[error.peer_id] = until
                    else:
                        self.ban(error.peer_id, str(error))
                    await asyncio.sleep(self.policy.backoff * 2**tries)
            raise AssertionError("unreachable")
        finally:
            for peer_id, until in set_aside:
                if self.banned.get(peer_id) == until:  # not banned since for a failure
                    del self.banned[peer_id]


def check_hidden(hidden: torch.Tensor, positions: torch.Tensor) -> None:
    """Refuse hidden states no node takes before anything is sent (the wire would fail on them, and
    the node would be blamed): a float dtype the nodes compute in, values on a real device, and
    positions [batch, length] to go with them."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise BadRequest("hidden states must be a tensor [batch, length, hidden], got "
                         f"{getattr(hidden, 'shape', type(hidden).__name__)}")
    if hidden.dtype not in DTYPES.values():
        raise BadRequest(f"hidden states in {hidden.dtype}: nodes take {', '.join(DTYPES)} (a model made .double() "
                         "sends float64: load it with dtype= one of those instead)")
    if hidden.device.type == "meta":
        raise BadRequest("hidden states on the meta device hold no values")
    if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != tuple(hidden.shape[:2]) \
            or positions.dtype != torch.int64:
        raise BadRequest(f"positions must be int64 [{hidden.shape[0]}, {hidden.shape[1]}] to go with the hidden "
                         f"states, got {getattr(positions, 'dtype', type(positions).__name__)} "
                         f"{tuple(getattr(positions, 'shape', ()))}")


def wire_dtype(hop: Hop, given: torch.dtype) -> torch.dtype:
    """What to send ``hop`` hidden states in: its own dtype where that is 16-bit (it computes in it
    anyway, so sending fewer bytes changes nothing), else as ``given``."""
    dtype = DTYPES.get(hop.record.dtype)
    return dtype if dtype is not None and dtype.itemsize == 2 and given.itemsize > 2 else given


def expect_hidden(frame: msg.Frame, hop: Hop, shape: torch.Size, reply: replies.Reply | None = None) -> torch.Tensor:
    """The hidden states a node answered with (a result, or the output of a hand-off it could not
    make); anything else, the wrong shape or dtype, or a NaN or infinite value counts as a failed
    node (the session routes around it). ``reply``: the frame's reply, where it was parsed already."""
    reply = replies.parse_reply(frame, hop.peer_id) if reply is None else reply
    if not isinstance(reply, (replies.Result, replies.HandoffFailed)) or len(frame.tensors) != 1 \
            or frame.tensors[0].shape != shape or not frame.tensors[0].is_floating_point():
        raise NodeUnavailable(f"node {hop.peer_id} (blocks {hop.start}:{hop.end}) sent a malformed answer "
                              f"({type(reply).__name__})", hop.peer_id)
    if not frame.sane and not bool(torch.isfinite(frame.tensors[0]).all()):
        raise NodeUnavailable(f"node {hop.peer_id} (blocks {hop.start}:{hop.end}) sent hidden states with NaN "
                              "or infinite values", hop.peer_id)
    return frame.tensors[0]
