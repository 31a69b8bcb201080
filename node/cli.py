"""Command lines of the node side: `potluck node`, `potluck dht`, `potluck swarm`."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from potluck.node.limits import Limits
from potluck.protocol.errors import BadRequest, NodeUnavailable
from potluck.protocol.options import COUNT, PORT, POSITIVE, number
from potluck.protocol.records import ANNOUNCE_PERIOD, MAX_NAME_CHARS


def add_commands(commands: argparse._SubParsersAction) -> None:
    node = commands.add_parser("node", help="lend your GPU/CPU: serve a span of a model's blocks")
    node.set_defaults(run=_run_node)
    model = node.add_argument_group("model")
    model.add_argument("model", nargs="?", default=None,
                       help="checkpoint folder or HF id in the local HF cache (default: SmolLM2-135M-Instruct)")
    model.add_argument("--model-name", default=None, help="the model's name in the swarm (default: from MODEL)")
    model.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weights and compute (default: bfloat16 on GPUs, float16 where the card lacks it, "
                            "float32 on CPUs)")
    model.add_argument("--quant", default="none", choices=["none", "int8", "nf4"],
                       help="store the weights in 8 or 4 bits, to hold about 4x or 8x the blocks of float32 "
                            "(2x or 4x of 16-bit); results come close to the model's, not exact, and clients use "
                            "such nodes only if they allow it; needs torchao: pip install torchao==0.18.0 "
                            "(default: none)")
    model.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:N or mps (default: cuda if there is a GPU, else mps, else cpu)")
    model.add_argument("--num-threads", type=COUNT, default=None, help="torch CPU threads (default: torch's choice)")
    model.add_argument("--cuda-graphs", action="store_true",
                       help="GPU nodes: run each decoding pass as a CUDA graph, one launch instead of one per kernel "
                            "(default: off)")

    placement = node.add_argument_group("placement")
    placement.add_argument("--blocks", default=None, metavar="A:B",
                           help="serve blocks A (inclusive) to B (exclusive) (default: the blocks the swarm serves "
                                "least)")
    placement.add_argument("--num-blocks", type=COUNT, default=None, metavar="N",
                           help="without --blocks: take N blocks (default: as many as --max-memory holds)")
    placement.add_argument("--placement-delay", type=number(at_least=0), default=2.0, metavar="S",
                           help="wait up to S seconds at random before choosing blocks, so nodes started "
                                "together spread out (default: 2)")
    placement.add_argument("--balance-period", type=number(at_least=0), default=60.0, metavar="S",
                           help="without --blocks: every S seconds, check whether the swarm needs this node's "
                                "blocks elsewhere more, and move (0: never move; default: 60)")
    placement.add_argument("--balance-quality", type=number(above=0, at_most=1), default=0.75, metavar="Q",
                           help="move only when the weakest block's throughput now is under Q times what it "
                                "would be after the move (0 < Q <= 1; default: 0.75)")
    placement.add_argument("--throughput", type=POSITIVE, default=None, metavar="STEPS_PER_S",
                           help="announce this many one-token steps per second instead of measuring (default: "
                                "measured at the first start, then taken from the cache folder)")

    memory = node.add_argument_group("memory")
    memory.add_argument("--max-memory", type=POSITIVE, default=None, metavar="GIB",
                        help="without --blocks/--num-blocks: memory for weights and cache, in GiB "
                             "(default: 80%% of the free GPU memory, or of the available RAM)")
    memory.add_argument("--cache-tokens", type=COUNT, default=None,
                        help="attention-cache budget in tokens (default: what --cache-gib holds)")
    memory.add_argument("--cache-gib", type=POSITIVE, default=None,
                        help="cache budget in GiB when --cache-tokens is unset (default: half the GPU memory free "
                             "after loading, or 1 GiB on CPUs)")
    memory.add_argument("--max-batch-tokens", type=COUNT, default=8192,
                        help="most tokens accepted in one message (default: 8192)")
    memory.add_argument("--max-batch-sessions", type=COUNT, default=64, metavar="N",
                        help="decoding steps of at most N sessions run as one batch (1: no batching)")
    memory.add_argument("--prefill-chunk", type=COUNT, default=512, metavar="TOKENS",
                        help="run a long prompt this many tokens at a time, so other sessions' decoding steps "
                             "go between its chunks")

    network = node.add_argument_group("network")
    _add_network_args(network)
    network.add_argument("--new-swarm", action="store_true", help="start a new swarm instead of joining one")
    network.add_argument("--announce-period", type=POSITIVE, default=ANNOUNCE_PERIOD,
                         help=f"seconds between announcements (default: {ANNOUNCE_PERIOD:g})")

    limits = node.add_argument_group("what one peer may take (an open swarm: anyone can connect)")
    limits.add_argument("--peer-streams", type=COUNT, default=Limits.streams_per_peer, metavar="N",
                        help="streams one peer may hold open here (default: %(default)d; a client needs one)")
    limits.add_argument("--peer-sessions", type=COUNT, default=Limits.sessions_per_peer, metavar="N",
                        help="sessions one peer may hold open here (a potluck serve holds up to 64)")
    limits.add_argument("--peer-cache-share", type=number(above=0, at_most=1), default=Limits.cache_share_per_peer,
                        metavar="FRACTION",
                        help="share of the cache tokens one peer may reserve")
    limits.add_argument("--peer-request-rate", type=POSITIVE, default=Limits.requests_per_peer_s, metavar="PER_SECOND",
                        help="messages one peer may send a second (default: %(default)g)")
    limits.add_argument("--idle-timeout", type=POSITIVE, default=Limits.idle_timeout, metavar="SECONDS",
                        help="close a stream with no open session that stays silent this long")
    limits.add_argument("--frame-timeout", type=POSITIVE, default=Limits.frame_timeout, metavar="SECONDS",
                        help="close a stream whose message does not arrive within this long (plus 1 s per MiB)")

    # tests of clients' verification only: a node that computes wrong (noise of SCALE x its outputs' RMS)
    limits.add_argument("--test-corrupt-outputs", type=float, default=0.0, metavar="SCALE", help=argparse.SUPPRESS)

    operator = node.add_argument_group("operator")
    operator.add_argument("--public-name", default="", type=public_name,
                          help=f"a name shown to users and on the health page (at most {MAX_NAME_CHARS} characters; "
                               "default: none, the peer id only)")
    operator.add_argument("--drain-timeout", type=number(at_least=0), default=10.0,
                          help="seconds Ctrl-C waits for open sessions before going OFFLINE (default: 10)")
    operator.add_argument("--metrics-port", type=PORT, default=None, metavar="PORT",
                          help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; "
                               "default: off)")
    operator.add_argument("--metrics-host", default="127.0.0.1",
                          help="address the metrics listen on (default: 127.0.0.1; 0.0.0.0 for other machines)")

    dht = commands.add_parser("dht", help="run a bootstrap peer; prints POTLUCK_INITIAL_PEERS=... once it listens")
    _add_network_args(dht)
    dht.set_defaults(run=_run_dht)

    swarm = commands.add_parser("swarm", help="start a bootstrap peer and N nodes on loopback")
    swarm.add_argument("model", nargs="?", default=None,
                       help="checkpoint folder or HF id (default: SmolLM2-135M-Instruct)")
    swarm.add_argument("--nodes", type=COUNT, default=3, help="how many nodes split the blocks evenly")
    swarm.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="the nodes' dtype (default: each node's own, as for potluck node)")
    swarm.add_argument("--model-name", default=None, help="the model's name in the swarm (default: from MODEL)")
    swarm.add_argument("--announce-period", type=POSITIVE, default=ANNOUNCE_PERIOD,
                       help="seconds between the nodes' announcements")
    swarm.add_argument("--node-arg", action="append", default=[], help="extra argument for every node, written with = "
                       "(--node-arg=--num-threads=2; repeatable; default: none)")
    swarm.set_defaults(run=_run_swarm)


def _add_network_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs of peers to join through (default: $POTLUCK_INITIAL_PEERS)")
    parser.add_argument("--host-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="addresses to listen on, e.g. /ip4/0.0.0.0/tcp/31337 for a fixed port to forward "
                             "(default: 127.0.0.1, or 0.0.0.0 with --public or initial peers beyond loopback)")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="addresses other peers should dial (behind port forwarding; default: the ones it "
                             "listens on, and those UPnP maps)")
    parser.add_argument("--public", action="store_true",
                        help="listen on every interface with UPnP port mapping, so other machines can connect "
                             "(default: loopback only, unless --initial-peers or --host-maddrs are beyond loopback)")
    parser.add_argument("--no-relay-service", dest="relay_service", action="store_false",
                        help="do not run the full relay service for peers behind NAT that list this peer as an "
                             "initial peer (by default one that others can reach does, so volunteers behind home "
                             "routers can serve); p2pd still runs libp2p's small default relay, which cuts a "
                             "relayed connection after 128 KiB or 2 minutes")
    parser.add_argument("--identity-path", default=None,
                        help="private key file behind the peer id (default: one kept per name in the cache folder, "
                             "so a restart is the same peer)")


def _parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise BadRequest(f"--blocks must look like A:B, got {text!r}") from None
    if not 0 <= start < end:
        raise BadRequest(f"--blocks {text}: need 0 <= A < B")
    return start, end


async def _run_node(args: argparse.Namespace, stop: asyncio.Event) -> int:
    import torch

    from potluck.protocol.network import initial_peers_from_env, p2p_options, wait_for_stop

    from .server import Node, NodeConfig

    initial_peers = initial_peers_from_env(args.initial_peers)
    if not initial_peers and not args.new_swarm:
        raise BadRequest("no initial peers: pass --initial-peers or set POTLUCK_INITIAL_PEERS "
                         "(or --new-swarm to start a new swarm)")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    start, end = _parse_blocks(args.blocks) if args.blocks else (None, None)
    config = NodeConfig(
        model=args.model, start=start, end=end, num_blocks=args.num_blocks, max_memory_gib=args.max_memory,
        placement_delay=args.placement_delay, balance_period=args.balance_period,
        balance_quality=args.balance_quality, throughput=args.throughput, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, initial_peers=initial_peers, public_name=args.public_name,
        dtype=args.dtype, quant=args.quant, device=args.device, cuda_graphs=args.cuda_graphs,
        model_name=args.model_name, host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
        announce_period=args.announce_period, cache_tokens=args.cache_tokens, cache_gib=args.cache_gib,
        max_batch_tokens=args.max_batch_tokens, prefill_chunk=args.prefill_chunk,
        max_batch_sessions=args.max_batch_sessions, drain_timeout=args.drain_timeout,
        identity_path=args.identity_path, public=args.public, relay_service=args.relay_service,
        peer_limits=Limits(streams_per_peer=args.peer_streams, sessions_per_peer=args.peer_sessions,
                           cache_share_per_peer=args.peer_cache_share,
                           idle_timeout=args.idle_timeout, frame_timeout=args.frame_timeout,
                           requests_per_peer_s=args.peer_request_rate),
        corrupt_outputs=args.test_corrupt_outputs,
    )
    starting = asyncio.create_task(Node.create(config))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # Ctrl-C while joining, loading or measuring: stop now, never ONLINE
        logging.getLogger(__name__).info("stopping before going ONLINE")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return 130
    stopping.cancel()
    node = starting.result()
    if not initial_peers:  # a new swarm: say how others join it
        from .bootstrap import print_join_address

        await print_join_address(node.p2p, p2p_options([], args.host_maddrs, public=args.public)["nat_port_map"],
                                 "a new swarm")
    drain = True
    try:
        await wait_for_stop(node.p2p, stop)
    except NodeUnavailable:  # its P2P daemon is gone: no session can finish, leave at once
        drain = False
        raise
    finally:
        await node.shutdown(drain=drain)
    return 0


async def _run_dht(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from potluck.protocol.network import initial_peers_from_env

    from .bootstrap import run_bootstrap

    await run_bootstrap(initial_peers_from_env(args.initial_peers), args.host_maddrs, args.announce_maddrs,
                        args.identity_path, args.public, stop, args.relay_service)
    return 0


async def _run_swarm(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from .swarm import SwarmConfig, run_swarm

    config = SwarmConfig(model=args.model, nodes=args.nodes, dtype=args.dtype, model_name=args.model_name,
                         announce_period=args.announce_period, node_args=tuple(args.node_arg))
    return await run_swarm(config, stop)


def public_name(text: str) -> str:
    if len(text) > MAX_NAME_CHARS or not text.isprintable():
        raise argparse.ArgumentTypeError(f"give at most {MAX_NAME_CHARS} printable characters")
    return text
