"""What nodes answer: one frozen dataclass per reply, built by nodes and parsed by clients.

A reply travels as a frame whose metadata is ``reply.to_meta()`` (``messages.Message``) (errors travel as
``messages.error_meta``); ``parse_reply`` checks a frame against the reply schemas, like
``messages.parse_request`` does for requests, and raises the peer's typed error for an error
frame. A reply that matches no schema means a broken node: ``NodeUnavailable``, so the client
fails over instead of guessing.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import NodeUnavailable
from .messages import DIRECTLY, INFO_HANDLER, Dial, Frame, InfoRequest, Message, call_once, raise_if_error


@dataclass(frozen=True)
class Opened(Message):
    """An inference session is open on the node."""

    KIND: ClassVar[str] = "opened"

    session_id: str


@dataclass(frozen=True)
class Followed(Message):
    """The session now takes pushes from the node its ``Follow`` named."""

    KIND: ClassVar[str] = "followed"

    session_id: str


@dataclass(frozen=True)
class Closed(Message):
    KIND: ClassVar[str] = "closed"

    session_id: str


@dataclass(frozen=True)
class Result(Message):
    """Hidden states out of the node's blocks (the frame's one tensor): of a step, a push that
    ended the chain, or a forward (``length`` None: no session)."""

    KIND: ClassVar[str] = "result"

    length: int | None = None  # tokens the session's cache holds after the step
    seq: int | None = None  # the step attempt answered
    session_id: str | None = None  # the session it belongs to (its stream may carry many)


@dataclass(frozen=True)
class HandoffFailed(Message):
    """The node ran the step but could not push it on: its output (the frame's one tensor) goes
    back to the client, which carries on from ``peer_id`` itself."""

    KIND: ClassVar[str] = "handoff_failed"

    peer_id: str  # the next node, which could not be reached
    reason: str
    length: int
    seq: int | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class Info(Message):
    """A node's answer to an info request: what it serves and what it has done."""

    KIND: ClassVar[str] = "info"

    peer_id: str
    model: str
    start: int
    end: int
    state: str
    version: str = ""
    dtype: str = ""
    quant: str = "none"
    device: str = ""
    cache_tokens_left: int = 0
    public_name: str = ""
    open_sessions: int = 0
    counters: dict[str, float] = field(default_factory=dict)  # requests, tokens, errors... since start


Reply = Opened | Followed | Closed | Result | HandoffFailed | Info
_KINDS: dict[str, type] = {cls.KIND: cls for cls in (Opened, Followed, Closed, Result, HandoffFailed, Info)}
_INT_OR_NONE = (int, type(None))
_TYPES: dict[str, tuple[type, ...]] = {
    "session_id": (str, type(None)), "peer_id": (str,), "reason": (str,), "model": (str,), "state": (str,),
    "version": (str,), "dtype": (str,), "quant": (str,), "device": (str,), "public_name": (str,), "start": (int,),
    "end": (int,), "cache_tokens_left": (int,), "open_sessions": (int,), "length": _INT_OR_NONE, "seq": _INT_OR_NONE,
    "counters": (dict,),
}


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """A reply class's fields: (name, whether a reply must carry it). Looked up once: a client
    parses an answer per session per step."""
    return tuple((item.name, item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING)
                 for item in dataclasses.fields(cls))


def parse_reply(frame: Frame, peer_id: str | None = None) -> Reply:
    """The typed reply in ``frame``; the peer's own typed error if it answered with one."""
    raise_if_error(frame, peer_id)
    meta = frame.meta
    cls = _KINDS.get(meta.get("type"))
    if cls is None:
        raise NodeUnavailable(f"node {peer_id} sent an unknown reply type {meta.get('type')!r:.40}", peer_id)
    values = {}
    for name, required in _fields(cls):
        if name not in meta:
            if required:
                raise NodeUnavailable(f"node {peer_id} sent a {meta['type']} reply without {name!r}", peer_id)
            continue
        value = meta[name]
        if not isinstance(value, _TYPES[name]) or isinstance(value, bool):
            raise NodeUnavailable(f"node {peer_id} sent a {meta['type']} reply with a bad {name!r}: "
                                  f"{value!r:.40}", peer_id)
        values[name] = value
    if cls is Info:
        values["counters"] = {str(k): v for k, v in values.get("counters", {}).items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return cls(**values)


async def request_info(p2p, peer_id: str, timeout: float, dial: Dial = DIRECTLY) -> tuple[Info, float]:
    """A node's info and the round trip it took (on a fresh stream, as a new peer would see it)."""
    began = time.perf_counter()
    frame = await call_once(p2p, peer_id, INFO_HANDLER, InfoRequest().to_meta(), timeout=timeout, dial=dial)
    elapsed = time.perf_counter() - began
    info = parse_reply(frame, peer_id)
    if not isinstance(info, Info):
        raise NodeUnavailable(f"node {peer_id} answered an info request with {type(info).__name__}", peer_id)
    return info, elapsed
