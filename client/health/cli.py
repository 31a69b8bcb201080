"""`potluck health`: join the swarm as a client, crawl it, and serve the dashboard."""
from __future__ import annotations

import argparse
import asyncio
import logging

from potluck.protocol.options import PORT, POSITIVE

logger = logging.getLogger(__name__)


def add_commands(commands: argparse._SubParsersAction) -> None:
    health = commands.add_parser("health", help="a live web dashboard, JSON API and Prometheus metrics of the swarm")
    health.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs of peers to join through (default: $POTLUCK_INITIAL_PEERS)")
    health.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    health.add_argument("--port", type=PORT, default=8600, help="port to serve on; 0 picks a free one")
    health.add_argument("--refresh", type=POSITIVE, default=5.0, help="seconds between crawls of the swarm")
    health.add_argument("--crawl-timeout", type=POSITIVE, default=10.0,
                        help="seconds a DHT read may take before the last good view is kept")
    health.add_argument("--probe-timeout", type=POSITIVE, default=2.0,
                        help="seconds a node may take to answer the dashboard's info request")
    health.add_argument("--forget-after", type=POSITIVE, default=300.0,
                        help="seconds an expired (stale) record stays on the page")
    health.set_defaults(run=_run_health)


async def _run_health(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from potluck.protocol.errors import BadRequest
    from potluck.protocol.network import require_initial_peers

    from ..transport import SwarmConnection
    from .crawler import CrawlSettings, Crawler
    from .server import HealthServer

    settings = CrawlSettings(period=args.refresh, timeout=args.crawl_timeout, probe_timeout=args.probe_timeout,
                             forget_after=args.forget_after)
    swarm = await asyncio.to_thread(SwarmConnection, require_initial_peers(args.initial_peers))
    server = None
    try:
        crawler = Crawler(swarm, settings)
        await asyncio.to_thread(crawler.start)
        try:
            server = await HealthServer.create(lambda: crawler.state, args.host, args.port)
        except OSError as e:
            raise BadRequest(f"cannot serve on {args.host}:{args.port} ({e.strerror or e}): pass another --port "
                             f"or --host") from None
        print(f"POTLUCK_HEALTH_URL={server.url}", flush=True)
        logger.info("dashboard at %s (JSON at /api/v1/state, Prometheus at /metrics); crawling every %.0f s",
                    server.url, settings.period)
        await stop.wait()
    finally:
        if server is not None:
            await server.close()
        await asyncio.to_thread(swarm.close)
    return 0
