"""A volunteer node: joins the DHT, loads its span, announces itself and serves until stopped.

Life cycle: ``Node.create`` (P2P, DHT, choose a span unless given one, announce JOINING, load
blocks, measure, announce ONLINE) → serve (a node that chose its span may move, see ``moving``)
→ ``shutdown`` (announce DRAINING, wait for open sessions up to a timeout,
announce OFFLINE, stop). One Python process plus hivemind's p2pd daemon.
"""
from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass, field, replace

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

import potluck
from potluck.protocol import reachability
from potluck.protocol.checkpoint import DTYPES, Checkpoint, config_id, resolve_checkpoint_soon
from potluck.protocol.errors import BadRequest, NodeDraining
from potluck.protocol.devices import resolve_device
from potluck.protocol.directory import read_block_records
from potluck.protocol.identity import identity_path
from potluck.protocol.network import LEAVE_TIMEOUT, bounded, daemon_exited, leave_swarm
from potluck.protocol.records import (ANNOUNCE_PERIOD, PROTOCOL_VERSION, RECORD_TTL_PERIODS, ModelInfo, NodeRecord,
                                      NodeState)

from . import hardware, placement, quantize, reachable
from .announcer import Announcer
from .cache_pool import bytes_per_token
from .compute import ComputeLane
from .handlers import BlockServicer, ServingLimits
from .limits import Limits
from .links import PushLinks
from .metrics import check_metrics_address, serve_metrics, status_line
from .moving import Rebalancer
from .pings import measure_pings, sole_holders
from .sessions import SessionTable
from .span import block_bytes, load_span
from .throughput import Speed, cached_speed, measure, remember_speed, speed_key

logger = logging.getLogger(__name__)
FEW_TOKENS = 256  # a node whose cache share per client is smaller says so: most sessions would be refused


@dataclass(frozen=True)
class NodeConfig:
    model: str | None  # checkpoint folder or HF id; None = the default model
    start: int | None = None  # the span to serve; None: chosen from the swarm's records at start
    end: int | None = None
    num_blocks: int | None = None  # blocks to take when choosing (None: as many as max_memory_gib holds)
    max_memory_gib: float | None = None  # None: most of the free memory of the device
    placement_delay: float = 2.0  # at most this many seconds of random wait before choosing a span
    balance_period: float = 60.0  # seconds between checks whether to move (a chosen span only; 0: never)
    balance_quality: float = 0.75  # move when weakest now / weakest after < this
    throughput: float | None = None  # steps/s to announce instead of measuring
    metrics_port: int | None = None  # serve Prometheus metrics here (0: any free port; None: not at all)
    metrics_host: str = "127.0.0.1"
    initial_peers: list[str] = field(default_factory=list)
    public_name: str = ""
    dtype: str | None = None  # None: hardware.default_dtype of the device
    quant: str = "none"  # weights in 8 or 4 bits: "int8", "nf4" (``quantize``)
    device: str | None = None  # None: the best there is (cuda, mps, cpu)
    cuda_graphs: bool = False  # decoding passes replayed from CUDA graphs (``graphs``); off a GPU: fixed shapes
    model_name: str | None = None  # name in DHT keys (default: from the checkpoint)
    host_maddrs: list[str] = field(default_factory=list)
    announce_maddrs: list[str] = field(default_factory=list)
    announce_period: float = ANNOUNCE_PERIOD
    cache_tokens: int | None = None  # None: as many as fit in cache_gib
    cache_gib: float | None = None  # None: hardware.default_cache_gib (a share of free GPU memory, or 1 GiB)
    max_batch_tokens: int = 8192
    prefill_chunk: int = 512  # most tokens of a prompt run at once, so decoding sessions keep flowing
    max_batch_sessions: int = 64  # decoding steps run together (1: no batching)
    drain_timeout: float = 10.0  # seconds to wait for open sessions on shutdown
    identity_path: str | None = None  # None: the cache folder's key for public_name
    public: bool = False  # listen beyond loopback with UPnP even without initial peers beyond it
    peer_limits: Limits = field(default_factory=Limits)  # what one peer may take of this node
    corrupt_outputs: float = 0.0  # tests only: noise of this scale (x the output's RMS) on every result
    relay_service: bool = True  # relay connections for peers behind NAT (when others can reach this node)


def cache_bytes_per_token(checkpoint: Checkpoint, blocks: int, dtype: torch.dtype) -> int:
    """Keys and values of one token in ``blocks`` blocks."""
    return bytes_per_token(checkpoint.config, blocks, dtype)


def rate(per_second: float) -> str:
    """A speed for a log line: whole numbers, two decimals below 10 (an nf4 CPU node's 0.2 read 0)."""
    return f"{per_second:.0f}" if per_second >= 10 else f"{per_second:.2f}"


def check_cache_budget(config: NodeConfig, checkpoint: Checkpoint, device: torch.device) -> None:
    """A cache budget given that no session could ever have (more than all the memory the device
    has) is refused before anything loads, naming its option. In tokens it is checked once the
    span is known."""
    total = hardware.total_memory(device)
    if total is None:
        return
    if config.cache_tokens is not None and config.start is not None:
        wanted = config.cache_tokens * cache_bytes_per_token(checkpoint, config.end - config.start,
                                                             DTYPES[config.dtype])
        option = f"--cache-tokens {config.cache_tokens}"
    elif config.cache_tokens is None and config.cache_gib is not None:
        wanted, option = int(config.cache_gib * 2**30), f"--cache-gib {config.cache_gib:g}"
    else:
        return
    if wanted > total:
        has = "of RAM and swap" if device.type == "cpu" else f"on {device}"
        raise BadRequest(f"{option}: the cache would take {wanted / 2**30:.1f} GiB, more than the "
                         f"{total / 2**30:.1f} GiB {has}; give less")


def cache_tokens_for(checkpoint: Checkpoint, blocks: int, dtype: torch.dtype, gib: float) -> int:
    return int(gib * 2**30 // cache_bytes_per_token(checkpoint, blocks, dtype))


class Node:
    def __init__(self, config: NodeConfig, checkpoint: Checkpoint, p2p: P2P, dht: DHTNode, device: torch.device):
        self.config, self.checkpoint, self.p2p, self.dht, self.device = config, checkpoint, p2p, dht, device
        self.peer_id = p2p.peer_id.to_base58()
        self.config_id = config_id(checkpoint.config)  # its checkpoint's shape, in its records
        info = ModelInfo(checkpoint.name, checkpoint.num_blocks, checkpoint.config.model_type,
                         checkpoint.config.hidden_size)
        self.announcer = Announcer(dht, self.peer_id, info, self.record, config.announce_period)
        self.servicer: BlockServicer | None = None
        self.links: PushLinks | None = None
        self.sessions: SessionTable | None = None
        self.compute = ComputeLane(config.max_batch_sessions, config.prefill_chunk,
                                   forward_tokens=config.max_batch_tokens,  # what one forward may hold
                                   cuda_graphs=config.cuda_graphs)
        self.speed = Speed()  # measured at start, bettered by idle re-measurements
        self.pings: dict[str, float] = {}  # peer id -> round trip, refreshed each period
        self.silent: set[str] = set()  # nodes whose records say ONLINE that did not answer this period's ping
        self.sole_holders: set[str] = set()  # other nodes that alone hold some block, as of this period's pings
        self.reachability = ""  # as other peers found it (``reachability``); "" in a swarm on this machine
        self.joined: reachability.Reachability | None = None  # what peers found when it joined beyond this machine
        self.relays: list[str] = []  # circuit addresses clients reach this node at, when others cannot dial it
        self.rebalancer: Rebalancer | None = None  # for a node that chose its own span
        self._remeasures_left = 3  # idle periods that re-measure speed; later ones leave an idle node idle
        self._metrics_server = None  # serving --metrics-port, if asked
        self._tasks: set[asyncio.Task] = set()
        self.stopping = threading.Event()  # set: loading and measuring give up at the next block or step

    @classmethod
    async def create(cls, config: NodeConfig) -> "Node":
        device = resolve_device(config.device)
        config = replace(config, device=str(device), dtype=config.dtype or hardware.default_dtype(device))
        if config.dtype not in DTYPES:
            raise BadRequest(f"--dtype must be one of {', '.join(DTYPES)}")
        quantize.check(config.quant)
        hardware.prepare(device)
        if config.cuda_graphs and device.type != "cuda":
            logger.warning("--cuda-graphs: %s is not a CUDA device; decoding passes run at fixed shapes "
                           "without graphs (slower: leave --cuda-graphs out)", device)
        if config.metrics_port is not None:
            check_metrics_address(config.metrics_port, config.metrics_host)
        elif config.metrics_host != NodeConfig.metrics_host:
            logger.warning("--metrics-host %s: no metrics are served without --metrics-port", config.metrics_host)
        checkpoint = await resolve_checkpoint_soon(config.model, config.model_name)
        if config.start is not None and not 0 <= config.start < config.end <= checkpoint.num_blocks:
            raise BadRequest(f"--blocks {config.start}:{config.end} is outside the model's 0:{checkpoint.num_blocks}")
        if config.num_blocks is not None and config.num_blocks > checkpoint.num_blocks:
            raise BadRequest(f"--num-blocks {config.num_blocks}: the model has {checkpoint.num_blocks} blocks")
        if config.start is not None and (config.num_blocks is not None or config.max_memory_gib is not None):
            logger.warning("--blocks %d:%d is served as given; --num-blocks and --max-memory only size a node that "
                           "places itself", config.start, config.end)
        check_cache_budget(config, checkpoint, device)
        key = identity_path(config.identity_path, config.public_name or "node")
        p2p, dht, joined, relays = await reachable.join(
            config.initial_peers, config.host_maddrs, config.announce_maddrs, key, config.public, config.relay_service,
            checkpoint.name, checkpoint.num_blocks)
        node = cls(config, checkpoint, p2p, dht, device)
        node.joined, node.relays = joined, relays
        try:
            await node._start()
        except BaseException:  # including a Ctrl-C (cancellation) while loading or measuring
            node.stopping.set()
            await node.shutdown(drain=False)
            raise
        return node

    async def _start(self) -> None:
        placed_itself = self.config.start is None
        if placed_itself:
            await self._choose_span()
        else:
            await self.announcer.announce(NodeState.JOINING)
        check_cache_budget(self.config, self.checkpoint, self.device)
        config, dtype = self.config, DTYPES[self.config.dtype]
        logger.info("loading %s blocks %d:%d (%s%s on %s) from %s", self.checkpoint.name, config.start, config.end,
                    config.dtype, "" if config.quant == "none" else f", weights in {config.quant}", self.device,
                    self.checkpoint.path)
        began = time.monotonic()
        span = await asyncio.to_thread(load_span, self.checkpoint, config.start, config.end, dtype, self.device,
                                       sys.stderr.isatty(), None, self.stopping, config.quant)
        logger.info("loaded %d blocks in %.1f s", config.end - config.start, time.monotonic() - began)
        self.speed = await self._initial_speed(span)
        gib = config.cache_gib if config.cache_gib is not None else hardware.default_cache_gib(self.device)
        tokens = config.cache_tokens or cache_tokens_for(self.checkpoint, config.end - config.start, dtype, gib)
        default_budget = config.cache_tokens is None and config.cache_gib is None  # shrinks if the GPU fills
        self.sessions = SessionTable(tokens, on_change=self.announcer.nudge, fit_to_device=default_budget)
        share = int(config.peer_limits.cache_share_per_peer * tokens)
        if share < FEW_TOKENS:
            logger.warning("the cache holds %d tokens, %d for any one client (--peer-cache-share): a longer session "
                           "is refused here; give more with --cache-tokens or --cache-gib", tokens, share)
        limits = ServingLimits(max_batch_tokens=config.max_batch_tokens, peers=config.peer_limits)
        self.links = PushLinks(self.p2p)
        self.servicer = BlockServicer(span, self.compute, self.sessions, limits, self.describe, self.links,
                                      corrupt_outputs=config.corrupt_outputs)
        await self.servicer.register(self.p2p)
        await reachability.serve_dialback(self.p2p)
        if self.joined is not None:  # a swarm beyond this machine: can its peers connect here?
            await self._note_reachability(self.joined)
            self._own(self._watch_reachability())
        await self.announcer.announce(NodeState.ONLINE)
        self._own(self.announcer.run(before=self._before_announce))
        if placed_itself and config.balance_period > 0:
            self.rebalancer = Rebalancer(self, config.balance_period, config.balance_quality)
            self._own(self.rebalancer.run())
            self._own(self._measure_pings())  # now, not a period from now: which nodes to watch (below)
            self._own(self.rebalancer.watch_sole_holders())
        if config.metrics_port is not None:
            self._metrics_server = serve_metrics(self, config.metrics_port, config.metrics_host)
        name = f" ({config.public_name})" if config.public_name else ""
        forward = self.speed.forward_tokens_per_s
        logger.info("ONLINE: serving %s blocks %d:%d on %s in %s as %s%s; %s steps/s, %s; cache %d tokens",
                    self.checkpoint.name, config.start, config.end, self.device,
                    config.dtype if config.quant == "none" else f"{config.dtype} (weights in {config.quant})",
                    self.peer_id, name, rate(self.speed.steps_per_s),
                    f"{forward:.0f} tokens/s forward" if forward else "forward speed not measured (--throughput)",
                    tokens)

    async def _initial_speed(self, span) -> Speed:
        """--throughput if given, else the speed measured before on this model, dtype, device and
        span size, else a measurement now (kept for the next start)."""
        if self.config.throughput is not None:
            logger.info("announcing %.1f steps/s as --throughput says (no measurement)", self.config.throughput)
            return Speed(self.config.throughput)
        cached = cached_speed(self._speed_key())
        if cached is not None:
            logger.info("speed from an earlier run: %s steps/s, %.0f tokens/s forward (refined when idle)",
                        rate(cached.steps_per_s), cached.forward_tokens_per_s)
            return cached
        logger.info("measuring this node's speed (once for this model, dtype, device and span size; kept in the "
                    "cache folder for the next start)")
        speed = await asyncio.to_thread(measure, span, stopping=self.stopping, graphs=self.config.cuda_graphs)
        remember_speed(self._speed_key(), speed)
        return speed

    def _speed_key(self) -> str:
        c = self.config
        return speed_key(self.checkpoint.name, self.checkpoint.config.to_json_string(),
                         c.dtype if c.quant == "none" else f"{c.dtype}/{c.quant}", self.device, c.end - c.start,
                         c.cuda_graphs)

    async def _choose_span(self) -> None:
        """Take the span the swarm needs most (see ``placement``), claim it with a JOINING record,
        and look again: where nodes that chose at the same moment overlap, the later peer id moves
        if another span has become better."""
        checkpoint, dtype = self.checkpoint, DTYPES[self.config.dtype]
        length = self.config.num_blocks or self._size_span(dtype)
        await asyncio.sleep(random.uniform(0, self.config.placement_delay))  # not all at once
        own = self.speed.steps_per_s or 1.0  # not measured yet: only the order of the blocks matters then
        records = await read_block_records(self.dht, checkpoint.name, checkpoint.num_blocks, self.config_id)
        span = placement.choose_span(placement.block_throughputs(records, checkpoint.num_blocks, own,
                                                                 exclude=self.peer_id), length, own)
        for _ in range(3):
            self.config = replace(self.config, start=span[0], end=span[1])
            await self.announcer.announce(NodeState.JOINING)
            records = await read_block_records(self.dht, checkpoint.name, checkpoint.num_blocks, self.config_id)
            moved = placement.better_span(records, self.peer_id, span, checkpoint.num_blocks, own)
            if moved is None:
                break
            logger.info("another node claimed blocks near %d:%d at the same moment; taking %d:%d", *span, *moved)
            span = moved
        logger.info("chose blocks %d:%d of %d: the ones the swarm serves least", *span, checkpoint.num_blocks)

    def _size_span(self, dtype: torch.dtype) -> int:
        """Blocks that fit in --max-memory (default: most of what is free) beside the cache budget."""
        config, checkpoint = self.config, self.checkpoint
        memory = int(config.max_memory_gib * 2**30) if config.max_memory_gib else hardware.usable_memory(self.device)
        per_block, cache = block_bytes(checkpoint, 0, dtype, config.quant), 0
        if config.cache_tokens is not None:  # a cache in tokens grows with every block taken
            per_block += config.cache_tokens * self.cache_bytes_per_token(1)
        elif config.cache_gib is not None:
            cache = int(config.cache_gib * 2**30)
        else:
            cache = hardware.cache_reserve(self.device, memory)
        sizing = placement.size_span(checkpoint.num_blocks, per_block, memory, cache)
        logger.info("taking %d blocks: %s", sizing.blocks, sizing.reason)
        if cache and config.cache_gib is None:
            self.config = replace(self.config, cache_gib=cache / 2**30)  # the budget the size assumed
        return sizing.blocks

    async def _before_announce(self) -> None:
        """Refresh what the record says about speed: pings always; throughput in the first few
        idle periods (the figure taken at start may have been slowed by neighbours loading too)."""
        span = self.servicer.span  # None while moving
        idle = not self.sessions.sessions and span is not None
        if idle and self._remeasures_left > 0 and self.config.throughput is None:
            self._remeasures_left -= 1
            self.speed = self.speed.best_of(await self.compute.run(
                lambda: measure(span, graphs=self.config.cuda_graphs)))
            remember_speed(self._speed_key(), self.speed)
        await self._measure_pings()
        logger.info(status_line(self))

    async def _measure_pings(self) -> None:
        try:
            records = await read_block_records(self.dht, self.checkpoint.name, self.checkpoint.num_blocks)
            self.pings, self.silent = await measure_pings(self.p2p, records, self.peer_id, self.config.start,
                                                          self.config.end)
            self.sole_holders = sole_holders(records, self.peer_id)
        except (asyncio.TimeoutError, OSError) as e:
            logger.debug("could not measure pings: %s", e)
            return
        if self.silent and self.rebalancer is not None:  # a node killed without a word may have left a gap
            self.rebalancer.nudge()

    async def _watch_reachability(self, period: float = 600.0, retry: float = 60.0) -> None:
        """Have other peers dial this node back every ``period`` (``retry`` while none answered)."""
        while True:
            await asyncio.sleep(retry if self.reachability == reachability.UNKNOWN else period)
            found, addresses = await reachable.ask(self.p2p, self.dht, self.config.initial_peers,
                                                   self.checkpoint.name, self.checkpoint.num_blocks, self.peer_id)
            await self._note_reachability(found, addresses)

    async def _note_reachability(self, found: reachability.Reachability, addresses: list[str] | None = None) -> None:
        """Announce and explain what other peers found, when it changed."""
        if found.state == self.reachability:
            return
        if addresses is None:
            try:
                addresses = [str(m) for m in await self.p2p.get_visible_maddrs()]
            except ValueError:  # hivemind: no address yet
                addresses = []
        self.reachability = found.state
        reachable.explain(found, addresses, self.relays)
        self.announcer.nudge()

    def cache_bytes_per_token(self, blocks: int) -> int:
        return cache_bytes_per_token(self.checkpoint, blocks, DTYPES[self.config.dtype])

    def record(self, state: NodeState) -> NodeRecord:
        c = self.config
        return NodeRecord(
            model=self.checkpoint.name, start=c.start, end=c.end, state=state, public_name=c.public_name,
            version=potluck.__version__, dtype=c.dtype, quant=c.quant, device=self.device.type,
            inference_steps_per_s=self.speed.steps_per_s, forward_tokens_per_s=self.speed.forward_tokens_per_s,
            cache_tokens_left=self.sessions.tokens_left if self.sessions else 0,
            active_sessions=len(self.sessions.sessions) if self.sessions else 0,
            max_batch_tokens=c.max_batch_tokens, pings=self.pings, protocol=PROTOCOL_VERSION,
            reachability=self.reachability, relays=tuple(self.relays), config_id=self.config_id,
        )

    def describe(self) -> dict:
        record = self.record(self.announcer.state)
        return {"peer_id": self.peer_id, "model": record.model, "start": record.start, "end": record.end,
                "state": record.state.value, "version": record.version, "dtype": record.dtype, "quant": record.quant,
                "device": record.device,
                "cache_tokens_left": record.cache_tokens_left, "public_name": record.public_name}

    def _own(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self, drain: bool = True) -> None:
        """Announce DRAINING, let open sessions finish (up to drain_timeout), announce OFFLINE, stop.
        Cancelled while draining (a second Ctrl-C): the sessions are told to go elsewhere at once and
        the node still leaves in order; the cancellation is raised at the end."""
        for task in list(self._tasks):
            task.cancel()
        hurried = False
        if self.servicer is not None and drain:
            self.servicer.draining = True
            try:
                await self._drain()
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()
                hurried = True
                logger.info("stopping now: %d sessions told to go elsewhere", len(self.sessions.sessions))
            if self.sessions.sessions:
                await bounded(self.servicer.evict(NodeDraining(
                    f"node {self.peer_id} is leaving; continue on another node")),
                    LEAVE_TIMEOUT, "telling the open sessions to go elsewhere", self.p2p)
        await self._leave()
        if hurried:
            raise asyncio.CancelledError

    async def _drain(self) -> None:
        if self.sessions.sessions:
            logger.info("draining: %d sessions open may finish within %.0f s (--drain-timeout); Ctrl-C again "
                        "to stop now", len(self.sessions.sessions), self.config.drain_timeout)
        await bounded(self.announcer.announce(NodeState.DRAINING), LEAVE_TIMEOUT, "announcing DRAINING", self.p2p)
        deadline = time.monotonic() + self.config.drain_timeout
        while self.sessions.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.sessions.sessions:
            logger.warning("telling %d sessions still open after %.0f s to go elsewhere",
                           len(self.sessions.sessions), self.config.drain_timeout)

    async def _leave(self) -> None:
        if self.config.start is not None and daemon_exited(self.p2p):
            logger.warning("could not announce OFFLINE: the P2P daemon stopped with this node (a SIGTERM to the whole "
                           "process group?); the swarm sees it until its record expires, within %.0f s. To leave in "
                           "order, signal the node's own process (Ctrl-C, kill PID; systemd: KillMode=mixed)",
                           self.announcer.period * RECORD_TTL_PERIODS)
        elif self.config.start is not None:  # a node stopped before it chose its span announced nothing
            # the DHT keeps the later-expiring value: the OFFLINE record's is not shorter
            await bounded(self.announcer.announce(NodeState.OFFLINE), LEAVE_TIMEOUT, "announcing OFFLINE", self.p2p)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
        if self.servicer is not None:
            self.servicer.stop()
        if self.links is not None:
            self.links.close()
        self.compute.shutdown()
        await leave_swarm(self.p2p, self.dht)
        if self.servicer is not None:  # it served: say so (a node that failed to load says why instead)
            logger.info("OFFLINE")
        else:
            logger.debug("left the swarm before serving")
