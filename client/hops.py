"""The streams of one inference session to the nodes of its chain, and what each hop was sent.

An open hop is a ``HopSession``: a session on one node, reached over this client's long-lived
stream to that node (``channels``: a new stream per message costs far more than a round trip on
an open one, and sessions sharing a stream share its bundles), and the inputs the node's cache
was built from. ``HopStreams`` opens a chain's hops at once, sends requests numbered by attempt
(``seq``) and receives answers: every hop of a session delivers into one inbox, so one coroutine
can wait on any hop of a chain; an answer to an attempt given up on is dropped, and a stream
that breaks marks its hop failed.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import torch

from potluck.protocol import messages as msg
from potluck.protocol import replies
from potluck.protocol.errors import NodeUnavailable, PotluckError

from .channels import NodeChannel
from .routing import Hop
from .swarm_view import SwarmView, expect_hidden
from .transport import how_to_dial


@dataclass
class StepInputs:
    hidden: torch.Tensor  # [B, T, H] new tokens' hidden states entering a hop
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, step start + T] or None (no padding)

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


@dataclass
class HopSession:
    """One hop of the chain: a stream to a node, and the inputs it has received so far."""

    hop: Hop
    session_id: str
    channel: NodeChannel
    history: list[StepInputs] = field(default_factory=list)  # what the node's cache was built from
    history_tokens: int = 0  # tokens in ``history``
    history_known: bool = True  # False once a hand-off step fed this hop without the client seeing it
    failed: PotluckError | None = None  # the stream broke while the client waited on another hop

    def remember(self, inputs: StepInputs, step_start: int) -> None:
        if step_start < self.history_tokens:  # a rewind: drop the tail
            self.history = cut(self.history, step_start)
        self.history.append(inputs)
        self.history_tokens = step_start + inputs.hidden.shape[1]

    def rebuilt_from(self, inputs: StepInputs) -> None:
        self.history, self.history_tokens, self.history_known = [inputs], inputs.hidden.shape[1], True

    def describe(self) -> str:
        name = self.hop.record.public_name or "unnamed"
        return f"node {self.hop.peer_id} ({name}, blocks {self.hop.start}:{self.hop.end})"

    def close(self) -> None:
        """Stop listening and ask the node to free the session (the stream stays, for other sessions)."""
        if self.channel.listeners.pop(self.session_id, None) is not None and self.channel.usable:
            self.channel.send(msg.CloseSession(self.session_id).to_meta())


class HopStreams:
    """Opens hops on nodes and carries one session's requests and answers over their streams."""

    def __init__(self, view: SwarmView):
        self.view = view
        self.inbox: asyncio.Queue = asyncio.Queue()  # (hop session, frame or error) from every stream
        self.seq = 0  # numbers each attempt; answers to earlier attempts are dropped

    async def open(self, chain: list[Hop], max_length: int, batch_size: int,
                   previous: str | None = None) -> list[HopSession]:
        """A session on each hop's node, reserving ``max_length x batch_size`` cache tokens there and
        taking hand-off pushes only from the node before it (the first: from ``previous``). All
        hops are asked at once: over slow links a chain opens in one round trip, not one per hop."""
        timeout, before = self.view.policy.request_timeout, [previous] + [hop.peer_id for hop in chain[:-1]]
        channels = await asyncio.gather(*(self.view.swarm.channels.get(hop.peer_id, timeout, how_to_dial(hop.record))
                                          for hop in chain))
        opened = [self.listen(HopSession(hop, uuid.uuid4().hex, channel)) for hop, channel in zip(chain, channels)]
        try:
            for hop_session, peer in zip(opened, before):
                hop = hop_session.hop
                await self.send(hop_session, msg.OpenSession(hop_session.session_id, hop.start, hop.end, max_length,
                                                             batch_size, peer), None)
            await self._confirmed(opened, replies.Opened, "open")
        except BaseException:
            for hop_session in opened:
                hop_session.close()
            raise
        sessions = self.view.costs.local_sessions  # routing counts this client's load on each node
        for hop in chain:
            sessions[hop.peer_id] = sessions.get(hop.peer_id, 0) + 1
        return opened

    async def follow(self, hop_session: HopSession, previous: str | None) -> None:
        """Tell a hop's node that pushes for its session now come from ``previous``."""
        await self.send(hop_session, msg.Follow(hop_session.session_id, previous), None)
        await self._confirmed([hop_session], replies.Followed, "follow")

    async def _confirmed(self, hop_sessions: list[HopSession], expected: type, what: str) -> None:
        """Wait for each hop's ``expected`` answer; a hop's error, another answer or silence past the
        request timeout raises (naming that hop)."""
        deadline = asyncio.get_running_loop().time() + self.view.policy.request_timeout
        waiting = list(hop_sessions)
        while waiting:
            try:
                source, frame = await self.receive(None, deadline, waiting)
            except NodeUnavailable as error:
                if error.peer_id is None:  # silence: blame a hop that did not answer
                    error = NodeUnavailable(f"{waiting[0].describe()} did not confirm {what} in time",
                                            waiting[0].hop.peer_id)
                raise error from None
            if not isinstance(replies.parse_reply(frame, source.hop.peer_id), expected):
                raise NodeUnavailable(f"{source.describe()} did not confirm {what}", source.hop.peer_id)
            waiting.remove(source)

    def close(self, hop_session: HopSession) -> None:
        """Close a hop's session on its node."""
        hop_session.close()
        sessions = self.view.costs.local_sessions
        sessions[hop_session.hop.peer_id] = max(0, sessions.get(hop_session.hop.peer_id, 1) - 1)

    async def step(self, hop_session: HopSession, inputs: StepInputs, start_from: int | None) -> torch.Tensor:
        """One step on one hop, answered by that hop: its output hidden states."""
        await self.send(hop_session, msg.Step(hop_session.session_id, start_from), inputs)
        deadline = asyncio.get_running_loop().time() + self.view.timeout_for([hop_session.hop], inputs.tokens)
        _, frame = await self.receive(hop_session, deadline, [hop_session])
        return expect_hidden(frame, hop_session.hop, inputs.hidden.shape)

    async def send(self, hop_session: HopSession, request: msg.OpenSession | msg.Follow | msg.Step,
                   inputs: StepInputs | None) -> None:
        if hop_session.failed is not None:
            raise hop_session.failed
        self.seq += 1  # answers echo it; an answer to an earlier attempt is dropped
        meta = request.to_meta()
        if isinstance(request, msg.Step):
            meta["seq"] = self.seq
        tensors = () if inputs is None else [inputs.hidden, inputs.positions] + (
            [] if inputs.mask is None else [inputs.mask])
        hop_session.channel.send(meta, tensors)  # leaves with the other sessions' steps of this turn

    async def receive(self, expected: HopSession | None, deadline: float,
                      waiting_on: list[HopSession]) -> tuple[HopSession, msg.Frame]:
        """The next frame from ``expected`` (None: from any hop in ``waiting_on``) answering the
        latest attempt. An error from a hop we wait on is raised; frames from other hops are
        dropped, their failures noted on the hop; running past ``deadline`` is NodeUnavailable."""
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # no extra task per wait, unlike wait_for
                    source, item = await self.inbox.get()
            except TimeoutError:
                who = expected.describe() if expected is not None else "the chain"
                raise NodeUnavailable(f"{who} did not answer in time",
                                      expected.hop.peer_id if expected is not None else None) from None
            if source not in waiting_on:
                if isinstance(item, PotluckError):
                    source.failed = source.failed or item
                continue
            if isinstance(item, PotluckError):
                raise item
            if item.meta.get("seq", self.seq) != self.seq:
                continue  # the answer to an attempt we gave up on
            if expected is None or source is expected:
                return source, msg.raise_if_error(item, source.hop.peer_id)

    def listen(self, hop_session: HopSession) -> HopSession:
        """Have the hop's channel deliver the hop's answers into this inbox."""
        hop_session.channel.listeners[hop_session.session_id] = lambda item: self._deliver(hop_session, item)
        return hop_session

    def _deliver(self, hop_session: HopSession, item: msg.Frame | PotluckError) -> None:
        """An answer for ``hop_session`` from its channel, or the channel's failure."""
        if isinstance(item, PotluckError):
            detail = str(item).removeprefix(f"node {hop_session.hop.peer_id} failed: ")  # said once, not twice
            hop_session.failed = hop_session.failed or NodeUnavailable(
                f"{hop_session.describe()} failed: {detail}", hop_session.hop.peer_id)
            self.inbox.put_nowait((hop_session, hop_session.failed))
            return
        if "seq" not in item.meta:  # an unasked error: the node gave up on the session
            hop_session.failed = hop_session.failed or msg.error_of(item, hop_session.hop.peer_id)
        self.inbox.put_nowait((hop_session, item))


async def forward_hop(view: SwarmView, hop: Hop, hidden: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """A cache-less forward through one hop, in messages the node takes (its announced
    ``max_batch_tokens``): rows apart while one row fits in a message; a longer row through a
    session on the node, fed a part at a time (a forward's result, computed on a cache that the
    node frees after)."""
    batch, length = hidden.shape[:2]
    limit = hop.record.max_batch_tokens or batch * length  # 0: the node announced no limit
    if batch * length <= limit:
        return await view.forward_request(hop, hidden, positions, mask)
    if length <= limit:
        rows = limit // length
        return torch.cat([await view.forward_request(hop, hidden[r:r + rows], positions[r:r + rows],
                                                     None if mask is None else mask[r:r + rows])
                          for r in range(0, batch, rows)])
    streams = HopStreams(view)
    hop_session = (await streams.open([hop], length, batch))[0]
    try:
        part, outputs = max(1, limit // batch), []
        for begin in range(0, length, part):
            inputs = StepInputs(hidden[:, begin:begin + part], positions[:, begin:begin + part],
                                None if mask is None else mask[:, :begin + part])
            outputs.append(await streams.step(hop_session, inputs, None))
        return torch.cat(outputs, 1)
    finally:
        streams.close(hop_session)


def joined(history: list[StepInputs]) -> StepInputs:
    """A history of steps as one step over all its tokens."""
    return StepInputs(torch.cat([s.hidden for s in history], 1), torch.cat([s.positions for s in history], 1),
                      history[-1].mask)


def cut(history: list[StepInputs], length: int) -> list[StepInputs]:
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
