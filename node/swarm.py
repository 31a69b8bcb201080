"""`potluck swarm`: a bootstrap peer and N nodes on loopback that split a model's blocks evenly.

For demos and tests. The launcher keeps the bootstrap DHT in its own process, starts each node
as a child process, waits until the DHT shows every node ONLINE, prints the initial-peers line,
and on Ctrl-C (or when a node dies) stops every process it started.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import sys
import time
from dataclasses import dataclass

from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.directory import read_block_records
from potluck.protocol.network import LOOPBACK_MADDR
from potluck.protocol.records import NodeState

from .bootstrap import initial_peers_line, start_bootstrap

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
    checkpoint = await asyncio.to_thread(resolve_checkpoint, config.model, config.model_name)
    p2p, dht = await start_bootstrap(host_maddrs=[LOOPBACK_MADDR])
    children: list[asyncio.subprocess.Process] = []
    try:
        peers_line = await initial_peers_line(p2p)
        maddr = peers_line.split("=", 1)[1]
        for i, (start, end) in enumerate(split_evenly(checkpoint.num_blocks, config.nodes)):
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "potluck", "node", str(checkpoint.path), "--blocks", f"{start}:{end}",
                "--initial-peers", maddr, "--model-name", checkpoint.name, "--public-name", f"local-{i}",
                *(["--dtype", config.dtype] if config.dtype else []), "--announce-period", str(config.announce_period),
                *config.node_args,
                start_new_session=True, preexec_fn=_die_with_parent,  # Ctrl-C reaches nodes once, through us
            ))
        if not await _wait_online(dht, checkpoint.name, checkpoint.num_blocks, children, config, stop):
            return 1
        print(peers_line, flush=True)
        logger.info("swarm of %d nodes over %s is ONLINE; Ctrl-C stops it", config.nodes, checkpoint.name)
        waiters = [asyncio.create_task(stop.wait())] + [asyncio.create_task(c.wait()) for c in children]
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if not stop.is_set():
            logger.error("a node exited unexpectedly; stopping the swarm")
            return 1
        return 0
    finally:
        await _stop_children(children, config.stop_timeout)
        await dht.shutdown()
        await p2p.shutdown()


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies without stopping us (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


async def _wait_online(dht, model: str, num_blocks: int, children, config: SwarmConfig, stop: asyncio.Event) -> bool:
    deadline = time.monotonic() + config.startup_timeout
    while time.monotonic() < deadline and not stop.is_set():
        if any(c.returncode is not None for c in children):
            logger.error("a node exited during startup")
            return False
        records = await read_block_records(dht, model, num_blocks)
        online = [r for r in records.values() if r.state == NodeState.ONLINE]
        covered = {i for r in online for i in range(r.start, r.end)}
        if len(online) >= len(children) and len(covered) == num_blocks:
            return True
        await asyncio.sleep(0.5)
    if not stop.is_set():
        logger.error("nodes did not all come ONLINE within %.0f s", config.startup_timeout)
    return False


async def _stop_children(children: list[asyncio.subprocess.Process], timeout: float) -> None:
    for child in children:
        if child.returncode is None:
            child.send_signal(signal.SIGINT)
    for child in children:
        try:
            await asyncio.wait_for(child.wait(), timeout)
        except asyncio.TimeoutError:
            logger.warning("node %d did not stop in %.0f s; killing it", child.pid, timeout)
            child.kill()
            await child.wait()
