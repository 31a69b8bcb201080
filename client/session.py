"""Inference sessions through a chain of nodes, with failover that replays lost caches.

An ``InferenceSession`` keeps one long-lived stream per hop (a new stream per message costs far
more than a round trip on an open one). A step sends only the new tokens' hidden states; the
history stays in the nodes' caches. The client also keeps, per hop, the inputs it sent; when a
node fails (stream error, timeout, typed refusal), it bans the node, routes a replacement for
that hop's blocks, replays those inputs to rebuild the cache there, and carries on, so the user
gets the same tokens as without the fault. All hops of a step run in one coroutine.

Hand-off: with ``SwarmView.handoff`` on, a step goes to the first node only, each node pushes its
output to the next, and the last one answers the client: one message out and one back per step.
The client then knows only the first hop's inputs; a failed later hop gets its history rebuilt
by a cache-less forward through the hops before it. Any trouble in a hand-off step makes the
client redo that step hop by hop (nodes rewind to the step's start, so a redo is idempotent).

Counting tokens: ``position`` is what the nodes hold for the session; a step starts there
(``step_start``) and tells each node ``start_from``: None to append after what it holds, or a
number to rewind to first (after a rewind or a failed step). A node's ``Session.cached`` counts its
cache; a hop's ``history_tokens`` counts the inputs this client kept to rebuild it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from dataclasses import dataclass, field

import torch

from potluck.protocol import messages as msg
from potluck.protocol import replies
from potluck.protocol.errors import NodeUnavailable, NoRoute, PotluckError

from .swarm_view import SwarmView, expect_hidden
from .routing import Hop

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    hidden: torch.Tensor  # [B, T, H] new tokens' hidden states entering a hop
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, step start + T] or None (no padding)


@dataclass
class HopSession:
    """One hop of the chain: a stream to a node, and the inputs it has received so far."""

    hop: Hop
    session_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    history: list[StepInputs] = field(default_factory=list)  # what the node's cache was built from
    history_tokens: int = 0  # tokens in ``history``
    history_known: bool = True  # False once a hand-off step fed this hop without the client seeing it
    failed: PotluckError | None = None  # the stream broke while the client waited on another hop
    reading: asyncio.Task | None = None  # copies frames from the stream into the session's inbox

    def remember(self, inputs: StepInputs, step_start: int) -> None:
        if step_start < self.history_tokens:  # a rewind: drop the tail
            self.history = _cut(self.history, step_start)
        self.history.append(inputs)
        self.history_tokens = step_start + inputs.hidden.shape[1]

    def rebuilt_from(self, inputs: StepInputs) -> None:
        self.history, self.history_tokens, self.history_known = [inputs], inputs.hidden.shape[1], True

    def describe(self) -> str:
        return f"node {self.hop.peer_id} ({self.hop.record.public_name or 'unnamed'}, blocks {self.hop.start}:{self.hop.end})"

    def close(self) -> None:
        if self.reading is not None:
            self.reading.cancel()
        self.writer.close()


class InferenceSession:
    """A conversation with the swarm: each step appends tokens to the nodes' attention caches.

    Use as a context manager; the nodes free the session's cache when it closes."""

    def __init__(self, view: SwarmView, max_length: int):
        self.view, self.max_length = view, max_length
        self.position = 0  # tokens the nodes hold
        self.token_ids: torch.Tensor | None = None  # [B, >= position] ids so far; the first `position` are cached
        self.batch_size: int | None = None
        self._hops: list[HopSession] = []
        self._rewound = False  # the next step tells the nodes to drop tokens past `position`
        self._inbox: asyncio.Queue | None = None  # (hop session, frame or error) from every hop's stream
        self._direct_links: set[tuple[str, str]] = set()  # (peer, next peer) that could not hand off
        self._seq = 0  # numbers each step attempt; answers to earlier attempts are dropped
        self.failovers = 0  # hops replaced so far
        self.handoff_fallbacks = 0  # hand-off steps redone hop by hop
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
        try:
            out = self.view.swarm.call(self._step(StepInputs(hidden, positions, mask), start_from))
        except BaseException:
            self._rewound = True  # some hops may hold this step's tokens: the next step re-sends from position
            raise
        self.position, self._rewound = self.position + hidden.shape[1], False
        return out

    async def _step(self, inputs: StepInputs, start_from: int | None) -> torch.Tensor:
        if self._inbox is None:
            self._inbox = asyncio.Queue()
        if not self._hops:
            self._hops = await self._open_chain(0, self.view.num_blocks)
        step_start = self.position if start_from is None else start_from
        if self._can_hand_off():
            try:
                return await self._handoff_step(inputs, start_from, step_start)
            except PotluckError as error:
                if not error.retriable:
                    raise
                self.handoff_fallbacks += 1
                logger.info("hand-off step failed (%s); redoing it hop by hop", error)
                if error.peer_id is None:  # a timeout somewhere along the chain: find who hangs
                    await self._probe_hops()
                start_from = step_start  # nodes that already took this step rewind and take it again
        return await self._hop_by_hop(inputs, start_from, step_start, 0)

    def _can_hand_off(self) -> bool:
        pairs = zip(self._hops, self._hops[1:])
        return self.view.handoff and len(self._hops) > 1 and not any(
            (a.hop.peer_id, b.hop.peer_id) in self._direct_links for a, b in pairs)

    async def _handoff_step(self, inputs: StepInputs, start_from: int | None, step_start: int) -> torch.Tensor:
        first, last = self._hops[0], self._hops[-1]
        hops = list(self._hops)
        step = msg.Step(first.session_id, start_from, tuple(msg.NextHop(h.hop.peer_id, h.session_id) for h in hops[1:]))
        tokens = inputs.hidden.shape[0] * inputs.hidden.shape[1]
        timeout = self.view.timeout_for([h.hop for h in hops], tokens)
        await self._send(first, step, inputs)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            source, frame = await self._receive(None, deadline, hops)
            reply = replies.parse_reply(frame, source.hop.peer_id)
            if source is last and isinstance(reply, replies.Result):
                out = expect_hidden(frame, last.hop, inputs.hidden.shape)
                break
            if isinstance(reply, replies.HandoffFailed) and source is not last:  # carry on from the next hop
                index = hops.index(source)
                self._direct_links.add((source.hop.peer_id, hops[index + 1].hop.peer_id))
                hidden = expect_hidden(frame, source.hop, inputs.hidden.shape)
                first.remember(inputs, step_start)
                for hop_session in hops[1:index + 1]:
                    hop_session.history_known = False
                return await self._hop_by_hop(StepInputs(hidden, inputs.positions, inputs.mask), start_from, step_start,
                                              index + 1)
        first.remember(inputs, step_start)
        for hop_session in hops[1:]:
            hop_session.history_known = False
        return out

    async def _probe_hops(self) -> None:
        """Ask every hop for its info at once; mark those that do not answer as failed, so the
        redo replaces them at once instead of waiting out another timeout on each."""
        async def probe(hop_session: HopSession) -> None:
            try:
                await self.view.swarm.info(hop_session.hop.peer_id, timeout=self.view.policy.probe_timeout)
            except PotluckError as error:
                hop_session.failed = error

        await asyncio.gather(*(probe(h) for h in self._hops))

    async def _hop_by_hop(self, inputs: StepInputs, start_from: int | None, step_start: int,
                          index: int) -> torch.Tensor:
        failures = 0
        while index < len(self._hops):
            hop_session = self._hops[index]
            try:
                hidden = await self._send_step(hop_session, inputs, start_from)
            except PotluckError as error:
                failures += 1
                if not error.retriable or failures > self.view.policy.max_retries:
                    raise
                await self._replace(index, error)
                continue  # the same step, now on the replacement hops
            hop_session.remember(inputs, step_start)
            inputs = StepInputs(hidden, inputs.positions, inputs.mask)
            index += 1
        return inputs.hidden

    async def _send_step(self, hop_session: HopSession, inputs: StepInputs, start_from: int | None) -> torch.Tensor:
        tokens = inputs.hidden.shape[0] * inputs.hidden.shape[1]
        await self._send(hop_session, msg.Step(hop_session.session_id, start_from), inputs)
        deadline = asyncio.get_running_loop().time() + self.view.timeout_for([hop_session.hop], tokens)
        _, frame = await self._receive(hop_session, deadline, [hop_session])
        return expect_hidden(frame, hop_session.hop, inputs.hidden.shape)

    async def _send(self, hop_session: HopSession, request: msg.OpenSession | msg.Step,
                    inputs: StepInputs | None) -> None:
        if hop_session.failed is not None:
            raise hop_session.failed
        self._seq += 1  # answers echo it; an answer to an earlier attempt is dropped
        if isinstance(request, msg.Step):
            request = dataclasses.replace(request, seq=self._seq)
        tensors = () if inputs is None else [inputs.hidden, inputs.positions] + (
            [] if inputs.mask is None else [inputs.mask])
        try:
            await msg.write_frame(hop_session.writer, request.to_meta(), tensors)
        except (ConnectionError, OSError) as e:
            raise NodeUnavailable(f"{hop_session.describe()} failed: {type(e).__name__} {e}",
                                  hop_session.hop.peer_id) from None

    async def _receive(self, expected: HopSession | None, deadline: float,
                       waiting_on: list[HopSession]) -> tuple[HopSession, msg.Frame]:
        """The next frame from ``expected`` (None: from any hop in ``waiting_on``). An error from a
        hop we wait on is raised; late frames from other hops are dropped, their failures noted."""
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # no extra task per wait, unlike wait_for
                    source, item = await self._inbox.get()
            except TimeoutError:
                who = expected.describe() if expected is not None else "the chain"
                raise NodeUnavailable(f"{who} did not answer in time",
                                      expected.hop.peer_id if expected is not None else None) from None
            if source not in waiting_on:
                if isinstance(item, PotluckError):
                    source.failed = item
                continue
            if not isinstance(item, PotluckError) and item.meta.get("seq", self._seq) != self._seq:
                continue  # the answer to an attempt we gave up on
            if isinstance(item, PotluckError):
                raise item
            if expected is None or source is expected:
                return source, msg.raise_if_error(item, source.hop.peer_id)

    async def _read_forever(self, hop_session: HopSession) -> None:
        try:
            while True:
                self._inbox.put_nowait((hop_session, await msg.read_frame(hop_session.reader)))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, PotluckError) as e:
            error = NodeUnavailable(f"{hop_session.describe()} failed: {type(e).__name__} {e}".rstrip(),
                                    hop_session.hop.peer_id)
            hop_session.failed = error
            self._inbox.put_nowait((hop_session, error))

    async def _replace(self, index: int, error: PotluckError) -> None:
        """Swap hop ``index`` for a fresh chain over its blocks, rebuilt from that hop's history."""
        failed = self._hops[index]
        self.view.ban(failed.hop.peer_id, str(error))
        failed.close()
        history = failed.history if failed.history_known else await self._rebuild_history(failed)

        async def rebuilt_replacement() -> list[HopSession]:
            try:
                replacement = await self._open_chain(failed.hop.start, failed.hop.end)
            except NoRoute as no_route:
                raise NoRoute(f"{no_route}, after node {failed.hop.peer_id} failed: {error}",
                              failed.hop.peer_id) from error
            try:
                await self._replay(replacement, history)
            except PotluckError as replay_error:
                for hop_session in replacement:
                    hop_session.close()
                replay_error.peer_id = replay_error.peer_id or replacement[0].hop.peer_id
                raise
            return replacement

        replacement = await self.view.retrying(rebuilt_replacement)
        self._hops[index:index + 1] = replacement
        self.failovers += 1
        logger.info("replaced node %s (blocks %d:%d) with %s", failed.hop.peer_id, failed.hop.start, failed.hop.end,
                    ", ".join(f"{h.hop.peer_id} {h.hop.start}:{h.hop.end}" for h in replacement))

    async def _rebuild_history(self, failed: HopSession) -> list[StepInputs]:
        """What a hop fed by hand-off had received: the first hop's inputs, run without a cache
        through the blocks before it."""
        first = self._hops[0]
        if not first.history:
            return []
        full = _joined(first.history)
        hidden = await self.view.forward_async(full.hidden, full.positions, full.mask, first.hop.start,
                                                failed.hop.start, self.view.chain_dtype(self.hops))
        return [StepInputs(hidden, full.positions, full.mask)]

    async def _replay(self, hops: list[HopSession], history: list[StepInputs]) -> None:
        """Rebuild the caches of new hops from the inputs the failed hop had received, in chunks
        each node accepts."""
        if not history:
            return
        full = _joined(history)
        batch, length = full.hidden.shape[:2]
        for hop_session in hops:
            accepted = hop_session.hop.record.max_batch_tokens  # 0: the node announced no limit
            limit = max(1, accepted // batch) if accepted else length
            outputs = []
            for offset in range(0, full.hidden.shape[1], limit):
                chunk = StepInputs(full.hidden[:, offset:offset + limit], full.positions[:, offset:offset + limit],
                                   None if full.mask is None else full.mask[:, :offset + limit])
                outputs.append(await self._send_step(hop_session, chunk, offset))
            hop_session.rebuilt_from(full)
            full = StepInputs(torch.cat(outputs, 1), full.positions, full.mask)

    async def _open_chain(self, start: int, end: int) -> list[HopSession]:
        """Route blocks start:end and open a session on each hop; unreachable nodes are banned
        and routed around (NoRoute once nothing is left)."""
        async def opened_chain() -> list[HopSession]:
            chain = await self.view.route(start, end, self.max_length * (self.batch_size or 1),
                                           self.view.chain_dtype(self.hops))  # a replacement keeps the dtype
            opened = []
            try:
                for hop in chain:
                    opened.append(await self._open_hop(hop))
            except BaseException:
                for hop_session in opened:
                    hop_session.close()
                raise
            return opened

        return await self.view.retrying(opened_chain)

    async def _open_hop(self, hop: Hop) -> HopSession:
        reader, writer = await self.view.swarm.open_stream(hop.peer_id, msg.INFERENCE_HANDLER,
                                                            self.view.policy.request_timeout)
        hop_session = HopSession(hop, uuid.uuid4().hex, reader, writer)
        hop_session.reading = asyncio.create_task(self._read_forever(hop_session))
        request = msg.OpenSession(hop_session.session_id, hop.start, hop.end, self.max_length, self.batch_size or 1)
        try:
            await self._send(hop_session, request, None)
            deadline = asyncio.get_running_loop().time() + self.view.policy.request_timeout
            _, frame = await self._receive(hop_session, deadline, [hop_session])
            if not isinstance(replies.parse_reply(frame, hop.peer_id), replies.Opened):
                raise NodeUnavailable(f"{hop_session.describe()} did not confirm the session", hop.peer_id)
        except BaseException:
            hop_session.close()
            raise
        self.view.costs.local_sessions[hop.peer_id] = self.view.costs.local_sessions.get(hop.peer_id, 0) + 1
        return hop_session

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._hops:
            self.view.swarm.call(self._close(), timeout=self.view.policy.request_timeout)

    async def _close(self) -> None:
        for hop_session in self._hops:
            hop_session.close()  # the node closes the stream's sessions when it ends
            sessions = self.view.costs.local_sessions
            sessions[hop_session.hop.peer_id] = max(0, sessions.get(hop_session.hop.peer_id, 1) - 1)
        self._hops.clear()


def _joined(history: list[StepInputs]) -> StepInputs:
    """A history of steps as one step over all its tokens."""
    return StepInputs(torch.cat([s.hidden for s in history], 1), torch.cat([s.positions for s in history], 1),
                      history[-1].mask)


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
