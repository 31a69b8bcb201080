"""What a node's operator watches: Prometheus metrics (``--metrics-port``) and a status line.

The metrics are read from the node when scraped (a collector, no copies to keep in step): what it
serves, its speed, its sessions and cache, what it has done since it started.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from potluck.protocol.errors import BadRequest

if TYPE_CHECKING:
    from .server import Node

logger = logging.getLogger(__name__)
COUNTERS = {  # servicer counter -> (metric name, help)
    "tokens": ("potluck_node_tokens", "Tokens computed through this node's blocks (steps and pushes)"),
    "steps": ("potluck_node_steps", "Inference steps served"),
    "forwards": ("potluck_node_forwards", "Cache-less forward requests served"),
    "sessions_opened": ("potluck_node_sessions_opened", "Inference sessions opened"),
    "errors": ("potluck_node_errors", "Requests answered with an error"),
    "pushes_sent": ("potluck_node_pushes_sent", "Step outputs handed on to the next node"),
    "decode_batches": ("potluck_node_decode_batches", "Batches of decoding steps run (sessions batched together)"),
    "decode_rows": ("potluck_node_decode_rows", "Decoding steps run in batches (rows / batches = mean batch size)"),
    "prefill_chunks": ("potluck_node_prefill_chunks", "Chunks of longer steps (prompts) run, or batches of short ones"),
    "prefills_together": ("potluck_node_prefills_together", "Short prompts run whole in one pass with others"),
    "graph_passes": ("potluck_node_graph_passes", "Decoding passes replayed from a CUDA graph (--cuda-graphs)"),
    "forward_batches": ("potluck_node_forward_batches", "Batches of cache-less forwards run (forwards / batches)"),
    "streams_timed_out": ("potluck_node_streams_timed_out", "Streams closed for idling or trickling past a timeout"),
    "bundles_received": ("potluck_node_bundles_received", "Frames that carried several messages (sessions' steps)"),
    "hidden_bytes_in": ("potluck_node_hidden_bytes_in",
                        "Bytes of hidden states received in steps, pushes and forwards"),
}


class NodeCollector(Collector):
    def __init__(self, node: "Node"):
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node, servicer = self.node, self.node.servicer
        record = node.record(node.announcer.state)
        info = InfoMetricFamily("potluck_node", "What this node serves")
        info.add_metric([], {"model": record.model, "blocks": f"{record.start}:{record.end}",
                             "state": record.state.value, "dtype": record.dtype, "device": record.device,
                             "quant": record.quant, "version": record.version, "peer_id": node.peer_id,
                             "name": record.public_name})
        yield info
        gauges = [("potluck_node_open_sessions", "Inference sessions open now", record.active_sessions),
                  ("potluck_node_cache_tokens_left", "Attention-cache tokens not reserved by sessions",
                   record.cache_tokens_left),
                  ("potluck_node_cache_tokens", "Attention-cache budget in tokens",
                   node.sessions.cache_tokens if node.sessions else 0),
                  ("potluck_node_inference_steps_per_second", "Announced one-token steps per second",
                   record.inference_steps_per_s),
                  ("potluck_node_forward_tokens_per_second", "Announced forward tokens per second",
                   record.forward_tokens_per_s),
                  ("potluck_node_peers_pinged", "Other nodes this node measured a round trip to", len(record.pings)),
                  ("potluck_node_peers_silent", "Nodes announced ONLINE that did not answer this node's last ping",
                   len(node.silent))]
        for name, help_text, value in gauges:
            yield GaugeMetricFamily(name, help_text, value=value)
        counters = {**(servicer.counters if servicer is not None else {}), **node.compute.counters}
        for key, (name, help_text) in COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=counters.get(key, 0))
        yield CounterMetricFamily("potluck_node_compute_seconds", "Seconds spent computing blocks",
                                  value=node.compute.busy_seconds)
        refusals = CounterMetricFamily("potluck_node_refusals", "Requests refused because a peer reached a limit",
                                       labels=["limit"])
        for limit, count in (servicer.peers.refusals.items() if servicer is not None else ()):
            refusals.add_metric([limit], count)
        yield refusals


def check_metrics_address(port: int, host: str) -> None:
    """Before a node loads anything: BadRequest naming --metrics-port or --metrics-host where the
    metrics could not be served (the address is in use, or is not one of this machine's)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as e:
        raise _unservable(e, port, host) from None


def serve_metrics(node: "Node", port: int, host: str = "127.0.0.1"):
    """Serve ``/metrics`` on ``host:port`` (0: any free port); returns the server (``server_port``)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(NodeCollector(node))
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:  # taken since ``check_metrics_address``
        raise _unservable(e, port, host) from None
    shown = f"[{host}]" if ":" in host else host
    logger.info("metrics at http://%s:%d/metrics", shown, server.server_port)
    return server


def _unservable(error: OSError, port: int, host: str) -> BadRequest:
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        reason = error.strerror if isinstance(error, socket.gaierror) else os.strerror(error.errno)
        return BadRequest(f"--metrics-host {host}: not an address of this machine ({reason})")
    reason = os.strerror(error.errno) if error.errno else str(error)
    return BadRequest(f"--metrics-port {port}: the metrics cannot be served on {host}:{port} ({reason}); pick "
                      "another port (0: any free one)")


def status_line(node: "Node") -> str:
    """One line for the log each period: what the node serves and how busy it is."""
    record = node.record(node.announcer.state)
    counters = node.servicer.counters if node.servicer is not None else {}
    used = (node.sessions.cache_tokens - record.cache_tokens_left) if node.sessions else 0
    total = node.sessions.cache_tokens if node.sessions else 0
    return (f"blocks {record.start}:{record.end} {record.state.value}: {record.active_sessions} sessions open, "
            f"{counters.get('tokens', 0)} tokens served, cache {used}/{total} tokens reserved, "
            f"{len(record.pings)} other nodes pinged" + (f", {len(node.silent)} not answering" if node.silent else ""))
