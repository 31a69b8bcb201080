"""How every peer joins the libp2p network and the DHT: listen addresses, NAT settings, and
``join_swarm``, the one place a P2P daemon and a DHT node are created (nodes, bootstrap peers,
clients and the dashboard alike; record validators belong there).

A peer whose initial peers (or listen addresses) are all loopback is part of a local swarm: it
binds to 127.0.0.1 and keeps NAT port mapping (UPnP multicast) off. Only a peer joining a real
swarm turns it on, since volunteers behind home routers need it.
"""
from __future__ import annotations

import ipaddress
import os
from typing import Any, Sequence

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from .errors import NodeUnavailable

INITIAL_PEERS_ENV = "POTLUCK_INITIAL_PEERS"
LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"
PUBLIC_MADDR = "/ip4/0.0.0.0/tcp/0"


def initial_peers_from_env(initial_peers: Sequence[str] | None) -> list[str]:
    """Explicit initial peers, else those in $POTLUCK_INITIAL_PEERS (space or comma separated)."""
    if initial_peers:
        return list(initial_peers)
    return os.environ.get(INITIAL_PEERS_ENV, "").replace(",", " ").split()


def is_loopback(maddr: str) -> bool:
    parts = str(maddr).split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        return False
    if parts[1].startswith("dns"):
        return parts[2] == "localhost"
    try:
        return ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return False


def p2p_options(initial_peers: Sequence[str], host_maddrs: Sequence[str] | None = None,
                announce_maddrs: Sequence[str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``hivemind.P2P.create`` / ``DHTNode.create``."""
    local = (bool(initial_peers) and all(map(is_loopback, initial_peers))) or (
        bool(host_maddrs) and all(map(is_loopback, host_maddrs)))
    hosts = list(host_maddrs or [LOOPBACK_MADDR if local else PUBLIC_MADDR])
    options: dict[str, Any] = dict(host_maddrs=hosts, nat_port_map=not local, initial_peers=list(initial_peers))
    if announce_maddrs:
        options["announce_maddrs"] = list(announce_maddrs)
    return options


async def join_swarm(initial_peers: Sequence[str], host_maddrs: Sequence[str] | None = None,
                     announce_maddrs: Sequence[str] | None = None, identity_path: str | None = None,
                     client_mode: bool = False) -> tuple[P2P, DHTNode]:
    """Start this peer's P2P daemon and DHT node. ``client_mode``: read and store records but serve
    none (clients, the dashboard). An initial peer that cannot be reached raises NodeUnavailable."""
    options = p2p_options(initial_peers, host_maddrs, announce_maddrs)
    try:
        p2p = await P2P.create(identity_path=identity_path, **options)
    except Exception as e:  # hivemind's P2PDaemonError and friends: say what to check
        raise NodeUnavailable(f"cannot join the swarm through {', '.join(initial_peers) or 'no initial peer'}: {e} "
                              "(is the initial peer running and reachable?)") from None
    try:
        dht = await DHTNode.create(p2p=p2p, initial_peers=options["initial_peers"], client_mode=client_mode)
    except BaseException:
        await p2p.shutdown()
        raise
    return p2p, dht
