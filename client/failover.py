"""Failover of one inference session: a failed hop is replaced and its cache rebuilt elsewhere.

The client bans the failed node (unless only its relayed connection was cut:
``SwarmView.relay_cut``), routes a fresh chain for exactly that hop's blocks (in the session's
dtype), and replays the inputs the failed node had received, in chunks each new node accepts, so
its cache is what the failed one held. When no other node serves those blocks, the session waits
up to ``FailoverPolicy.route_wait`` for one (a self-placing node moves to blocks left bare, or the
failed node answers again), trying the route again every ``ROUTE_POLL_S``. A hop fed by hand-off
has no inputs on the client: they are rebuilt by a cache-less forward of the first hop's inputs
through the blocks before it. ``probe`` finds which hops of a chain hang after a hand-off step
timed out.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import torch

from potluck.protocol.errors import NodeDraining, NoRoute, PotluckError

from .hops import HopSession, HopStreams, StepInputs, joined
from .transport import how_to_dial

if TYPE_CHECKING:
    from .session import InferenceSession

logger = logging.getLogger(__name__)
ROUTE_POLL_S = 2.0  # how often a session waiting for a node of its blocks reads the swarm again


async def replace_hop(session: InferenceSession, index: int, error: PotluckError) -> None:
    """Swap hop ``index`` for a fresh chain over its blocks, rebuilt from that hop's history."""
    failed = session.hop_sessions[index]
    if isinstance(error, NodeDraining):  # it leaves these blocks (it moved, or it stops), not failed: not banned,
        if session.view.first_time(("leaving", failed.hop.peer_id), session.view.policy.ban_time):
            logger.info("node %s: %s", failed.hop.peer_id, error)
        await _refreshed(session.view)  # and its record now says where it went (or that it is draining)
    elif not await session.view.relay_cut(failed.hop):
        session.view.ban(failed.hop.peer_id, str(error))
    session.streams.close(failed)
    history = failed.history if failed.history_known else await rebuild_history(session, failed)

    async def rebuilt_replacement() -> list[HopSession]:
        try:
            before = session.hop_sessions[index - 1].hop.peer_id if index > 0 else None
            replacement = await session.open_chain(failed.hop.start, failed.hop.end, before)
        except NoRoute as no_route:
            said = str(error) if failed.hop.peer_id in str(error) else f"node {failed.hop.peer_id} failed: {error}"
            raise NoRoute(f"{no_route}, after {said}",
                          failed.hop.peer_id) from error
        try:
            await replay(session.streams, replacement, history)
        except PotluckError as replay_error:
            for hop_session in replacement:
                session.streams.close(hop_session)
            replay_error.peer_id = replay_error.peer_id or replacement[0].hop.peer_id
            raise
        return replacement

    replacement = await _waiting_for_route(session, failed, rebuilt_replacement)
    session.hop_sessions[index:index + 1] = replacement
    after = index + len(replacement)
    if after < len(session.hop_sessions):  # the next node takes pushes from the replacement now
        following = session.hop_sessions[after]
        try:
            await session.streams.follow(following, replacement[-1].hop.peer_id)
        except PotluckError as follow_error:  # that node fails too: the next step replaces it in turn
            following.failed = following.failed or follow_error
    session.failovers += 1
    logger.info("replaced node %s (blocks %d:%d) with %s", failed.hop.peer_id, failed.hop.start, failed.hop.end,
                ", ".join(f"{h.hop.peer_id} {h.hop.start}:{h.hop.end}" for h in replacement))


async def _waiting_for_route(session: InferenceSession, failed: HopSession, attempt) -> list[HopSession]:
    """``attempt()`` (retrying), again every ``ROUTE_POLL_S`` while no node serves the failed hop's
    blocks, for up to the policy's ``route_wait``."""
    view = session.view
    loop, wait = asyncio.get_running_loop(), view.policy.route_wait
    deadline = loop.time() + wait
    blocks = f"blocks {failed.hop.start}:{failed.hop.end}"
    while True:
        try:
            return await view.retrying(attempt)
        except NoRoute as no_route:
            left = deadline - loop.time()
            if left <= 0:
                if not wait:
                    raise
                raise NoRoute(f"{no_route}; no node took {blocks} within {wait:g} s (--route-wait)",
                              no_route.peer_id) from None
            if view.first_time(("waiting for", blocks), wait):  # once, not for each session that lost them
                logger.warning("%s; waiting up to %g s for a node to take %s (--route-wait, or "
                               "FailoverPolicy.route_wait)", no_route, wait, blocks)
            await asyncio.sleep(min(ROUTE_POLL_S, left))
            await _back_if_answering(view, failed)


async def _back_if_answering(view, failed: HopSession) -> None:
    """Lift the failed node's ban if it answers again (it was hung, or restarted), so the route
    may take it before the ban would end; not a longer ban than a failure's (a wrong result)."""
    until = view.banned.get(failed.hop.peer_id)
    if until is None or until - time.monotonic() > view.policy.ban_time:
        return
    try:
        await view.swarm.info(failed.hop.peer_id, timeout=view.policy.probe_timeout,
                              dial=how_to_dial(failed.hop.record, patient=False))
    except PotluckError:
        return
    view.unban(failed.hop.peer_id)


async def _refreshed(view) -> None:
    try:
        await view.refresh()
    except (asyncio.TimeoutError, PotluckError, OSError) as e:  # routing reads the swarm again if it must
        logger.debug("could not read the swarm again: %s", e)


async def rebuild_history(session: InferenceSession, failed: HopSession) -> list[StepInputs]:
    """What a hop fed by hand-off had received: the first hop's inputs, run without a cache
    through the blocks before it."""
    first = session.hop_sessions[0]
    if not first.history:
        return []
    full = joined(first.history)
    hidden = await session.view.forward_async(full.hidden, full.positions, full.mask, first.hop.start,
                                              failed.hop.start, session.view.chain_dtype(session.hops))
    return [StepInputs(hidden, full.positions, full.mask)]


async def replay(streams: HopStreams, hops: list[HopSession], history: list[StepInputs]) -> StepInputs | None:
    """Rebuild the caches of new hops from the inputs the failed hop had received, in chunks
    each node accepts (its announced ``max_batch_tokens``); the last hop's outputs for them."""
    if not history:
        return None
    full = joined(history)
    batch, length = full.hidden.shape[:2]
    for hop_session in hops:
        accepted = hop_session.hop.record.max_batch_tokens  # 0: the node announced no limit
        limit = max(1, accepted // batch) if accepted else length
        outputs = []
        for offset in range(0, length, limit):
            chunk = StepInputs(full.hidden[:, offset:offset + limit], full.positions[:, offset:offset + limit],
                               None if full.mask is None else full.mask[:, :offset + limit])
            outputs.append(await streams.step(hop_session, chunk, offset))
        hop_session.rebuilt_from(full)
        full = StepInputs(torch.cat(outputs, 1), full.positions, full.mask)
    return full


async def probe(session: InferenceSession) -> None:
    """Ask every hop for its info at once; mark those that do not answer as failed, so a redo
    replaces them at once instead of waiting out another timeout on each."""
    view = session.view

    async def probe_one(hop_session: HopSession) -> None:
        try:
            await view.swarm.info(hop_session.hop.peer_id, timeout=view.policy.probe_timeout,
                                  dial=how_to_dial(hop_session.hop.record, patient=False))
        except PotluckError as error:
            hop_session.failed = error

    await asyncio.gather(*(probe_one(h) for h in session.hop_sessions))
