"""How every peer joins the libp2p network and the DHT: listen addresses, NAT settings, initial
peers, identities, and ``join_swarm``, the one place a P2P daemon and a DHT node are created
(nodes, bootstrap peers, clients and the dashboard alike; record validators belong there).

Safe by default: a peer listens on 127.0.0.1 with NAT port mapping (UPnP) off unless it is asked
to be reachable: ``--public``, explicit non-loopback ``--host-maddrs``, or initial peers that are
not all loopback (joining a real swarm, where volunteers behind home routers need UPnP).

Behind a router that forwards no port, a node is still served, through a relay: once other peers
found they cannot dial it (``reachability``), the node starts its daemon again as ``behind_nat``:
libp2p's auto-relay then reserves a slot on each of its initial peers at once (static relays; the
daemon's own relay discovery waits minutes for four candidates), its record names the circuit
addresses ``relay_addresses`` gives, and clients dial it through them (``connect_through``).
Bootstrap peers that others reach (``--public`` or addresses beyond loopback) relay for them with
go-libp2p's full relay service (``relay_public``: 30 min and 4 GiB per relayed connection), unless
told not to (``relay_service=False``). Every p2pd also runs libp2p's default relay, which cuts a
connection after 128 KiB each way or 2 minutes and, started on the same protocol, often serves
instead of the full one (README); nothing turns it off, but only peers that list this one as an
initial peer reserve slots on it.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
from typing import Any, Awaitable, Sequence

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from .errors import BadRequest, NodeUnavailable
from .signing import NodeRecordValidator

logger = logging.getLogger(__name__)

INITIAL_PEERS_ENV = "POTLUCK_INITIAL_PEERS"
LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"
PUBLIC_MADDR = "/ip4/0.0.0.0/tcp/0"


MADDR_EXAMPLE = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW..."
LEAVE_TIMEOUT = 5.0  # seconds each step of leaving the swarm may take


def initial_peers_from_env(initial_peers: Sequence[str] | None) -> list[str]:
    """Explicit initial peers, else those in $POTLUCK_INITIAL_PEERS (space or comma separated),
    each checked to be a peer's multiaddr (BadRequest naming the option otherwise)."""
    source = "--initial-peers (initial_peers= in Python)" if initial_peers else f"${INITIAL_PEERS_ENV}"
    if isinstance(initial_peers, str):  # one string, as in the environment variable, not a list of them
        initial_peers = initial_peers.replace(",", " ").split()
    peers = list(initial_peers) if initial_peers else os.environ.get(INITIAL_PEERS_ENV, "").replace(",", " ").split()
    for peer in peers:
        check_peer_maddr(peer, source)
    return peers


def require_initial_peers(initial_peers: Sequence[str] | None) -> list[str]:
    """``initial_peers_from_env`` for a command that cannot run alone: none is a BadRequest."""
    peers = initial_peers_from_env(initial_peers)
    if not peers:
        raise BadRequest(f"no initial peers: pass --initial-peers MADDR or set {INITIAL_PEERS_ENV} (the line "
                         "`potluck dht` or `potluck swarm` prints)")
    return peers


def check_peer_maddr(text: str, option: str = "--initial-peers") -> None:
    """A peer's full multiaddr: transport address and /p2p/ peer id, as `potluck dht` prints it."""
    from hivemind.utils.multiaddr import Multiaddr

    try:
        protocols = [p.name for p in Multiaddr(text).protocols()]
    except Exception:  # the multiaddr package raises several types for malformed text
        protocols = []
    if not protocols or protocols[-1] != "p2p" or len(protocols) < 2:
        hint = (f"; {option.split()[0]} takes every word after it: give it after the prompt"
                if option.startswith("--") and not text.startswith("/") else "")
        raise BadRequest(f"{option}: {text[:60]!r} is not a peer's multiaddr; expected the form {MADDR_EXAMPLE} "
                         f"(the address `potluck dht` prints){hint}")


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
                announce_maddrs: Sequence[str] | None = None, public: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``hivemind.P2P.create`` / ``DHTNode.create``: loopback and no UPnP
    unless ``public``, non-loopback ``host_maddrs`` or initial peers beyond loopback say otherwise;
    auto-relay off (``launch_options`` turns it on behind NAT)."""
    if host_maddrs:
        reachable = not all(map(is_loopback, host_maddrs))
        hosts = list(host_maddrs)
    else:
        reachable = public or any(not is_loopback(peer) for peer in initial_peers)
        hosts = [PUBLIC_MADDR if reachable else LOOPBACK_MADDR]
    options: dict[str, Any] = dict(host_maddrs=hosts, nat_port_map=reachable, use_auto_relay=False,
                                   initial_peers=list(initial_peers))
    if announce_maddrs:
        options["announce_maddrs"] = list(announce_maddrs)
    return options


def dialable(maddrs: Sequence[Any]) -> list[str]:
    """Of a peer's visible multiaddrs, those another machine could dial (not loopback)."""
    return [str(m) for m in maddrs if not is_loopback(str(m))]


def relays_of(initial_peers: Sequence[str]) -> list[str]:
    """The initial peers a peer behind NAT reserves relay slots on (those beyond loopback)."""
    return [peer for peer in initial_peers if not is_loopback(peer)]


def relay_addresses(initial_peers: Sequence[str]) -> list[str]:
    """The circuit multiaddrs a peer behind NAT is reached at: one per relay, as
    ``/ip4/RELAY_IP/tcp/PORT/p2p/RELAY_ID/p2p-circuit`` (the dialler adds the peer's own id)."""
    return [f"{peer}/p2p-circuit" for peer in relays_of(initial_peers)]


def _circuit_maddr(text: str) -> Multiaddr:
    """A circuit multiaddr as p2pd reads it: hivemind's Multiaddr writes a /p2p/ id as a CID, which
    the daemon cannot parse, so the relay's id goes in as the multihash p2pd expects."""
    transport, _, rest = text.partition("/p2p/")
    relay_id, _, circuit = rest.partition("/")
    if not transport or circuit != "p2p-circuit":
        raise ValueError(f"{text[:120]!r} is not a relay's circuit multiaddr")
    relay = PeerID.from_base58(relay_id).to_bytes()
    p2p_code, circuit_code = b"\xa5\x03", b"\xa2\x02"  # multicodec varints of /p2p and /p2p-circuit
    return Multiaddr(Multiaddr(transport).to_bytes() + p2p_code + bytes([len(relay)]) + relay + circuit_code)


async def connect_through(p2p: P2P, peer_id: str, relays: Sequence[str]) -> bool:
    """Connect to ``peer_id`` through its relays (circuit multiaddrs from its record); whether the
    daemon connected. A peer already connected costs nothing."""
    try:
        maddrs = [_circuit_maddr(relay) for relay in relays]
        await p2p._client.connect(PeerID.from_base58(peer_id), maddrs)  # hivemind has no public call for it
        return True
    except Exception as e:  # ValueError for a bad address, p2pd's ControlFailure when no relay works
        logger.debug("could not connect to %s through %s: %s", peer_id, relays, e)
        return False


def _p2p_class(**daemon_options: Any) -> type[P2P]:
    """hivemind's P2P, its daemon started with options hivemind does not pass on."""
    def process_args(*args, **kwargs) -> list[str]:
        return P2P._make_process_args(*args, **daemon_options, **kwargs)

    return type("P2P", (P2P,), {"_make_process_args": staticmethod(process_args)})


def launch_options(initial_peers: Sequence[str], host_maddrs: Sequence[str] | None,
                   announce_maddrs: Sequence[str] | None, public: bool, client_mode: bool, relay_service: bool,
                   relay_public: bool, behind_nat: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keyword arguments for ``P2P.create``, p2pd flags hivemind does not pass) of ``join_swarm``."""
    options = p2p_options(initial_peers, host_maddrs, announce_maddrs, public)
    daemon: dict[str, Any] = {"relayService": relay_service}
    if client_mode:
        options["nat_port_map"] = False  # a client dials out; nobody needs to reach it through the router
        options["use_auto_relay"], daemon["relayService"] = False, False
    elif behind_nat and relays_of(initial_peers):
        options.update(use_auto_relay=True, trusted_relays=relays_of(initial_peers), force_reachability="private")
        daemon.update(relayDiscovery=False, relayService=False)
    elif relay_public and relay_service and options["nat_port_map"]:
        options["force_reachability"] = "public"
    return options, daemon


async def join_swarm(initial_peers: Sequence[str], host_maddrs: Sequence[str] | None = None,
                     announce_maddrs: Sequence[str] | None = None, identity_path: str | None = None,
                     client_mode: bool = False, public: bool = False, relay_service: bool = True,
                     relay_public: bool = False, behind_nat: bool = False) -> tuple[P2P, DHTNode]:
    """Start this peer's P2P daemon and DHT node. ``client_mode``: read and store records but serve
    none (clients, the dashboard), run no relay service and reach nodes behind NAT through relays.
    ``relay_service``: relay connections to peers behind NAT. ``relay_public``: the daemon is told
    it is public, so its relay service runs in full (a bootstrap peer others reach). ``behind_nat``:
    other peers cannot dial this one; reserve relay slots on the initial peers. An initial peer
    that cannot be reached raises NodeUnavailable."""
    options, daemon = launch_options(initial_peers, host_maddrs, announce_maddrs, public, client_mode, relay_service,
                                     relay_public, behind_nat)
    for maddr in options["host_maddrs"]:
        _check_port_free(maddr)
    try:
        p2p = await _p2p_class(**daemon).create(identity_path=identity_path, check_if_identity_free=False,
                                                **options)
    except Exception as e:  # hivemind's P2PDaemonError and friends: say what to check
        logger.debug("P2P daemon did not start", exc_info=True)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if initial_peers:
            raise NodeUnavailable(f"cannot reach any of --initial-peers {' '.join(initial_peers)} ({reason}); "
                                  "check that the peer is running and the address is current") from None
        raise NodeUnavailable(f"the P2P daemon did not start ({reason}); check --host-maddrs") from None
    if not options["nat_port_map"] and not client_mode:
        logger.log(logging.DEBUG if initial_peers else logging.INFO,  # with loopback peers, a local swarm is meant
                   "listening on %s only: peers on this machine can connect, others cannot (pass --public to "
                   "change that)", " ".join(options["host_maddrs"]))
    elif options["nat_port_map"]:
        try:
            addresses = dialable(await p2p.get_visible_maddrs())
        except ValueError:  # hivemind: no address at all yet
            addresses = []
        logger.info("listening on %s with UPnP port mapping on (the router may forward a port here); other "
                    "machines reach this peer at %s", " ".join(options["host_maddrs"]),
                    " ".join(addresses) or "no address yet (only loopback; see --announce-maddrs)")
    try:
        validator = NodeRecordValidator(identity_path)  # signs this peer's records, refuses forged ones
        dht = await DHTNode.create(p2p=p2p, initial_peers=options["initial_peers"], client_mode=client_mode,
                                   record_validator=validator)
    except BaseException:
        await p2p.shutdown()
        raise
    return p2p, dht


def _check_port_free(maddr: str) -> None:
    """BadRequest if ``maddr`` names a TCP port that something here already listens on: the daemon
    binds with SO_REUSEPORT, so a second peer on a port would silently share its connections."""
    parts = maddr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp" or parts[3] == "0":
        return
    family = socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart's TIME_WAIT is no listener
        try:
            probe.bind((parts[1], int(parts[3])))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise BadRequest(f"port {parts[3]} of {maddr} is already in use (another peer?); pass another "
                                 "--host-maddrs") from None


async def leave_swarm(p2p: P2P, dht: DHTNode, timeout: float = LEAVE_TIMEOUT) -> None:
    """Stop the DHT node, then the P2P daemon, each waited for at most ``timeout`` seconds: a
    daemon that is already gone (a service manager's SIGTERM reaches the whole process group)
    would otherwise leave the DHT's shutdown waiting forever."""
    await bounded(dht.shutdown(), timeout, "stopping the DHT node", p2p)
    await bounded(p2p.shutdown(), timeout, "stopping the P2P daemon")


async def bounded(work: Awaitable, timeout: float, what: str, p2p: P2P | None = None) -> None:
    """Await ``work`` for at most ``timeout`` seconds (a P2P daemon that died answers nothing, ever);
    past it, or if it fails, say so and go on: for steps of a shutdown. With ``p2p``, work that
    goes through it is given up as soon as its daemon has exited."""
    daemon = getattr(p2p, "_child", None)  # hivemind's handle on the daemon it started
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(daemon.wait()) if daemon is not None else None
    try:
        await asyncio.wait({task} | ({gone} if gone else set()), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in (task, gone):
            if future is not None and not future.done():
                future.cancel()
    if not task.done() or task.cancelled():
        if gone is not None and gone.done():
            logger.debug("%s skipped: the P2P daemon has exited", what)
        else:
            logger.warning("%s took over %.0f s (is the P2P daemon gone?); going on without it", what, timeout)
    elif task.exception() is not None:
        logger.warning("%s failed: %s", what, task.exception())


def daemon_exited(p2p: P2P | None) -> bool:
    """Whether this peer's P2P daemon has exited (a signal to the whole process group reaches it too)."""
    daemon = getattr(p2p, "_child", None)
    return daemon is not None and daemon.returncode is not None


async def wait_for_stop(p2p: P2P, stop: asyncio.Event) -> None:
    """Until ``stop`` is set; NodeUnavailable if this peer's P2P daemon exits first (killed, or it
    crashed): without it the peer reaches no one and no one reaches it, whatever it announced."""
    daemon = getattr(p2p, "_child", None)  # hivemind's handle on the daemon it started
    waits = [asyncio.ensure_future(stop.wait())] + ([asyncio.ensure_future(daemon.wait())] if daemon else [])
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    if not stop.is_set():  # a signal to the whole process group reaches both: then it is a stop, not a loss
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    if not stop.is_set():
        raise NodeUnavailable(f"this peer's P2P daemon stopped (exit code {daemon.returncode}), so no one can "
                              "reach it any more; start it again")
