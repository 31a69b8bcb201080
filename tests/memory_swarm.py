"""Nodes and a client in one process, joined by in-memory streams instead of libp2p.

The node side is the real ``BlockServicer`` (handlers, sessions, compute lane) over a real span;
the client side is the real ``SwarmView``/``InferenceSession``. Only the transport is replaced:
``MemorySwarm`` offers what they use of ``SwarmConnection`` (a loop in a thread, streams, single
requests) and of ``PushLinks``, with frames encoded and decoded as on the wire. For unit tests
that need to see inside a step or inject a fault at an exact point.
"""
from __future__ import annotations

import asyncio
import threading
import time

import torch

from potluck.client.channels import Channels
from potluck.client.swarm_view import FailoverPolicy, SwarmView
from potluck.node.compute import ComputeLane
from potluck.node.handlers import BlockServicer, ServingLimits
from potluck.node.sessions import SessionTable
from potluck.protocol import messages as msg
from potluck.protocol import replies
from potluck.node.span import load_span
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.errors import NodeUnavailable, PotluckError
from potluck.protocol.records import NodeRecord, NodeState


def peer_id(name: str) -> str:
    """A base58 string shaped like a peer id, readable in failures."""
    return ("Qm" + name + "z" * 40)[:46]


class MemoryWriter:
    """The write end of an in-memory stream: what is written appears on the peer's reader."""

    def __init__(self, peer: asyncio.StreamReader):
        self.peer, self.closed = peer, False
        self.transport = self  # what FrameBatcher asks of a stream's transport

    def get_write_buffer_size(self) -> int:
        return 0  # the peer's reader takes everything at once

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("stream closed")
        self.peer.feed_data(data)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.peer.feed_eof()


def stream_pair() -> tuple[tuple[asyncio.StreamReader, MemoryWriter], tuple[asyncio.StreamReader, MemoryWriter]]:
    """Two connected ends: ((reader, writer), (reader, writer))."""
    a, b = asyncio.StreamReader(), asyncio.StreamReader()
    return (a, MemoryWriter(b)), (b, MemoryWriter(a))


class MemoryLinks:
    """A node's hand-off links: pushes go straight to the next servicer's push handler."""

    def __init__(self, swarm: "MemorySwarm", source: str):
        self.swarm, self.source = swarm, source  # source: the pushing node's peer id

    async def push(self, peer: str, meta: dict, tensors) -> None:
        target = self.swarm.live_servicer(peer)
        frame = msg.decode_payload(msg.encode_frame(meta, tensors)[msg.HEADER_BYTES:])
        asyncio.get_running_loop().call_soon(self._serve, target, frame)

    def push_now(self, peer: str, meta: dict, tensors) -> bool:
        return False  # every push goes through ``push``

    def _serve(self, target: BlockServicer, frame: msg.Frame) -> None:
        try:
            target._push_request(frame, self.source)
        except PotluckError:
            pass  # a refusal goes back to the pushing node, which these links do not model

    def close(self) -> None:
        pass


class MemorySwarm:
    """Servicers by peer id, a client loop in a thread, and the streams between them."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.servicers: dict[str, BlockServicer] = {}
        self.records: dict[str, NodeRecord] = {}
        self.dead: set[str] = set()
        self._server_writers: dict[str, list[MemoryWriter]] = {}
        self._tasks: set[asyncio.Task] = set()
        self.channels = Channels(self.open_stream)

    def add_node(self, name: str, checkpoint_path, start: int, end: int, speed: float = 100.0,
                 max_batch_tokens: int = 8192) -> str:
        span = load_span(resolve_checkpoint(str(checkpoint_path)), start, end, torch.float32)
        peer = peer_id(name)
        describe = lambda: {"peer_id": peer, "model": "m", "start": start, "end": end, "state": "online"}  # noqa: E731
        self.servicers[peer] = BlockServicer(span, ComputeLane(), SessionTable(100_000),
                                             ServingLimits(max_batch_tokens=max_batch_tokens),
                                             describe=describe, links=MemoryLinks(self, peer))
        self.records[peer] = NodeRecord(model="m", start=start, end=end, state=NodeState.ONLINE, public_name=name,
                                        inference_steps_per_s=speed, forward_tokens_per_s=speed * 100,
                                        cache_tokens_left=100_000, max_batch_tokens=max_batch_tokens)
        return peer

    def view(self, num_blocks: int, policy: FailoverPolicy | None = None, handoff: bool = True) -> SwarmView:
        view = SwarmView(self, "m", num_blocks, policy or FailoverPolicy(request_timeout=2.0, backoff=0.0),
                            handoff, refresh_period=1e9)
        view.records, view._refreshed_at = dict(self.records), time.monotonic()
        view.costs.jitter = 0.0
        return view

    def kill(self, peer: str) -> None:
        """The node dies: its streams break and it cannot be reached any more."""
        def close() -> None:
            self.dead.add(peer)
            for writer in self._server_writers.pop(peer, []):
                writer.close()
        self.loop.call_soon_threadsafe(close)

    def live_servicer(self, peer: str) -> BlockServicer:
        if peer in self.dead or peer not in self.servicers:
            raise NodeUnavailable(f"node {peer} cannot be reached", peer)
        return self.servicers[peer]

    # --- what SwarmView and InferenceSession use of SwarmConnection ---------------------------

    def call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def own(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def open_stream(self, peer: str, handler: str, timeout: float, dial: msg.Dial = msg.DIRECTLY):
        servicer = self.live_servicer(peer)
        (client_reader, client_writer), (server_reader, server_writer) = stream_pair()
        self._server_writers.setdefault(peer, []).append(server_writer)
        self.own(asyncio.create_task(servicer._inference_stream(None, server_reader, server_writer)))
        return client_reader, client_writer

    async def request(self, peer: str, handler: str, meta: dict, tensors=(), timeout: float = 30.0,
                      dial: msg.Dial = msg.DIRECTLY) -> msg.Frame:
        servicer = self.live_servicer(peer)
        frame = msg.decode_payload(msg.encode_frame(meta, tensors)[msg.HEADER_BYTES:])
        reply_meta, reply_tensors = await servicer._serve_safely(servicer._single_request, frame)
        return msg.raise_if_error(msg.Frame(reply_meta, tuple(reply_tensors)), peer)

    async def info(self, peer: str, timeout: float, dial: msg.Dial = msg.DIRECTLY) -> tuple[replies.Info, float]:
        frame = await self.request(peer, msg.INFO_HANDLER, msg.InfoRequest().to_meta(), timeout=timeout)
        return replies.parse_reply(frame, peer), 0.0

    def close(self) -> None:
        async def stop() -> None:
            for task in list(self._tasks):
                task.cancel()
            for servicer in self.servicers.values():
                servicer.compute.shutdown()
        self.call(stop(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
