"""One error hierarchy for the whole swarm; each error's code travels on the wire.

A node answers a bad request with ``PotluckError.to_wire()``; the client turns that back into the
same class with ``PotluckError.from_wire()``, so callers can catch e.g. ``MaxLengthExceeded``
whether it was raised locally or by a peer.
"""
from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.IntEnum):
    INTERNAL = 1
    BAD_REQUEST = 2
    MESSAGE_TOO_LARGE = 3
    BLOCKS_NOT_SERVED = 4
    UNKNOWN_SESSION = 5
    MAX_LENGTH_EXCEEDED = 6
    CACHE_FULL = 7
    NODE_DRAINING = 8
    OUT_OF_MEMORY = 9
    PEER_LIMIT = 10
    NODE_UNAVAILABLE = 20  # client side: the peer died, timed out or cannot be reached
    NO_ROUTE = 21  # client side: no ONLINE chain covers the blocks


class PotluckError(Exception):
    """Base class of every error Potluck raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str = "", peer_id: str | None = None):
        super().__init__(message)
        self.peer_id = peer_id  # the node that raised or caused it, when known

    @property
    def retriable(self) -> bool:
        """Whether another node might succeed where this one failed (the request itself was fine)."""
        return not isinstance(self, (BadRequest, MaxLengthExceeded, NoRoute))

    def to_wire(self) -> dict[str, Any]:
        return {"code": int(self.code), "message": str(self)}

    @staticmethod
    def from_wire(payload: Any) -> "PotluckError":
        """Rebuild the error a peer sent; anything malformed becomes a ProtocolViolation."""
        if not isinstance(payload, dict) or not isinstance(payload.get("message"), str):
            return ProtocolViolation(f"peer sent a malformed error: {payload!r:.200}")
        try:
            cls = _BY_CODE[ErrorCode(payload.get("code"))]
        except (ValueError, KeyError):
            cls = PotluckError
        return cls(payload["message"][:2000])


class BadRequest(PotluckError):
    """The message is malformed: wrong type, field, shape or dtype."""

    code = ErrorCode.BAD_REQUEST


class ProtocolViolation(BadRequest):
    """The peer broke the framing or sent something we cannot decode."""


class MessageTooLarge(BadRequest):
    code = ErrorCode.MESSAGE_TOO_LARGE


class BlocksNotServed(PotluckError):
    """The request names blocks this node does not hold."""

    code = ErrorCode.BLOCKS_NOT_SERVED


class UnknownSession(PotluckError):
    code = ErrorCode.UNKNOWN_SESSION


class MaxLengthExceeded(PotluckError):
    """A step would grow the session past the max length it reserved when it was opened."""

    code = ErrorCode.MAX_LENGTH_EXCEEDED


class CacheFull(PotluckError):
    """The node has no attention-cache tokens left for a session of this size."""

    code = ErrorCode.CACHE_FULL


class NodeDraining(PotluckError):
    code = ErrorCode.NODE_DRAINING


class NodeOutOfMemory(PotluckError):
    """The node's device ran out of memory during this request; the node itself keeps serving."""

    code = ErrorCode.OUT_OF_MEMORY


class PeerLimitReached(PotluckError):
    """This peer holds its share of the node (streams, sessions, cache, bytes being read, or a
    stream idled or trickled past its timeout); another node may serve it."""

    code = ErrorCode.PEER_LIMIT


class NodeUnavailable(PotluckError):
    """A node died, hung past the timeout, or could not be reached."""

    code = ErrorCode.NODE_UNAVAILABLE


class NoRoute(PotluckError):
    """No chain of ONLINE nodes covers the blocks the model needs."""

    code = ErrorCode.NO_ROUTE


_BY_CODE: dict[ErrorCode, type[PotluckError]] = {
    ErrorCode.INTERNAL: PotluckError,
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.MESSAGE_TOO_LARGE: MessageTooLarge,
    ErrorCode.BLOCKS_NOT_SERVED: BlocksNotServed,
    ErrorCode.UNKNOWN_SESSION: UnknownSession,
    ErrorCode.MAX_LENGTH_EXCEEDED: MaxLengthExceeded,
    ErrorCode.CACHE_FULL: CacheFull,
    ErrorCode.NODE_DRAINING: NodeDraining,
    ErrorCode.OUT_OF_MEMORY: NodeOutOfMemory,
    ErrorCode.PEER_LIMIT: PeerLimitReached,
    ErrorCode.NODE_UNAVAILABLE: NodeUnavailable,
    ErrorCode.NO_ROUTE: NoRoute,
}
