"""Inference sessions through a chain of nodes, with failover that replays lost caches.

An ``InferenceSession`` keeps one long-lived stream per hop (a new stream per message costs far
more than a round trip on an open one). A step sends only the new tokens' hidden states; the
history stays in the nodes' caches. The client also keeps, per hop, the inputs it sent; when a
node fails (stream error, timeout, typed refusal), it bans the node, routes a replacement for
that hop's blocks, replays those inputs to rebuild the cache there, and carries on, so the user
gets the same tokens as without the fault. All hops of a step run in one coroutine.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import torch

from potluck.protocol import messages as msg
from potluck.protocol.errors import NodeUnavailable, NoRoute, PotluckError

from .chain import RemoteChain, expect_hidden
from .routing import Hop

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    hidden: torch.Tensor  # [B, T, H] new tokens' hidden states entering a hop
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, prefix + T] or None (no padding)


@dataclass
class HopSession:
    """One hop of the chain: a stream to a node, and the inputs it has received so far."""

    hop: Hop
    session_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    history: list[StepInputs] = field(default_factory=list)  # what the node's cache was built from

    def remember(self, inputs: StepInputs, start_from: int) -> None:
        self.history = _cut(self.history, start_from) + [inputs]


class InferenceSession:
    """A conversation with the swarm: each step appends tokens to the nodes' attention caches.

    Use as a context manager; the nodes free the session's cache when it closes."""

    def __init__(self, chain: RemoteChain, max_length: int):
        self.chain, self.max_length = chain, max_length
        self.position = 0  # tokens the nodes hold
        self.token_ids: torch.Tensor | None = None  # [B, >= position] ids so far; the first `position` are cached
        self.batch_size: int | None = None
        self._hops: list[HopSession] = []
        self._rewound = False  # the next step tells the nodes to drop tokens past `position`
        self.failovers = 0  # hops replaced so far
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
        out = self.chain.swarm.call(self._step(StepInputs(hidden, positions, mask), start_from))
        self.position, self._rewound = self.position + hidden.shape[1], False
        return out

    async def _step(self, inputs: StepInputs, start_from: int | None) -> torch.Tensor:
        if not self._hops:
            self._hops = await self._open_chain(0, self.chain.num_blocks)
        index, failures = 0, 0
        while index < len(self._hops):
            hop_session = self._hops[index]
            try:
                hidden = await self._send_step(hop_session, inputs, start_from)
            except PotluckError as error:
                failures += 1
                if not error.retriable or failures > self.chain.policy.max_retries:
                    raise
                await self._replace(index, error)
                continue  # the same step, now on the replacement hops
            hop_session.remember(inputs, self.position if start_from is None else start_from)
            inputs = StepInputs(hidden, inputs.positions, inputs.mask)
            index += 1
        return inputs.hidden

    async def _send_step(self, hop_session: HopSession, inputs: StepInputs, start_from: int | None) -> torch.Tensor:
        meta = {"type": "step", "session_id": hop_session.session_id, "start_from": start_from}
        tensors = [inputs.hidden, inputs.positions] + ([] if inputs.mask is None else [inputs.mask])
        tokens = inputs.hidden.shape[0] * inputs.hidden.shape[1]
        frame = await self._exchange(hop_session, meta, tensors, self.chain.timeout_for(hop_session.hop, tokens))
        return expect_hidden(frame, hop_session.hop, inputs.hidden.shape)

    async def _replace(self, index: int, error: PotluckError) -> None:
        """Swap hop ``index`` for a fresh chain over its blocks, rebuilt from that hop's history."""
        failed = self._hops[index]
        self.chain.ban(failed.hop.peer_id, str(error))
        failed.writer.close()
        for attempt in range(self.chain.policy.max_retries + 1):
            try:
                replacement = await self._open_chain(failed.hop.start, failed.hop.end)
            except NoRoute as no_route:
                raise NoRoute(f"{no_route}, after node {failed.hop.peer_id} failed: {error}",
                              failed.hop.peer_id) from error
            try:
                await self._replay(replacement, failed.history)
                break
            except PotluckError as replay_error:
                for hop_session in replacement:
                    hop_session.writer.close()
                if not replay_error.retriable or attempt == self.chain.policy.max_retries:
                    raise
                self.chain.ban(replay_error.peer_id or replacement[0].hop.peer_id, str(replay_error))
        self._hops[index:index + 1] = replacement
        self.failovers += 1
        logger.info("replaced node %s (blocks %d:%d) with %s", failed.hop.peer_id, failed.hop.start, failed.hop.end,
                    ", ".join(f"{h.hop.peer_id} {h.hop.start}:{h.hop.end}" for h in replacement))

    async def _replay(self, hops: list[HopSession], history: list[StepInputs]) -> None:
        """Rebuild the caches of new hops from the inputs the failed hop had received, in chunks
        each node accepts."""
        if not history:
            return
        full = StepInputs(torch.cat([s.hidden for s in history], 1), torch.cat([s.positions for s in history], 1),
                          history[-1].mask)
        for hop_session in hops:
            limit = max(1, hop_session.hop.record.max_batch_tokens // full.hidden.shape[0] or full.hidden.shape[1])
            outputs = []
            for offset in range(0, full.hidden.shape[1], limit):
                chunk = StepInputs(full.hidden[:, offset:offset + limit], full.positions[:, offset:offset + limit],
                                   None if full.mask is None else full.mask[:, :offset + limit])
                outputs.append(await self._send_step(hop_session, chunk, offset))
            hop_session.history = [full]
            full = StepInputs(torch.cat(outputs, 1), full.positions, full.mask)

    async def _open_chain(self, start: int, end: int) -> list[HopSession]:
        """Route blocks start:end and open a session on each hop; unreachable nodes are banned
        and routed around (NoRoute once nothing is left)."""
        for attempt in range(self.chain.policy.max_retries + 1):
            chain = await self.chain.route(start, end, self.max_length * (self.batch_size or 1))
            opened = []
            try:
                for hop in chain:
                    opened.append(await self._open_hop(hop))
                return opened
            except PotluckError as error:
                for hop_session in opened:
                    hop_session.writer.close()
                if not error.retriable or error.peer_id is None or attempt == self.chain.policy.max_retries:
                    raise
                self.chain.ban(error.peer_id, str(error))
                await asyncio.sleep(self.chain.policy.backoff * 2**attempt)
        raise AssertionError("unreachable")

    async def _open_hop(self, hop: Hop) -> HopSession:
        reader, writer = await self.chain.swarm.open_stream(hop.peer_id, msg.INFERENCE_HANDLER,
                                                            self.chain.policy.request_timeout)
        hop_session = HopSession(hop, uuid.uuid4().hex, reader, writer)
        try:
            await self._exchange(hop_session, {"type": "open", "session_id": hop_session.session_id,
                                               "start": hop.start, "end": hop.end, "max_length": self.max_length,
                                               "batch_size": self.batch_size or 1}, (),
                                 self.chain.policy.request_timeout)
        except BaseException:
            writer.close()
            raise
        self.chain.costs.local_sessions[hop.peer_id] = self.chain.costs.local_sessions.get(hop.peer_id, 0) + 1
        return hop_session

    async def _exchange(self, hop_session: HopSession, meta: dict, tensors, timeout: float) -> msg.Frame:
        hop = hop_session.hop
        try:
            await msg.write_frame(hop_session.writer, meta, tensors)
            frame = await asyncio.wait_for(msg.read_frame(hop_session.reader), timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            raise NodeUnavailable(f"node {hop.peer_id} ({hop.record.public_name or 'unnamed'}, blocks "
                                  f"{hop.start}:{hop.end}) failed: {type(e).__name__} {e}".rstrip(),
                                  hop.peer_id) from None
        return msg.raise_if_error(frame, hop.peer_id)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._hops:
            self.chain.swarm.call(self._close(), timeout=self.chain.policy.request_timeout)

    async def _close(self) -> None:
        for hop_session in self._hops:
            hop_session.writer.close()  # the node closes the stream's sessions when it ends
            sessions = self.chain.costs.local_sessions
            sessions[hop_session.hop.peer_id] = max(0, sessions.get(hop_session.hop.peer_id, 1) - 1)
        self._hops.clear()


def _cut(history: list[StepInputs], length: int) -> list[StepInputs]:
    """The first ``length`` tokens of a history of steps."""
    kept, total = [], 0
    for step in history:
        if total >= length:
            break
        take = min(step.hidden.shape[1], length - total)
        mask = None if step.mask is None else step.mask[:, :total + take]
        kept.append(StepInputs(step.hidden[:, :take], step.positions[:, :take], mask))
        total += take
    return kept
