"""`potluck swarm`: a bootstrap peer and N nodes on loopback that split a model's blocks evenly.

For demos and tests. Starts a `potluck dht` and the nodes as child processes (``LocalSwarm``), as
forks of one process that imports torch, transformers and hivemind once (``forks``: the nodes
start sooner and share those pages), waits until each node is ONLINE, prints the initial-peers
line, and on Ctrl-C (or when a child dies) stops every process it started.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from potluck.protocol.checkpoint import resolve_checkpoint_soon
from potluck.protocol.errors import BadRequest
from potluck.protocol.network import INITIAL_PEERS_ENV

from .local_swarm import LocalSwarm, SwarmStartError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmConfig:
    model: str | None
    nodes: int
    dtype: str | None = None  # None: each node picks for its device
    model_name: str | None = None
    announce_period: float = 15.0
    startup_timeout: float = 600.0  # seconds for every node to come ONLINE
    stop_timeout: float = 15.0  # seconds each node gets to drain before it is killed
    node_args: tuple[str, ...] = ()  # extra arguments for every `potluck node`


def split_evenly(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous spans covering 0:num_blocks, the first ones one block longer when uneven."""
    if not 1 <= parts <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks over {parts} nodes")
    size, extra = divmod(num_blocks, parts)
    spans, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        spans.append((start, end))
        start = end
    return spans


async def run_swarm(config: SwarmConfig, stop: asyncio.Event) -> int:
    resolving, stopping = asyncio.ensure_future(resolve_checkpoint_soon(config.model, config.model_name)), \
        asyncio.ensure_future(stop.wait())
    await asyncio.wait([resolving, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not resolving.done():  # Ctrl-C while the default model is converted: no wait for the conversion
        resolving.cancel()
        return 0
    stopping.cancel()
    checkpoint = resolving.result()
    if config.nodes > checkpoint.num_blocks:
        raise BadRequest(f"--nodes {config.nodes} is more than {checkpoint.name}'s {checkpoint.num_blocks} blocks: "
                         f"give at most {checkpoint.num_blocks}")
    spans = split_evenly(checkpoint.num_blocks, config.nodes)
    node_args = ["--model-name", checkpoint.name, "--announce-period", str(config.announce_period),
                 *(["--dtype", config.dtype] if config.dtype else []), *config.node_args]
    swarm = LocalSwarm(echo=True, node_args=node_args, forks=True)  # node logs go to this terminal
    try:
        starting = asyncio.ensure_future(asyncio.to_thread(_start, swarm, checkpoint.path, spans, config))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # Ctrl-C while nodes load
            swarm.abort()
            await asyncio.gather(starting, return_exceptions=True)
            return 0
        stopping.cancel()
        try:
            starting.result()
        except SwarmStartError as e:
            logger.error("the swarm did not start: %s", e)
            return 1
        print(f"{INITIAL_PEERS_ENV}={swarm.initial_peers[0]}", flush=True)
        logger.info("swarm of %d nodes over %s is ONLINE; Ctrl-C stops it", config.nodes, checkpoint.name)
        while not stop.is_set():
            if swarm.exited():
                logger.error("%s exited unexpectedly; stopping the swarm", ", ".join(swarm.exited()))
                return 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        return 0
    finally:
        await asyncio.to_thread(swarm.stop, config.stop_timeout)


def _start(swarm: LocalSwarm, model, spans: list[tuple[int, int]], config: SwarmConfig) -> None:
    swarm.start_dht()
    swarm.start_nodes(model, spans, timeout=config.startup_timeout, name="local")
