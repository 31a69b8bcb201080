"""Inference sessions through a chain of nodes, and cache-less forward passes.

An ``InferenceSession`` keeps one long-lived stream per hop (a new stream per message costs far
more than a round trip on an open one). A step sends only the new tokens' hidden states; the
history stays in the nodes' caches. All hops of a step run in one coroutine on the client loop.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import torch

from potluck.protocol import messages as msg
from potluck.protocol.errors import NodeUnavailable, PotluckError
from potluck.protocol.records import NodeRecord

from .routing import Hop, find_chain
from .transport import SwarmConnection

logger = logging.getLogger(__name__)


@dataclass
class _OpenHop:
    hop: Hop
    session_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class RemoteChain:
    """What the client needs to reach a model's blocks: the connection and the current records."""

    swarm: SwarmConnection
    model: str
    num_blocks: int
    records: dict[str, NodeRecord] = field(default_factory=dict)
    request_timeout: float = 30.0  # seconds one node may take to answer a message

    def refresh(self) -> None:
        from potluck.protocol.directory import read_block_records

        self.records = self.swarm.call(read_block_records(self.swarm.dht, self.model, self.num_blocks),
                                       self.request_timeout)

    def route(self, cache_tokens: int = 0) -> list[Hop]:
        self.refresh()
        return find_chain(self.records, 0, self.num_blocks, cache_tokens=cache_tokens)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Whole sequences through every block, no cache kept on the nodes."""
        chain = self.route()
        return self.swarm.call(self._forward(chain, hidden, positions, mask))

    async def _forward(self, chain: list[Hop], hidden, positions, mask) -> torch.Tensor:
        tensors = [positions] + ([] if mask is None else [mask])
        for hop in chain:
            frame = await self.swarm.request(hop.peer_id, msg.FORWARD_HANDLER,
                                             {"type": "forward", "start": hop.start, "end": hop.end},
                                             [hidden, *tensors], self.request_timeout)
            hidden = _one_hidden(frame, hop, hidden.shape)
        return hidden


class InferenceSession:
    """A conversation with the swarm: each step appends tokens to the nodes' attention caches.

    Use as a context manager; the nodes free the session's cache when it closes."""

    def __init__(self, chain: RemoteChain, max_length: int):
        self.chain, self.max_length = chain, max_length
        self.position = 0  # tokens the nodes hold
        self.token_ids: torch.Tensor | None = None  # [B, >= position] ids so far; the first `position` are cached
        self.batch_size: int | None = None
        self._hops: list[_OpenHop] = []
        self._rewound = False  # the next step tells the nodes to drop tokens past `position`
        self.closed = False

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def hops(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    def rewind(self, position: int) -> None:
        """Forget everything after the first ``position`` tokens (the nodes drop it on the next step)."""
        if not 0 <= position <= self.position:
            raise PotluckError(f"cannot rewind a session of {self.position} tokens to {position}")
        self.position, self._rewound = position, True
        if self.token_ids is not None:
            self.token_ids = self.token_ids[:, :position]

    def step(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, H] of the new tokens → output hidden [B, T, H] of the last block."""
        if self.closed:
            raise PotluckError("this inference session is closed")
        if self.batch_size is None:
            self.batch_size = hidden.shape[0]
        start_from = self.position if self._rewound else None
        out = self.chain.swarm.call(self._step(hidden, positions, mask, start_from))
        self.position, self._rewound = self.position + hidden.shape[1], False
        return out

    async def _step(self, hidden, positions, mask, start_from) -> torch.Tensor:
        if not self._hops:
            await self._open()
        meta = {"type": "step", "session_id": "", "start_from": start_from}
        extra = [positions] + ([] if mask is None else [mask])
        for open_hop in self._hops:
            meta["session_id"] = open_hop.session_id
            frame = await self._exchange(open_hop, meta, [hidden, *extra])
            hidden = _one_hidden(frame, open_hop.hop, hidden.shape)
        return hidden

    async def _open(self) -> None:
        chain = await asyncio.get_running_loop().run_in_executor(
            None, self.chain.route, self.max_length * (self.batch_size or 1))
        for hop in chain:
            reader, writer = await self.chain.swarm.open_stream(hop.peer_id, msg.INFERENCE_HANDLER,
                                                                 self.chain.request_timeout)
            open_hop = _OpenHop(hop, uuid.uuid4().hex, reader, writer)
            self._hops.append(open_hop)
            await self._exchange(open_hop, {"type": "open", "session_id": open_hop.session_id, "start": hop.start,
                                            "end": hop.end, "max_length": self.max_length,
                                            "batch_size": self.batch_size or 1})

    async def _exchange(self, open_hop: _OpenHop, meta: dict, tensors=()) -> msg.Frame:
        hop = open_hop.hop
        try:
            await msg.write_frame(open_hop.writer, meta, tensors)
            frame = await asyncio.wait_for(msg.read_frame(open_hop.reader), self.chain.request_timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            raise NodeUnavailable(f"node {hop.peer_id} ({hop.record.public_name or 'unnamed'}, blocks "
                                  f"{hop.start}:{hop.end}) failed: {type(e).__name__} {e}".rstrip()) from None
        return msg.raise_if_error(frame)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._hops:
            self.chain.swarm.call(self._close(), timeout=self.chain.request_timeout)

    async def _close(self) -> None:
        for open_hop in self._hops:
            open_hop.writer.close()  # the node closes the stream's sessions when it ends
        self._hops.clear()


def _one_hidden(frame: msg.Frame, hop: Hop, shape: torch.Size) -> torch.Tensor:
    """The hidden states a node answered with; a malformed answer counts as a failed node."""
    if frame.meta.get("type") != "result" or len(frame.tensors) != 1 or frame.tensors[0].shape != shape:
        raise NodeUnavailable(f"node {hop.peer_id} (blocks {hop.start}:{hop.end}) sent a malformed answer "
                              f"{frame.meta.get('type')!r:.40}")
    return frame.tensors[0]
