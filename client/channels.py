"""One inference stream per node, shared by every session this client has on that node.

A node batches the steps of many sessions; a client serving many people (``potluck serve``)
has many sessions on the same nodes. Over one stream per node, the steps its sessions send in
one turn of the event loop leave as one bundle (``protocol.bundles``), and the node's answers
come back bundled too: one frame each way per node and round instead of one per session. A
``NodeChannel`` hands each answer to the session it names; when the stream breaks, every
session on it hears so and fails over. Nodes close a stream that stays silent with no session
on it (a minute by default); a client does not reuse a channel idle for half that, so it never
sends into a stream the node is closing.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from potluck.protocol import messages as msg
from potluck.protocol.bundles import FrameBatcher, unbundle
from potluck.protocol.errors import NodeUnavailable, PotluckError

logger = logging.getLogger(__name__)
Listener = Callable[[msg.Frame | PotluckError], None]  # gets a session's answers, or the stream's failure
IDLE_REUSE = 30.0  # seconds a channel without sessions may idle and still be used
OpenStream = Callable[[str, str, float], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class NodeChannel:
    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.peer_id = peer_id
        self.out = FrameBatcher(writer)
        self.listeners: dict[str, Listener] = {}  # session id -> who gets its answers
        self.failed: PotluckError | None = None
        self.last_used = time.monotonic()
        self._reading = asyncio.create_task(self._read_forever(reader))

    @property
    def usable(self) -> bool:
        return self.failed is None and not self.out.is_closing()

    @property
    def stale(self) -> bool:
        """Idle without sessions long enough that the node may be closing it."""
        return not self.listeners and time.monotonic() - self.last_used > IDLE_REUSE

    def send(self, meta: dict, tensors=()) -> None:
        """Queue a message (it leaves at the end of this loop turn); NodeUnavailable if the stream broke."""
        if not self.usable:
            raise self.failed or NodeUnavailable(f"the stream to node {self.peer_id} is closed", self.peer_id)
        self.last_used = time.monotonic()
        try:
            self.out.write(meta, tensors)
        except (ConnectionError, OSError) as e:
            raise NodeUnavailable(f"node {self.peer_id} failed: {type(e).__name__} {e}", self.peer_id) from None

    async def _read_forever(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                for frame in unbundle(await msg.read_frame(reader)):
                    listener = self.listeners.get(frame.meta.get("session_id"))
                    if listener is not None:
                        listener(frame)
                    elif msg.error_of(frame) is not None and "session_id" not in frame.meta:
                        raise msg.error_of(frame, self.peer_id)  # about the stream itself: it ends
        except (asyncio.IncompleteReadError, ConnectionError, OSError, PotluckError) as e:
            self.failed = NodeUnavailable(f"node {self.peer_id} failed: {type(e).__name__} {e}".rstrip(),
                                          self.peer_id)
            self.out.close()
            for listener in list(self.listeners.values()):
                listener(self.failed)

    def close(self) -> None:
        self._reading.cancel()
        self.out.close()


class Channels:
    """This client's channels, by node; a channel is opened on first use and again after it broke."""

    def __init__(self, open_stream: OpenStream):
        self.open_stream = open_stream
        self._channels: dict[str, NodeChannel] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def get(self, peer_id: str, timeout: float, dial: msg.Dial = msg.DIRECTLY) -> NodeChannel:
        """The open channel to ``peer_id``, or a new one (``dial``: see ``messages.Dial``)."""
        channel = self._channels.get(peer_id)
        if channel is not None and channel.usable and not channel.stale:
            return channel
        async with self._opening.setdefault(peer_id, asyncio.Lock()):
            channel = self._channels.get(peer_id)
            if channel is not None and channel.stale:
                channel.close()
            if channel is None or not channel.usable or channel.stale:
                reader, writer = await self.open_stream(peer_id, msg.INFERENCE_HANDLER, timeout, dial)
                channel = self._channels[peer_id] = NodeChannel(peer_id, reader, writer)
            return channel

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
