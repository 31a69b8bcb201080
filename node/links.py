"""Outgoing streams from this node to the next nodes of chains, for hand-off of step outputs.

One long-lived stream per peer, opened on first use and shared by every session that hands off
to that peer (a new stream per message costs far more than a write on an open one); the pushes
of one batch leave as one bundle. A link that fails is dropped; the caller falls back to
answering the client itself.
"""
from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import P2P

from potluck.protocol import messages as msg
from potluck.protocol.bundles import FrameBatcher, unbundle
from potluck.protocol.errors import NodeUnavailable

logger = logging.getLogger(__name__)


class PushLinks:
    def __init__(self, p2p: P2P, connect_timeout: float = 5.0):
        self.p2p, self.connect_timeout = p2p, connect_timeout
        self._writers: dict[str, FrameBatcher] = {}  # peer id -> open push stream
        self._readers: set[asyncio.Task] = set()  # drain what peers answer on push streams
        self._connecting: dict[str, asyncio.Lock] = {}

    async def push(self, peer_id: str, meta: dict, tensors) -> None:
        """Send one push frame to ``peer_id``; NodeUnavailable if it cannot be reached."""
        try:
            writer = await self._writer(peer_id)
            await writer.send(meta, tensors, self.connect_timeout)  # a next node that stops reading is unreachable
        except Exception as e:  # p2pd dial errors, timeouts and broken pipes all mean "unreachable"
            self._drop(peer_id)
            raise NodeUnavailable(f"cannot hand off to node {peer_id}: {type(e).__name__} {e}", peer_id) from None

    def push_now(self, peer_id: str, meta: dict, tensors) -> bool:
        """Queue one push frame to ``peer_id`` without waiting, where its stream is open and its
        peer has taken everything written so far; False otherwise (``push`` then waits for it)."""
        writer = self._writers.get(peer_id)
        if writer is None or writer.is_closing() or writer.backed_up():
            return False
        writer.write(meta, tensors)
        return True

    async def _writer(self, peer_id: str) -> FrameBatcher:
        writer = self._writers.get(peer_id)
        if writer is not None and not writer.is_closing():
            return writer  # no lock on the common path: a batch's pushes stay in one loop turn
        async with self._connecting.setdefault(peer_id, asyncio.Lock()):
            writer = self._writers.get(peer_id)
            if writer is None or writer.is_closing():
                reader, stream = await msg.open_stream(self.p2p, peer_id, msg.PUSH_HANDLER, self.connect_timeout)
                writer = self._writers[peer_id] = FrameBatcher(stream)
                task = asyncio.create_task(self._drain(peer_id, reader))
                self._readers.add(task)
                task.add_done_callback(self._readers.discard)
            return writer

    async def _drain(self, peer_id: str, reader: asyncio.StreamReader) -> None:
        """Peers answer push frames only with errors they could not send to a client; log them."""
        try:
            while True:
                for frame in unbundle(await msg.read_frame(reader)):
                    logger.warning("node %s refused a hand-off: %s", peer_id, frame.meta.get("error"))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self._drop(peer_id)
        except Exception as e:  # a malformed answer: stop reading this link
            logger.warning("dropping hand-off link to %s: %s", peer_id, e)
            self._drop(peer_id)

    def _drop(self, peer_id: str) -> None:
        writer = self._writers.pop(peer_id, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for peer_id in list(self._writers):
            self._drop(peer_id)
        for task in list(self._readers):
            task.cancel()
