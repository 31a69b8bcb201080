"""Can other machines connect to this peer? Asked of other peers, not of a central service.

A node asks a few peers it knows (its initial peers, then other nodes) to dial it back: it sends
the TCP addresses it announces, and each peer tries a plain TCP connection to each of them from
its own side of the internet and answers which ones it reached (a libp2p listener greets a new
connection first; an accepted connection alone proves nothing behind a proxy). A node reached
by any peer is ``direct``; one that peers answered but could not reach is ``relayed`` (it is served through a
relay: libp2p's auto-relay reserves it a slot on a public peer); with no answer it stays
``unknown``. Every serving peer answers these requests (``serve_dialback``): at most four
addresses, each a public or private IP with a TCP port (no names, no loopback), a connection
that sends nothing and reads a greeting, and one request per peer every few seconds.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from . import messages as msg
from .errors import BadRequest, PeerLimitReached, PotluckError

logger = logging.getLogger(__name__)

DIALBACK_HANDLER = "potluck.dialback"
MAX_ADDRESSES = 4
DIAL_TIMEOUT = 3.0  # seconds for one TCP connection attempt
MIN_GAP = 5.0  # seconds between two requests of one peer
DIRECT, RELAYED, UNKNOWN = "direct", "relayed", "unknown"
LIBP2P_GREETING = b"\x13/multistream/1.0.0\n"  # what a libp2p listener sends first on a new connection


@dataclass(frozen=True)
class Reachability:
    state: str  # DIRECT, RELAYED or UNKNOWN
    reached: tuple[str, ...] = ()  # addresses some peer connected to
    asked: int = 0  # peers that answered


def tcp_target(maddr: str) -> tuple[str, int]:
    """(ip, port) of a multiaddr /ip4|ip6/ADDR/tcp/PORT[/...]; BadRequest for anything else,
    loopback and unspecified addresses included (a peer must not be made to dial itself)."""
    parts = str(maddr).split("/")
    try:
        if len(parts) < 5 or parts[0] or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
            raise ValueError
        ip, port = ipaddress.ip_address(parts[2]), int(parts[4])
    except ValueError:
        raise BadRequest(f"{maddr[:80]!r} is not an /ip4 or /ip6 address with a TCP port") from None
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or not 0 < port < 65536:
        raise BadRequest(f"{maddr[:80]!r} is not an address another machine could dial")
    return str(ip), port


def parse_request(meta: Any) -> list[tuple[str, tuple[str, int]]]:
    """The addresses of a dial-back request: [(multiaddr, (ip, port))]."""
    if not isinstance(meta, dict) or meta.get("type") != "dialback" or not isinstance(meta.get("addresses"), list):
        raise BadRequest("expected {'type': 'dialback', 'addresses': [multiaddr, ...]}")
    addresses = meta["addresses"]
    if not 0 < len(addresses) <= MAX_ADDRESSES or not all(isinstance(a, str) and len(a) <= 200 for a in addresses):
        raise BadRequest(f"a dial-back request names 1 to {MAX_ADDRESSES} multiaddrs as text")
    return [(a, tcp_target(a)) for a in addresses]


async def _connects(ip: str, port: int) -> bool:
    """Whether a libp2p peer listens at ip:port: it greets a new TCP connection with multistream-select's
    header (a bare accepted connection proves nothing: a proxy or firewall may accept and drop it)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), DIAL_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        greeting = await asyncio.wait_for(reader.readexactly(len(LIBP2P_GREETING)), DIAL_TIMEOUT)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        greeting = b""
    writer.close()
    return greeting == LIBP2P_GREETING


async def serve_dialback(p2p) -> None:
    """Answer other peers' dial-back requests on ``p2p``."""
    last_asked: dict[str, float] = {}

    async def handle(info, reader, writer) -> None:
        peer = info.peer_id.to_base58()
        try:
            frame = await asyncio.wait_for(msg.read_frame(reader, max_bytes=4096), DIAL_TIMEOUT)
            now = time.monotonic()
            if now - last_asked.get(peer, float("-inf")) < MIN_GAP:
                raise PeerLimitReached(f"one dial-back request per {MIN_GAP:g} s (limit 'dialback_gap')")
            last_asked[peer] = now
            if len(last_asked) > 4096:
                for old in [p for p, t in last_asked.items() if now - t >= MIN_GAP]:
                    del last_asked[old]
            targets = parse_request(frame.meta)
            results = await asyncio.gather(*(_connects(ip, port) for _, (ip, port) in targets))
            reply = {"type": "dialed", "reached": [a for (a, _), ok in zip(targets, results) if ok]}
        except PotluckError as e:
            reply = msg.error_meta(e)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            writer.close()
            return
        try:
            await msg.write_frame(writer, reply)
        except (ConnectionError, OSError):
            pass
        await msg.end_stream(reader, writer)

    await p2p.add_binary_stream_handler(DIALBACK_HANDLER, handle)


async def check(p2p, peers: Sequence[str], addresses: Sequence[str], enough: int = 2) -> Reachability:
    """Ask the first ``2 * enough`` of ``peers`` (peer ids, in order of preference) at once to dial
    ``addresses`` back; any that answer count (asking more than ``enough`` covers peers that are gone)."""
    addresses = [a for a in addresses if _dialable(a)][:MAX_ADDRESSES]
    if not addresses:
        return Reachability(UNKNOWN)

    async def ask(peer: str) -> list[str] | None:
        try:
            frame = await msg.call_once(p2p, peer, DIALBACK_HANDLER, {"type": "dialback", "addresses": addresses},
                                        timeout=DIAL_TIMEOUT * 2 + 5)
        except PotluckError as e:
            logger.debug("peer %s did not dial back: %s", peer, e)
            return None
        reached = frame.meta.get("reached")
        return [a for a in reached if a in addresses] if isinstance(reached, list) else None

    answers = [a for a in await asyncio.gather(*(ask(p) for p in list(peers)[:2 * enough])) if a is not None]
    if not answers:
        return Reachability(UNKNOWN)
    reached = tuple(sorted({a for answer in answers for a in answer}))
    return Reachability(DIRECT if reached else RELAYED, reached, len(answers))


def _dialable(maddr: str) -> bool:
    try:
        tcp_target(maddr)
    except BadRequest:
        return False
    return "p2p-circuit" not in maddr
