"""What one peer may take of a node, checked before anything is allocated.

In an open swarm anyone can connect. ``PeerLimits`` counts, per peer id, the streams it holds
open, the sessions and cache tokens it has reserved, the frame bytes being read from it and the
requests it sent in the last second (a token bucket), and refuses what goes past a limit with a
typed ``PeerLimitReached`` naming the limit (the router takes it as "try another node").
``read_frame`` reads a frame under those limits: the header is awaited for at most the idle
timeout, the size it declares is checked against what that stream's requests can need and
against the peer's and the node's byte budgets, and the payload must arrive within the frame
timeout. Each refusal is counted by kind (info, ``/metrics``).
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

from potluck.protocol.errors import MessageTooLarge, PeerLimitReached

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    streams_per_peer: int = 256  # streams one peer holds open at once
    sessions_per_peer: int = 128  # sessions one peer holds open at once (a `potluck serve` has up to 64 per node)
    cache_share_per_peer: float = 0.5  # of the node's cache tokens one peer may reserve
    reading_bytes_per_peer: int = 256 * MIB  # frame bytes being read from one peer at once
    reading_bytes: int = 1024 * MIB  # frame bytes being read from all peers at once
    frame_timeout: float = 10.0  # seconds for a frame's payload to arrive (plus 1 s per MiB), once its header has
    idle_timeout: float = 60.0  # seconds a stream without open sessions may stay silent
    session_idle_timeout: float = 1800.0  # seconds a stream with open sessions may stay silent (a person thinking)
    requests_per_peer_s: float = 10000.0  # messages a second from one peer, over any of its streams (a burst of
    # one second's worth is let through at once; a busy `potluck serve` sends one per session and token)


def step_frame_bytes(hidden_size: int, max_batch_tokens: int, cache_tokens: int) -> int:
    """The largest frame a step, push or forward can need: hidden states (4 bytes a value at most)
    and positions of ``max_batch_tokens`` tokens, a mask over at most the whole cache, metadata."""
    from potluck.protocol import messages as msg  # here: the CLI reads Limits' defaults, and messages loads torch

    return max_batch_tokens * (hidden_size * 4 + 8) + 8 * (cache_tokens + max_batch_tokens) + msg.MAX_METADATA_BYTES


class PeerLimits:
    def __init__(self, limits: Limits, cache_tokens: int):
        self.limits, self.cache_tokens = limits, cache_tokens
        self.streams: Counter[str] = Counter()  # peer id -> open streams
        self.reading: Counter[str] = Counter()  # peer id -> frame bytes being read
        self.reading_total = 0
        self.requests: dict[str, tuple[float, float]] = {}  # peer id -> (requests it may still send, as of when)
        self.refusals: Counter[str] = Counter()  # limit -> refusals

    def refuse(self, limit: str, message: str) -> PeerLimitReached:
        self.refusals[limit] += 1
        return PeerLimitReached(f"{message} (limit {limit!r}); try another node")

    def open_stream(self, peer: str) -> None:
        if self.streams[peer] >= self.limits.streams_per_peer:
            raise self.refuse("streams_per_peer", f"this peer already has {self.streams[peer]} streams open here")
        self.streams[peer] += 1

    def close_stream(self, peer: str) -> None:
        self.streams[peer] -= 1
        if self.streams[peer] <= 0:
            del self.streams[peer]

    def take_request(self, peer: str) -> None:
        """Count one request from ``peer``; refused past its rate."""
        rate, now = self.limits.requests_per_peer_s, time.monotonic()
        allowance, since = self.requests.get(peer, (rate, now))
        allowance = min(rate, allowance + (now - since) * rate)
        if allowance < 1:
            self.requests[peer] = (allowance, now)
            raise self.refuse("requests_per_peer_s", f"this peer sent more than {rate:g} requests a second")
        self.requests[peer] = (allowance - 1, now)
        if len(self.requests) > 4096:  # forget peers whose allowance is whole again
            self.requests = {p: (a, t) for p, (a, t) in self.requests.items() if a + (now - t) * rate < rate}

    def check_session(self, peer: str, sessions: int, reserved: int, needed: int) -> None:
        """Before a session of ``needed`` cache tokens opens for a peer that has ``sessions``
        sessions reserving ``reserved`` tokens here."""
        if sessions >= self.limits.sessions_per_peer:
            raise self.refuse("sessions_per_peer", f"this peer already has {sessions} sessions open here")
        share = int(self.limits.cache_share_per_peer * self.cache_tokens)
        if reserved + needed > share:
            raise self.refuse("cache_share_per_peer", f"this peer would reserve {reserved + needed} of the "
                              f"{share} cache tokens one peer may hold here")

    async def read_frame(self, reader: asyncio.StreamReader, peer: str, max_bytes: int, sessions_open: bool):
        """The next frame from ``peer`` under the limits; ``asyncio.IncompleteReadError`` when the
        stream ended, TimeoutError when it idled or trickled past its timeout."""
        from potluck.protocol import messages as msg

        idle = self.limits.session_idle_timeout if sessions_open else self.limits.idle_timeout
        async with asyncio.timeout(idle):
            header = await reader.readexactly(msg.HEADER_BYTES)
        length = int.from_bytes(header, "big")
        if length > max_bytes:
            self.refusals["frame_bytes"] += 1
            raise MessageTooLarge(f"frame of {length} bytes is over this stream's limit of {max_bytes}")
        if self.reading[peer] + length > self.limits.reading_bytes_per_peer:
            raise self.refuse("reading_bytes_per_peer", f"{self.reading[peer]} bytes from this peer are being read")
        if self.reading_total + length > self.limits.reading_bytes:
            raise self.refuse("reading_bytes", f"{self.reading_total} bytes from all peers are being read")
        self.reading[peer] += length
        self.reading_total += length
        try:
            async with asyncio.timeout(self.limits.frame_timeout + length / MIB):
                payload = await reader.readexactly(length)
        finally:
            self.reading[peer] -= length
            self.reading_total -= length
            if self.reading[peer] <= 0:
                del self.reading[peer]
        return msg.decode_payload(payload)
