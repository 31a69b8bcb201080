"""Inference sessions through a chain of nodes, with failover that replays lost caches.

An ``InferenceSession`` keeps one long-lived stream per hop (``hops.HopStreams``). A step sends
only the new tokens' hidden states; the history stays in the nodes' caches. The client also
keeps, per hop, the inputs it sent; when a node fails (stream error, timeout, typed refusal),
``failover.replace_hop`` bans it, routes a replacement for that hop's blocks, replays those
inputs there, and the step goes on, so the user gets the same tokens as without the fault. All
hops of a step run in one coroutine.

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
import logging

import torch

from potluck.protocol import messages as msg
from potluck.protocol import replies
from potluck.protocol.errors import PeerLimitReached, PotluckError

from . import failover, verification
from .hops import HopSession, HopStreams, StepInputs
from .routing import Hop
from .swarm_view import SwarmView, check_hidden, expect_hidden, wire_dtype

logger = logging.getLogger(__name__)


class InferenceSession:
    """A conversation with the swarm: each step appends tokens to the nodes' attention caches.

    Use as a context manager; the nodes free the session's cache when it closes."""

    def __init__(self, view: SwarmView, max_length: int):
        self.view, self.max_length = view, max_length
        self.position = 0  # tokens the nodes hold
        self.token_ids: torch.Tensor | None = None  # [B, >= position] ids so far; the first `position` are cached
        self.attention_mask: torch.Tensor | None = None  # over ``token_ids`` where they hold padding, else None
        self.batch_size: int | None = None
        self.hop_sessions: list[HopSession] = []  # the chain, in order
        self.streams = HopStreams(view)  # the hops' streams, requests and answers
        self._rewound = False  # the next step tells the nodes to drop tokens past `position`
        self._direct_links: set[tuple[str, str]] = set()  # (peer, next peer) that could not hand off
        self.failovers = 0  # hops replaced so far
        self.handoff_fallbacks = 0  # hand-off steps redone hop by hop
        self.usual_scale: float | None = None  # typical RMS of a token's output, to spot suspicious ones
        self.closed = False

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def hops(self) -> list[Hop]:
        return [h.hop for h in self.hop_sessions]

    def rewind(self, position: int) -> None:
        """Forget everything after the first ``position`` tokens (the nodes drop it on the next step)."""
        if not 0 <= position <= self.position:
            raise PotluckError(f"cannot rewind a session of {self.position} tokens to {position}")
        self.position, self._rewound = position, True
        if self.token_ids is not None:
            self.token_ids = self.token_ids[:, :position]
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[:, :position]

    def step(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, H] of the new tokens → output hidden [B, T, H] of the last block."""
        check_hidden(hidden, positions)  # a caller's input; serve's loop builds its own (``step_async``)
        return self.view.swarm.call(self.step_async(hidden, positions, mask))

    async def step_async(self, hidden: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
        """``step`` on the swarm's loop: many sessions' steps can be awaited together. A step longer
        than some hop takes in one message (its announced ``max_batch_tokens``) goes in parts."""
        if self.closed:
            raise PotluckError("this inference session is closed")
        if self.batch_size is None:
            self.batch_size = hidden.shape[0]
        start_from = self.position if self._rewound else None
        step_start, length, done, outputs = self.position, hidden.shape[1], 0, []
        try:
            if not self.hop_sessions:
                self.hop_sessions = await self.open_chain(0, self.view.num_blocks)
            wire = wire_dtype(self.hops[0], hidden.dtype)
            while done < length or not outputs:  # an empty step is sent as it is
                end = min(length, done + self._tokens_per_message())
                inputs = StepInputs(_as(hidden[:, done:end], wire), positions[:, done:end],
                                    None if mask is None else mask[:, :step_start + end])
                outputs.append(await self._step(inputs, start_from))
                self.position, done, start_from = step_start + end, end, None
        except BaseException:
            self.position, self._rewound = step_start, True  # some hops may hold this step's tokens: the
            raise  # next step re-sends from its start
        self._rewound = False
        return _as(outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1), hidden.dtype)

    def _tokens_per_message(self) -> int:
        """New tokens per row that every hop of the chain accepts in one message (at least 1)."""
        limits = [h.hop.record.max_batch_tokens for h in self.hop_sessions if h.hop.record.max_batch_tokens]
        return max(1, min(limits) // self.batch_size) if limits else 2**62

    async def _step(self, inputs: StepInputs, start_from: int | None) -> torch.Tensor:
        step_start = self.position  # where this step begins; ``start_from`` is None or the same number
        verify = self.view.verify > 0 and self.view.rng.random() < self.view.verify
        if self._can_hand_off() and not verify:
            try:
                out = await self._handoff_step(inputs, start_from, step_start)
                scale = self._scale(out, step_start)
                if scale is None or not verification.suspicious(scale, self.usual_scale):
                    return self._noted(scale, out)
                logger.info("a step's output looks suspicious (scale far from the session's usual); checking it")
                verify = True  # redo it hop by hop (nodes rewind to the step's start) and check each hop
            except PotluckError as error:
                if not error.retriable:
                    raise
                self.handoff_fallbacks += 1
                logger.info("hand-off step failed (%s); redoing it hop by hop", error)
                if error.peer_id is None:  # a timeout somewhere along the chain: find who hangs
                    await failover.probe(self)
            start_from = step_start  # nodes that already took this step rewind and take it again
        outputs: list[torch.Tensor] = []
        out = await self._hop_by_hop(inputs, start_from, step_start, 0, outputs)
        if verify:
            out = await verification.check_step(self, outputs)
        return self._noted(self._scale(out, step_start), out)

    @staticmethod
    def _scale(out: torch.Tensor, step_start: int) -> verification.Scale | None:
        """The scale of a step's output tokens, the session's first left out: an attention sink, far
        above the others (SmolLM2's: 226 against 22 to 70), it made the next step of a one-token
        prompt look suspicious on an honest swarm. None where no other token is in the step."""
        if step_start == 0:
            out = out[:, 1:]
        return verification.token_scale(out) if out.shape[1] else None

    def _noted(self, scale: verification.Scale | None, out: torch.Tensor) -> torch.Tensor:
        """``out``, its tokens' ``scale`` noted as the session's usual (a running mean of steps' medians)."""
        if scale is None:
            return out
        median = scale.median
        self.usual_scale = median if self.usual_scale is None else 0.9 * self.usual_scale + 0.1 * median
        return out

    def _can_hand_off(self) -> bool:
        pairs = zip(self.hop_sessions, self.hop_sessions[1:])
        return self.view.handoff and len(self.hop_sessions) > 1 and not any(
            (a.hop.peer_id, b.hop.peer_id) in self._direct_links for a, b in pairs)

    async def _handoff_step(self, inputs: StepInputs, start_from: int | None, step_start: int) -> torch.Tensor:
        first, last = self.hop_sessions[0], self.hop_sessions[-1]
        hops = list(self.hop_sessions)
        step = msg.Step(first.session_id, start_from, tuple(msg.NextHop(h.hop.peer_id, h.session_id) for h in hops[1:]))
        await self.streams.send(first, step, inputs)
        deadline = asyncio.get_running_loop().time() + self.view.timeout_for([h.hop for h in hops], inputs.tokens)
        while True:
            source, frame = await self.streams.receive(None, deadline, hops)
            reply = replies.parse_reply(frame, source.hop.peer_id)
            if source is last and isinstance(reply, replies.Result):
                out = expect_hidden(frame, last.hop, inputs.hidden.shape, reply)
                break
            if isinstance(reply, replies.HandoffFailed) and source is not last:  # carry on from the next hop
                index = hops.index(source)
                self._direct_links.add((source.hop.peer_id, hops[index + 1].hop.peer_id))
                hidden = expect_hidden(frame, source.hop, inputs.hidden.shape, reply)
                first.remember(inputs, step_start)
                for hop_session in hops[1:index + 1]:
                    hop_session.history_known = False
                rest = StepInputs(hidden, inputs.positions, inputs.mask)
                return await self._hop_by_hop(rest, start_from, step_start, index + 1)
        first.remember(inputs, step_start)
        for hop_session in hops[1:]:
            hop_session.history_known = False
        return out

    async def _hop_by_hop(self, inputs: StepInputs, start_from: int | None, step_start: int,
                          index: int, outputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The step from hop ``index`` on, one hop at a time; each hop's output goes into ``outputs``."""
        failures = 0
        while index < len(self.hop_sessions):
            hop_session = self.hop_sessions[index]
            try:
                hidden = await self.streams.step(hop_session, inputs, start_from)
            except PotluckError as error:
                failures += 1
                if not error.retriable or failures > self.view.policy.max_retries:
                    raise
                await failover.replace_hop(self, index, error)
                continue  # the same step, now on the replacement hops
            hop_session.remember(inputs, step_start)
            if outputs is not None:
                outputs.append(hidden)
            inputs = StepInputs(hidden, inputs.positions, inputs.mask)
            index += 1
        return inputs.hidden

    async def open_chain(self, start: int, end: int, previous: str | None = None) -> list[HopSession]:
        """Route blocks start:end and open a session on each hop, each taking hand-off pushes only
        from the hop before it (the first: from ``previous``); unreachable nodes are banned and
        routed around (NoRoute once nothing is left)."""
        async def opened_chain() -> list[HopSession]:
            chain = await self.view.route(start, end, self.max_length * (self.batch_size or 1),
                                           self.view.chain_dtype(self.hops))  # a replacement keeps the dtype
            return await self.streams.open(chain, self.max_length, self.batch_size or 1, previous)

        try:
            return await self.view.retrying(opened_chain)
        except PeerLimitReached as error:
            if "'cache_share_per_peer'" not in str(error):  # the node's name of the limit it applied
                raise
            raise PeerLimitReached(f"{error}; a session reserves its prompt and max_new_tokens (or its max_length): "
                                   f"ask for fewer tokens", error.peer_id) from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.hop_sessions:
            self.view.swarm.call(self._close(), timeout=self.view.policy.request_timeout)

    async def _close(self) -> None:
        for hop_session in self.hop_sessions:
            self.streams.close(hop_session)  # the node frees the session's cache
        self.hop_sessions.clear()


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``; itself, without a call into torch, when it already is (every step,
    twice, of every session)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
