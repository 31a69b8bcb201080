"""Catching nodes that compute wrong: a step's results checked against other replicas of each span.

On a share of steps (``SwarmView.verify``), and on every step whose output looks suspicious, a
session runs the step hop by hop, so it holds each hop's output, and then checks the hops in chain
order. For each hop it sends the hop's inputs for the whole sequence so far (checked up to there)
to another replica of the hop's blocks, as a cache-less forward, and compares that replica's
output for the step's tokens with the hop's, within the tolerance of the chain's dtype. When they
differ a third replica decides: a node the other two outvote is banned. If that is the session's
own node, its cache and those after it were built from wrong states: the chain from that hop on
is rebuilt from the checked inputs, so this step's result, and the tokens after it, are exact.
Without a third replica the client cannot tell who is wrong; it says so in its log and keeps the
chain's result. Blocks served by one node only cannot be checked; the check goes on after them.
A check whose replicas keep failing is given up (the step keeps the chain's result): checking
never fails a step that the chain itself computed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from potluck.protocol.errors import NoRoute, PotluckError

from .failover import replay
from .hops import HopSession, StepInputs, joined
from .routing import Hop

if TYPE_CHECKING:
    from .session import InferenceSession
    from .swarm_view import SwarmView

logger = logging.getLogger(__name__)

# largest relative difference (per token, L2) between two replicas' outputs still counted as the same
# result. Measured on SmolLM2-135M, its 30 blocks run with a cache and without: 1.6e-6 in float32,
# 2.1e-2 in bfloat16; float32 leaves room for GPUs that round matmuls through TF32 (about 1e-3)
TOLERANCE = {"float32": 5e-3, "bfloat16": 0.1, "float16": 0.1}
# an output is checked when its tokens' median RMS is this many times off the session's usual, or one token's
# is OUTLIER_SCALE times above it (SmolLM2's first token, an attention sink, sits about 9 times above the median)
SUSPICIOUS_SCALE = 8.0
OUTLIER_SCALE = 64.0


def difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest relative L2 difference of one token's hidden state between ``a`` and ``b``."""
    a, b = a.float(), b.float()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).max())


@dataclass(frozen=True)
class Scale:
    """The RMS of an output's tokens: the median token's and the largest."""

    median: float
    largest: float


def token_scale(hidden: torch.Tensor) -> Scale:
    """The scale of hidden states [B, T, H] (a decoding step's one token: a single operation)."""
    root = math.sqrt(hidden.shape[-1])
    if hidden.numel() == hidden.shape[-1]:
        value = float(torch.linalg.vector_norm(hidden, dtype=torch.float32)) / root
        return Scale(value, value)
    rms = torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32).flatten() / root
    return Scale(float(rms.median()), float(rms.max()))


def suspicious(scale: Scale, usual: float | None) -> bool:
    """Whether an output's scale (``token_scale``) is far from what this session's outputs usually have."""
    if usual is None:
        return False
    return not usual / SUSPICIOUS_SCALE <= scale.median <= usual * SUSPICIOUS_SCALE or \
        scale.largest > usual * OUTLIER_SCALE


class _CheckFailed(Exception):
    """The replicas asked for an opinion could not give one (they failed, or none is left)."""


async def check_step(session: InferenceSession, outputs: list[torch.Tensor]) -> torch.Tensor:
    """Check a step run hop by hop (``outputs``: each hop's output for the step's tokens) and
    return the step's result: the chain's, or, after a node of the chain was caught, the rebuilt
    chain's. A check that cannot be made (the replicas asked fail) leaves the chain's result."""
    view = session.view
    view.verify_counts["steps_verified"] += 1
    try:
        return await _check_hops(session, outputs)
    except _CheckFailed as e:
        view.verify_counts["checks_failed"] += 1
        logger.info("could not check a step against other replicas (%s); keeping the chain's result", e)
        return outputs[-1]


async def _check_hops(session: InferenceSession, outputs: list[torch.Tensor]) -> torch.Tensor:
    view = session.view
    full = joined(session.hop_sessions[0].history)  # the first hop's inputs: every token so far
    tokens = outputs[-1].shape[1]
    checked = full.hidden  # inputs of the hop being checked, for every token, known to be right
    for index, hop_session in enumerate(list(session.hop_sessions)):
        hop, mine = hop_session.hop, outputs[index]
        theirs, others = await _opinion(view, full, checked, hop, frozenset({hop.peer_id}))
        if theirs is None:  # no other node serves these blocks: take this one's word and go on
            view.verify_counts["hops_unverifiable"] += 1
            checked, _ = await _opinion(view, full, checked, hop, frozenset())
            if checked is None:
                raise _CheckFailed(f"no node serves blocks {hop.start}:{hop.end} for a check")
            continue
        view.verify_counts["hops_checked"] += 1
        tolerance = _tolerance([hop, *others])
        error = difference(mine, theirs[:, -tokens:])
        if error <= tolerance:
            checked = theirs
            continue
        view.verify_counts["mismatches"] += 1
        third, more = await _opinion(view, full, checked, hop, frozenset({hop.peer_id, *(h.peer_id for h in others)}))
        tolerance = _tolerance([hop, *others, *more])
        if third is not None and difference(third[:, -tokens:], theirs[:, -tokens:]) <= tolerance:
            _ban(view, [hop], error, tolerance, "two other replicas agree with each other")
            return await _rebuild_from(session, index, StepInputs(checked, full.positions, full.mask), tokens)
        if third is not None and difference(third[:, -tokens:], mine) <= tolerance:
            _ban(view, _single(others), difference(theirs[:, -tokens:], mine), tolerance,
                 "the session's node and another replica agree with each other")
            checked = third
            continue
        view.verify_counts["unresolved"] += 1
        logger.warning("%s and %s disagree on blocks %d:%d (difference %.1e, tolerance %.0e) and no third replica "
                       "%s; keeping the chain's result", hop_session.describe(), _names(others), hop.start, hop.end,
                       error, tolerance, "agrees with either" if third is not None else "serves them")
        return outputs[-1]
    return outputs[-1]


def _tolerance(hops: list[Hop]) -> float:
    """The largest tolerance of the dtypes these hops compute in (chains mixing dtypes compare loosest)."""
    return max(TOLERANCE.get(h.record.dtype, TOLERANCE["bfloat16"]) for h in hops)


async def _opinion(view: SwarmView, full: StepInputs, hidden: torch.Tensor, hop: Hop,
                   avoid: frozenset[str]) -> tuple[torch.Tensor | None, list[Hop]]:
    """Blocks hop.start:hop.end run on ``hidden`` (every token so far) by nodes not in ``avoid``, in
    the hop's dtype and with its weights stored as the hop's (an 8-bit node agrees only with 8-bit
    ones): their output and the hops that computed it; (None, []) when no such node is there;
    _CheckFailed when they fail."""
    used: list[Hop] = []
    try:
        out = await view.forward_async(hidden, full.positions, full.mask, hop.start, hop.end, hop.record.dtype,
                                       avoid, used, hop.record.quant)
    except NoRoute:
        return None, []
    except PotluckError as e:
        raise _CheckFailed(str(e)) from None
    return out, used


def _single(hops: list[Hop]) -> list[Hop]:
    """The node to blame for a wrong forward: only one that computed all of it alone."""
    return hops if len(hops) == 1 else []


def _names(hops: list[Hop]) -> str:
    return ", ".join(f"node {h.peer_id} ({h.record.public_name or 'unnamed'})" for h in hops) or "nobody"


def _ban(view: SwarmView, hops: list[Hop], error: float, tolerance: float, why: str) -> None:
    for hop in hops:
        view.verify_counts["nodes_banned"] += 1
        name = hop.record.public_name or "unnamed"
        view.ban(hop.peer_id, f"it ({name}) computed blocks {hop.start}:{hop.end} wrong (difference {error:.1e}, "
                              f"tolerance {tolerance:.0e}; {why})", view.policy.wrong_result_ban)


async def _rebuild_from(session: InferenceSession, index: int, inputs: StepInputs, tokens: int) -> torch.Tensor:
    """Replace hops ``index`` on with a fresh chain whose caches are built from ``inputs`` (every
    token so far, checked); the new chain's output for the step's last ``tokens`` tokens."""
    view, streams = session.view, session.streams
    start = session.hop_sessions[index].hop.start
    for hop_session in session.hop_sessions[index:]:
        streams.close(hop_session)
    previous = session.hop_sessions[index - 1].hop.peer_id if index > 0 else None

    async def rebuilt() -> tuple[list[HopSession], StepInputs]:
        chain = await session.open_chain(start, view.num_blocks, previous)
        try:
            return chain, await replay(streams, chain, [inputs])
        except PotluckError as error:
            for hop_session in chain:
                streams.close(hop_session)
            error.peer_id = error.peer_id or chain[0].hop.peer_id
            raise

    try:
        chain, out = await view.retrying(rebuilt)
    except PotluckError as error:  # the next step replaces the closed hops as failed ones
        for hop_session in session.hop_sessions[index:]:
            hop_session.failed = hop_session.failed or error
        raise
    session.hop_sessions[index:] = chain
    session.failovers += 1
    logger.info("rebuilt blocks %d:%d on %s", start, view.num_blocks,
                ", ".join(f"{h.hop.peer_id} {h.hop.start}:{h.hop.end}" for h in chain))
    return out.hidden[:, -tokens:]
