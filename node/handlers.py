"""The node's RPC handlers: inference sessions, hand-off pushes, forward and info, over libp2p streams.

Each handler reads frames, validates them (``potluck.protocol.messages``), and answers every
request with either a result or a typed error; a bad request changes nothing and the stream
stays usable unless its framing is broken. Sessions opened on a stream close when it ends, so a
client that vanishes frees its cache. A step that names next hops is pushed on to the next node
instead of answered; a pushed step's result (or error) goes to the stream its session was opened
on, so the client hears from the last node, or from whichever node failed.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import torch
from hivemind.p2p import P2P

from potluck.protocol import messages as msg
from potluck.protocol import replies
from potluck.protocol.bundles import FrameBatcher, unbundle
from potluck.protocol.errors import (
    BadRequest, BlocksNotServed, MessageTooLarge, NodeDraining, NodeOutOfMemory, NodeUnavailable, PeerLimitReached,
    PotluckError,
)
from .span import BlockSpan

from . import hardware
from .compute import ComputeLane
from .limits import Limits, PeerLimits, step_frame_bytes
from .links import PushLinks
from .sessions import Session, SessionTable

logger = logging.getLogger(__name__)
Reply = tuple[dict[str, Any], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class ServingLimits:
    max_batch_tokens: int = 8192  # batch x new tokens in one step or forward
    peers: Limits = field(default_factory=Limits)  # what one peer may take of the node


class BlockServicer:
    """Serves a span of blocks; owns the sessions opened on it. ``span`` may change (a node that
    moves): each session keeps computing on the span it was opened on; None while a node moves
    without room for both spans."""

    def __init__(self, span: BlockSpan, compute: ComputeLane, sessions: SessionTable, limits: ServingLimits,
                 describe: Callable[[], dict[str, Any]], links: PushLinks, corrupt_outputs: float = 0.0):
        """``describe()``: the node's own fields of an info reply (peer id, model, span, state...).
        ``corrupt_outputs``: tests of clients' verification only, noise of this scale on every result."""
        self.span: BlockSpan | None = span
        self.compute, self.sessions, self.limits = compute, sessions, limits
        self.describe, self.links = describe, links
        self.corrupt_outputs = corrupt_outputs
        self.hidden_size = span.config.hidden_size
        self.draining = False
        self.counters: Counter[str] = Counter()  # what was served, reported by info
        self.peers = PeerLimits(limits.peers, sessions.cache_tokens)
        self.frame_bytes = step_frame_bytes(self.hidden_size, limits.max_batch_tokens, sessions.cache_tokens)
        self._client_streams: dict[str, FrameBatcher] = {}  # session id -> stream it was opened on
        self._tasks: set[asyncio.Task] = set()  # hand-offs waiting on a next node that is behind (or not linked yet)

    async def register(self, p2p: P2P) -> None:
        await p2p.add_binary_stream_handler(msg.INFERENCE_HANDLER, self._inference_stream)
        await p2p.add_binary_stream_handler(msg.PUSH_HANDLER, self._push_stream)
        await p2p.add_binary_stream_handler(msg.FORWARD_HANDLER, self._single_request_stream)
        await p2p.add_binary_stream_handler(msg.INFO_HANDLER, self._single_request_stream)

    async def _inference_stream(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # one client's sessions on this node share its stream; each request is served in its own task, so
        # a long prompt does not hold up the steps sent after it, and answers leave in bundles
        opened: dict[str, Session] = {}  # sessions owned by this stream; they close when it ends
        out, peer = FrameBatcher(writer), _peer_of(info)
        self.counters["streams"] += 1
        try:
            await self._serve_stream(reader, out, peer, lambda frame: self._inference_request(frame, opened, out, peer),
                                     counter="client_messages", concurrent=True, sessions_open=lambda: bool(opened))
        finally:
            for session_id in opened:
                self.sessions.close(session_id)
                self._client_streams.pop(session_id, None)

    async def _push_stream(self, info, reader, writer) -> None:
        # one stream carries the pushes of every session the previous node hands on: none waits for
        # another, so they meet in the compute lane's batches instead of queueing behind each other
        peer = _peer_of(info)
        await self._serve_stream(reader, FrameBatcher(writer), peer, lambda frame: self._push_request(frame, peer),
                                 counter="pushes_received", concurrent=True, sessions_open=lambda: True)

    async def _single_request_stream(self, info, reader, writer) -> None:
        await self._serve_stream(reader, FrameBatcher(writer), _peer_of(info), self._single_request,
                                 counter="messages", once=True)

    async def _serve_stream(self, reader, out: FrameBatcher, peer: str, serve: Callable, counter: str,
                            once: bool = False, concurrent: bool = False,
                            sessions_open: Callable[[], bool] = lambda: False) -> None:
        """Answer messages until the peer closes the stream, under the peer's limits (``limits``).
        A frame over a size limit, or a stream silent or trickling past its timeout, ends it with a
        typed error (a payload cannot be skipped safely). A bundle's parts are served as separate
        messages. ``concurrent``: ``serve`` is synchronous and gives an answer, or the future of one
        (a step's, done when its batch has run); no message waits for another's answer, and each
        answer goes out as it is ready. Otherwise ``serve`` is a coroutine, awaited in turn."""
        try:
            self.peers.open_stream(peer)
        except PeerLimitReached as e:  # not held until the peer closes: libp2p resets a peer's streams
            out.write(msg.error_meta(e))  # past its own cap without a word; only until the answer is through
            await out.end(reader, msg.REFUSED_LINGER_S)
            return
        linger = msg.LINGER_S  # how long to wait for the peer to close first (``msg.end_stream``)
        try:
            while True:
                try:
                    frame = await self.peers.read_frame(reader, peer, self.frame_bytes, sessions_open())
                    parts = unbundle(frame)
                except (MessageTooLarge, PeerLimitReached) as e:
                    self.counters["errors"] += 1
                    out.write(msg.error_meta(e))
                    linger = msg.REFUSED_LINGER_S
                    break
                except TimeoutError:
                    self.counters["streams_timed_out"] += 1
                    out.write(msg.error_meta(PeerLimitReached("this stream was silent, or sent a frame too slowly, "
                                                              "past its timeout; it is closed")))
                    linger = msg.REFUSED_LINGER_S
                    break
                except BadRequest as e:
                    self.counters["errors"] += 1
                    out.write(msg.error_meta(e))
                    continue
                self.counters["bundles_received"] += len(parts) > 1
                for part in parts:
                    self.counters[counter] += 1
                    try:
                        self.peers.take_request(peer)
                    except PeerLimitReached as e:
                        self.counters["errors"] += 1
                        out.write(msg.error_meta(e, part.meta))
                        continue
                    if concurrent:
                        self._serve_part(serve, part, out, counter)
                    else:
                        await self._answer(serve, part, out, counter)
                if once:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away
        except asyncio.CancelledError:  # the node stops: close at once, and end quietly (a connection's task
            linger = 0.0  # that ends cancelled is logged as an error, with its traceback, by asyncio's streams)
        except BaseException:
            linger = 0.0
            raise
        finally:
            try:
                if linger:
                    await out.end(reader, linger)
                else:
                    out.close()
            finally:
                self.peers.close_stream(peer)

    def _serve_part(self, serve: Callable, frame: msg.Frame, out: FrameBatcher, counter: str) -> None:
        """Serve one message of a concurrent stream: its answer is written now, or when its future is
        done. No task per message: a task for each of a bundle's 32 steps, and a timeout around each
        hand-off's drain, were a quarter of a hand-off node's work per step (80 against 61 us)."""
        try:
            reply = serve(frame)
        except Exception as e:
            reply = self._failed(e, frame)
        if isinstance(reply, asyncio.Future):
            reply.add_done_callback(lambda done: self._write(out, self._outcome(done, frame), counter))
        else:
            self._write(out, reply, counter)

    async def _answer(self, serve: Callable, frame: msg.Frame, out: FrameBatcher, counter: str) -> None:
        self._write(out, await self._serve_safely(serve, frame), counter)

    def _write(self, out: FrameBatcher, reply: Reply | None, counter: str) -> None:
        if reply is not None and not out.is_closing():
            self.counters["to_client" if counter == "client_messages" else "replies"] += 1
            out.write(*reply)

    async def _serve_safely(self, serve: Callable, frame: msg.Frame) -> Reply | None:
        try:
            return await serve(frame)
        except Exception as e:
            return self._failed(e, frame)

    def _outcome(self, done: asyncio.Future, frame: msg.Frame) -> Reply | None:
        """The answer a done future holds; its error as an error answer; None if it was cancelled."""
        if done.cancelled():
            return None
        error = done.exception()
        return done.result() if error is None else self._failed(error, frame)

    def _failed(self, error: BaseException, frame: msg.Frame) -> Reply:
        """The error answer to ``frame``: a typed error as it is, anything else (a bug) logged and
        sent as an internal error; the node goes on serving."""
        self.counters["errors"] += 1
        if not isinstance(error, PotluckError):
            logger.error("request failed", exc_info=error)
            error = PotluckError(f"internal error on the node: {type(error).__name__}: {error}")
        return msg.error_meta(error, frame.meta), ()

    def _inference_request(self, frame: msg.Frame, opened: dict[str, Session], out,
                           peer: str = "") -> Reply | asyncio.Future:
        request = msg.parse_request(frame.meta)
        if isinstance(request, msg.OpenSession):
            if self.draining:
                raise NodeDraining("this node is shutting down and takes no new sessions")
            self._check_span(request.start, request.end)
            needed = request.max_length * request.batch_size
            if needed <= self.sessions.tokens_left:  # a full pool says so itself (CacheFull), whoever holds it
                self.peers.check_session(peer, *self.sessions.held_by(peer), needed)
            opened[request.session_id] = self.sessions.open(request, self.span, peer)
            self._client_streams[request.session_id] = out
            self.counters["sessions_opened"] += 1
            return replies.Opened(request.session_id).to_meta(), ()
        if isinstance(request, msg.Step):
            session = opened.get(request.session_id) or self.sessions.get(request.session_id)
            if request.session_id not in opened:
                raise BadRequest(f"session {request.session_id} belongs to another stream")
            return self._step(session, request, frame)
        if isinstance(request, msg.Follow):
            session = self.sessions.get(request.session_id)
            if request.session_id not in opened:
                raise BadRequest(f"session {request.session_id} belongs to another stream")
            session.previous = request.previous
            return replies.Followed(request.session_id).to_meta(), ()
        if isinstance(request, msg.CloseSession):
            self.sessions.get(request.session_id)
            if request.session_id not in opened:
                raise BadRequest(f"session {request.session_id} belongs to another stream")
            opened.pop(request.session_id)
            self.sessions.close(request.session_id)
            self._client_streams.pop(request.session_id, None)
            return replies.Closed(request.session_id).to_meta(), ()
        raise BadRequest(f"{type(request).__name__} is not valid on an inference stream")

    def _push_request(self, frame: msg.Frame, peer: str) -> None:
        """A step handed off by the previous node: errors go to the session's client, not back;
        a push from any other peer is refused back to that peer (it never reaches the client)."""
        request = msg.parse_request(frame.meta)
        if not isinstance(request, msg.Push):
            raise BadRequest("only push steps are valid on a push stream")
        session = self.sessions.get(request.session_id)
        if session.previous != peer:
            raise BadRequest(f"session {request.session_id} takes pushes only from the node before it in its chain")
        client = self._client_streams.get(request.session_id)
        try:
            answer = self._step(session, request, frame)
        except PotluckError as e:
            self._to_client(client, self._failed(e, frame))
            return None
        answer.add_done_callback(lambda done: self._to_client(client, self._outcome(done, frame)))
        return None

    def _to_client(self, client: FrameBatcher | None, reply: Reply | None) -> None:
        if reply is not None and client is not None and not client.is_closing():
            self.counters["to_client"] += 1
            client.write(*reply)

    def _step(self, session: Session, request: msg.Step | msg.Push, frame: msg.Frame) -> asyncio.Future:
        """Check a step and submit it to the compute lane; the future of its answer: a result, or
        None once it is pushed on to the next node (its hand-off failed: the answer says so)."""
        tensors = frame.tensors
        new_tokens = tensors[0].shape[1] if tensors and tensors[0].ndim == 3 else 0
        start = session.step_start(request.start_from, new_tokens)
        hidden, positions, mask = msg.check_step_tensors(tensors, self.hidden_size, session.request.batch_size, start,
                                                         frame.sane)
        self._check_tokens(hidden)
        alone = len(self.sessions.sessions) == 1
        computed = self.compute.submit_step(session, hidden, positions, mask, start, alone)
        answer = asyncio.get_running_loop().create_future()
        computed.add_done_callback(lambda done: self._stepped(done, answer, session, request, hidden, tensors, start))
        return answer

    def _stepped(self, computed: asyncio.Future, answer: asyncio.Future, session: Session,
                 request: msg.Step | msg.Push, hidden: torch.Tensor, tensors: tuple, start: int) -> None:
        """A step's batch has run: answer it, or push its output on (at once where the link to the
        next node is open and keeping up; otherwise in a task that may wait for it)."""
        if computed.cancelled():  # the lane stopped: the node is going away
            return
        try:
            out = self._computed(session.span.device, computed)
            self.counters["steps"] += 1
            self.counters["tokens"] += hidden.shape[0] * hidden.shape[1]
            self.counters["hidden_bytes_in"] += hidden.numel() * hidden.element_size()  # as sent: 16-bit halves it
            out = out.to(hidden.dtype)  # still on the span's device: encode_frame moves it to the CPU
            if not request.next:
                answer.set_result((replies.Result(session.cached, request.seq, session.id).to_meta(), (out,)))
                return
            following = request.next[0]
            push = msg.Push(following.session_id, start, request.next[1:], request.seq).to_meta()
            pushed = [out, *tensors[1:]]  # its output, with the step's positions (and mask)
            if self.links.push_now(following.peer_id, push, pushed):
                self.counters["pushes_sent"] += 1
                answer.set_result(None)
                return
        except Exception as e:  # an error answer, not a request left without one
            answer.set_exception(e)
            return
        task = asyncio.create_task(self._push(following.peer_id, push, pushed, session, request, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push(self, peer_id: str, push: dict, tensors: list[torch.Tensor], session: Session,
                    request: msg.Step | msg.Push, answer: asyncio.Future) -> None:
        try:
            await self.links.push(peer_id, push, tensors)
        except NodeUnavailable as e:  # the client carries on from here itself
            self.counters["handoff_failures"] += 1
            reply = replies.HandoffFailed(peer_id, str(e), session.cached, request.seq, session.id).to_meta()
            answer.set_result((reply, (tensors[0],)))
            return
        self.counters["pushes_sent"] += 1
        answer.set_result(None)

    async def _single_request(self, frame: msg.Frame) -> Reply:
        request = msg.parse_request(frame.meta)
        if isinstance(request, msg.InfoRequest):
            refusals = {f"refused_{limit}": count for limit, count in self.peers.refusals.items()}
            counters = {**self.counters, **self.compute.counters, **refusals,
                        "compute_seconds": self.compute.busy_seconds}
            return replies.Info(**self.describe(), open_sessions=len(self.sessions.sessions),
                                counters=counters).to_meta(), ()
        if isinstance(request, msg.Forward):
            self._check_span(request.start, request.end)
            hidden, positions, mask = msg.check_step_tensors(frame.tensors, self.hidden_size, None, 0, frame.sane)
            self._check_tokens(hidden)
            span = self.span
            out = await self._compute(span.device,
                                      self.compute.forward(span, hidden, positions, mask, request.start, request.end))
            self.counters["forwards"] += 1
            self.counters["hidden_bytes_in"] += hidden.numel() * hidden.element_size()
            return replies.Result().to_meta(), (out.to(hidden.dtype),)
        raise BadRequest(f"{type(request).__name__} is not valid on this stream")

    async def _compute(self, device: torch.device, work: Awaitable[torch.Tensor]) -> torch.Tensor:
        """Await block work on ``device`` from the compute lane (a forward's)."""
        try:
            return self._corrupted(await work)
        except torch.OutOfMemoryError:
            raise self._out_of_memory(device) from None

    def _computed(self, device: torch.device, done: asyncio.Future) -> torch.Tensor:
        """The output of a step's block work on ``device``, from its done future."""
        try:
            return self._corrupted(done.result())
        except torch.OutOfMemoryError:
            raise self._out_of_memory(device) from None

    @staticmethod
    def _out_of_memory(device: torch.device) -> NodeOutOfMemory:
        """Running out of device memory fails the requests of that batch only."""
        hardware.release_memory(device)
        logger.warning("out of memory on %s; the request failed, the node goes on", device)
        return NodeOutOfMemory(f"the node ran out of {device.type} memory; try another node")

    def _corrupted(self, out: torch.Tensor) -> torch.Tensor:
        if self.corrupt_outputs:  # tests of clients' verification only
            scale = out.float().pow(2).mean().sqrt() * self.corrupt_outputs
            out = out + (torch.randn(out.shape, device=out.device) * scale).to(out.dtype)
        return out

    def stop(self) -> None:
        """Cancel the hand-offs still waiting (the node is going away; the compute lane's shutdown
        leaves the steps in it unanswered)."""
        for task in list(self._tasks):
            task.cancel()

    def sessions_on(self, span: BlockSpan) -> list[Session]:
        return [s for s in self.sessions.sessions.values() if s.span is span]

    async def evict(self, reason: PotluckError, span: BlockSpan | None = None) -> None:
        """Send every open session's client (or only those computing on ``span``) ``reason``
        (unasked, so with no seq) and close the session: the client fails over at once instead of
        waiting out a timeout. The client's stream stays open for its other sessions."""
        for session_id, out in list(self._client_streams.items()):
            session = self.sessions.sessions.get(session_id)
            if span is not None and (session is None or session.span is not span):
                continue
            self._client_streams.pop(session_id)
            if not out.is_closing():
                try:
                    out.write(msg.error_meta(reason, session_id=session_id))
                    await out.drained()
                except (ConnectionError, OSError, TimeoutError):  # a client that does not read is not waited for
                    pass
            self.sessions.close(session_id)

    def _check_span(self, start: int, end: int) -> None:
        if self.span is None:
            raise BlocksNotServed(f"blocks {start}:{end} requested; this node is moving to other blocks")
        if not (self.span.start <= start and end <= self.span.end):
            raise BlocksNotServed(f"blocks {start}:{end} requested, this node serves {self.span.start}:{self.span.end}")

    def _check_tokens(self, hidden: torch.Tensor) -> None:
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > self.limits.max_batch_tokens:
            raise BadRequest(f"{tokens} tokens in one message (limit {self.limits.max_batch_tokens}); split it")


def _peer_of(info) -> str:
    """The base58 id of the peer at the other end of a stream (info is None for in-memory streams)."""
    return info.peer_id.to_base58() if info is not None else "memory"
