"""The client's connection to the swarm: P2P and a DHT client on a background event loop.

The transformers model is synchronous; every network action runs as one coroutine on this
loop's thread (``SwarmConnection.call``), so a whole decoding step through a chain of nodes
costs one thread hop, not one per node.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
from typing import Awaitable, Sequence, TypeVar

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from potluck.protocol import messages as msg
from potluck.protocol.errors import NodeUnavailable, NoRoute, PotluckError
from potluck.protocol.network import INITIAL_PEERS_ENV, join_swarm, leave_swarm
from potluck.protocol.records import NodeRecord
from potluck.protocol.replies import Info, request_info

from .channels import Channels

logger = logging.getLogger(__name__)
T = TypeVar("T")


RELAY_DIAL_PATIENCE = 5.0  # seconds to keep dialling a node behind NAT through its relays before failing over


def how_to_dial(record: NodeRecord, patient: bool = True) -> msg.Dial:
    """A node behind NAT (its record says ``relayed``) is dialled through the relays its record
    names, ``patient``: for a few seconds while a new relayed connection is set up (a probe or ping
    is not); others directly, failed over at once."""
    if record.reachability != "relayed":
        return msg.DIRECTLY
    return msg.Dial(RELAY_DIAL_PATIENCE if patient else 0.0, record.relays)


class SwarmConnection:
    """Owns a daemon thread running uvloop with this client's P2P and DHT client."""

    def __init__(self, initial_peers: Sequence[str], connect_timeout: float = 30.0):
        if not initial_peers:
            raise NoRoute(f"no initial peers: pass initial_peers=[...] or set {INITIAL_PEERS_ENV}")
        import uvloop

        self.initial_peers = list(initial_peers)
        self._tasks: set[asyncio.Task] = set()  # background tasks, cancelled on close
        self.closed = self.closing = False
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="potluck-client", daemon=True)
        self._thread.start()
        self.p2p, self.dht = self.call(self._connect(), connect_timeout)
        self.channels = Channels(self.open_stream)  # one inference stream per node, shared by sessions
        atexit.register(self.close)  # a program that never closes it still leaves no daemon and no stream behind

    async def _connect(self) -> tuple[P2P, DHTNode]:
        return await join_swarm(self.initial_peers, client_mode=True)

    @property
    def records_rejected(self) -> int:
        """Node records this peer's DHT refused so far: unsigned, forged or altered (``signing``)."""
        return self.dht.protocol.record_validator.rejected

    def own(self, task: asyncio.Task) -> None:
        """Keep a background task on this loop until it ends or the connection closes."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def call(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run a coroutine on the client loop and wait for its result. Ctrl-C while waiting cancels it
        (a step cut short leaves its session to send it again); on a closed connection it fails at once."""
        if self.closed:
            getattr(coro, "close", lambda: None)()  # never awaited: no warning about it
            raise PotluckError("this connection to the swarm is closed; load the model again to use it")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise NodeUnavailable(f"the swarm did not answer within {timeout} s") from None
        except KeyboardInterrupt:
            future.cancel()
            raise
        except concurrent.futures.CancelledError:
            if self.closing:  # closed by another thread (model.close()) while this call waited
                raise PotluckError("this connection to the swarm was closed while the call waited") from None
            raise

    async def open_stream(self, peer_id: str, handler: str, timeout: float, dial: msg.Dial = msg.DIRECTLY):
        """Open a stream to a node's handler; NodeUnavailable if it cannot be reached (``dial``: see
        ``messages.Dial``)."""
        return await msg.open_stream(self.p2p, peer_id, handler, timeout, dial)

    async def request(self, peer_id: str, handler: str, meta: dict, tensors=(), timeout: float = 30.0,
                      dial: msg.Dial = msg.DIRECTLY) -> msg.Frame:
        """One request on a fresh stream (info, forward); raises the node's typed error if it sent one."""
        return await msg.call_once(self.p2p, peer_id, handler, meta, tensors, timeout, dial)

    async def info(self, peer_id: str, timeout: float, dial: msg.Dial = msg.DIRECTLY) -> tuple[Info, float]:
        """A node's info reply and its round trip."""
        return await request_info(self.p2p, peer_id, timeout, dial)

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.closed or not self.loop.is_running():
            return
        self.closing = True
        async def _shutdown() -> None:
            for task in list(self._tasks):
                task.cancel()
            self.channels.close()
            await leave_swarm(self.p2p, self.dht)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:  # hivemind's background refreshers
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        try:
            self.call(_shutdown(), timeout=10)
        except Exception as e:  # closing is best effort: the daemon dies with the process anyway
            logger.debug("error while closing the swarm connection: %s", e)
        self.closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
