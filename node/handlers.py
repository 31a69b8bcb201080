"""The node's RPC handlers: inference sessions, forward and info, over libp2p streams.

Each handler reads frames, validates them (``potluck.protocol.messages``), and answers every
request with either a result or a typed error; a bad request changes nothing and the stream
stays usable unless its framing is broken. Sessions opened on a stream close when it ends, so a
client that vanishes frees its cache.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from hivemind.p2p import P2P

from potluck.protocol import messages as msg
from potluck.protocol.errors import BadRequest, BlocksNotServed, MessageTooLarge, NodeDraining, PotluckError
from potluck.protocol.span import BlockSpan

from .compute import ComputeLane
from .sessions import Session, SessionTable

logger = logging.getLogger(__name__)
Reply = tuple[dict[str, Any], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class ServingLimits:
    max_frame_bytes: int = msg.MAX_FRAME_BYTES
    max_batch_tokens: int = 8192  # batch x new tokens in one step or forward


class BlockServicer:
    """Serves one span of blocks; owns the sessions opened on it."""

    def __init__(self, span: BlockSpan, compute: ComputeLane, sessions: SessionTable, limits: ServingLimits,
                 dtype: torch.dtype, describe: Callable[[], dict[str, Any]]):
        self.span, self.compute, self.sessions, self.limits = span, compute, sessions, limits
        self.dtype, self.describe = dtype, describe
        self.hidden_size = span.config.hidden_size
        self.draining = False
        self.counters: Counter[str] = Counter()  # what was served, reported by info

    async def register(self, p2p: P2P) -> None:
        await p2p.add_binary_stream_handler(msg.INFERENCE_HANDLER, self._inference_stream)
        await p2p.add_binary_stream_handler(msg.FORWARD_HANDLER, self._single_request_stream)
        await p2p.add_binary_stream_handler(msg.INFO_HANDLER, self._single_request_stream)

    async def _inference_stream(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened: dict[str, Session] = {}  # sessions owned by this stream
        self.counters["streams"] += 1
        try:
            while True:
                reply = await self._answer_next(reader, lambda frame: self._inference_request(frame, opened))
                if reply is None:
                    break
                await msg.write_frame(writer, *reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: its sessions close below
        finally:
            for session_id in opened:
                self.sessions.close(session_id)
            writer.close()

    async def _single_request_stream(self, info, reader, writer) -> None:
        try:
            reply = await self._answer_next(reader, self._single_request)
            if reply is not None:
                await msg.write_frame(writer, *reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer_next(self, reader, serve: Callable) -> Reply | None:
        """Read one frame and serve it; None when the stream ended or can no longer be framed."""
        try:
            frame = await msg.read_frame(reader, self.limits.max_frame_bytes)
        except asyncio.IncompleteReadError:
            return None
        except MessageTooLarge as e:
            self.counters["errors"] += 1
            return msg.error_meta(e), ()  # the caller sends this, then the stream must end
        except BadRequest as e:
            self.counters["errors"] += 1
            return msg.error_meta(e), ()
        self.counters["messages"] += 1
        try:
            return await serve(frame)
        except PotluckError as e:
            self.counters["errors"] += 1
            return msg.error_meta(e), ()
        except Exception as e:
            logger.exception("request failed")
            self.counters["errors"] += 1
            return msg.error_meta(PotluckError(f"internal error on the node: {type(e).__name__}: {e}")), ()

    async def _inference_request(self, frame: msg.Frame, opened: dict[str, Session]) -> Reply:
        request = msg.parse_request(frame.meta)
        if isinstance(request, msg.OpenSession):
            if self.draining:
                raise NodeDraining("this node is shutting down and takes no new sessions")
            self._check_span(request.start, request.end)
            opened[request.session_id] = self.sessions.open(request)
            self.counters["sessions_opened"] += 1
            return {"type": "opened", "session_id": request.session_id}, ()
        if isinstance(request, msg.Step):
            session = opened.get(request.session_id) or self.sessions.get(request.session_id)
            if request.session_id not in opened:
                raise BadRequest(f"session {request.session_id} belongs to another stream")
            return await self._step(session, request, frame.tensors)
        if isinstance(request, msg.CloseSession):
            self.sessions.get(request.session_id)
            opened.pop(request.session_id, None)
            self.sessions.close(request.session_id)
            return {"type": "closed", "session_id": request.session_id}, ()
        raise BadRequest(f"{type(request).__name__} is not valid on an inference stream")

    async def _step(self, session: Session, request: msg.Step, tensors) -> Reply:
        new_tokens = tensors[0].shape[1] if tensors and tensors[0].ndim == 3 else 0
        prefix = session.check_room(request.start_from, new_tokens)
        hidden, positions, mask = msg.check_step_tensors(tensors, self.hidden_size, session.request.batch_size, prefix)
        self._check_tokens(hidden)
        out = await self.compute.run(session.step, self.span, hidden.to(self.dtype), positions, mask, prefix)
        self.counters["steps"] += 1
        self.counters["tokens"] += hidden.shape[0] * hidden.shape[1]
        return {"type": "result", "length": session.length}, (out.to(hidden.dtype),)

    async def _single_request(self, frame: msg.Frame) -> Reply:
        request = msg.parse_request(frame.meta)
        if isinstance(request, msg.InfoRequest):
            counters = {**self.counters, "compute_seconds": self.compute.busy_seconds}
            return {"type": "info", **self.describe(), "counters": counters,
                    "open_sessions": len(self.sessions.sessions)}, ()
        if isinstance(request, msg.Forward):
            self._check_span(request.start, request.end)
            hidden, positions, mask = msg.check_step_tensors(frame.tensors, self.hidden_size, None, 0)
            self._check_tokens(hidden)
            out = await self.compute.run(self.span, hidden.to(self.dtype), positions, mask, None,
                                         request.start, request.end)
            self.counters["forwards"] += 1
            return {"type": "result"}, (out.to(hidden.dtype),)
        raise BadRequest(f"{type(request).__name__} is not valid on this stream")

    def _check_span(self, start: int, end: int) -> None:
        if not (self.span.start <= start and end <= self.span.end):
            raise BlocksNotServed(f"blocks {start}:{end} requested, this node serves {self.span.start}:{self.span.end}")

    def _check_tokens(self, hidden: torch.Tensor) -> None:
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > self.limits.max_batch_tokens:
            raise BadRequest(f"{tokens} tokens in one message (limit {self.limits.max_batch_tokens}); split it")
