"""Pure functions from a ``SwarmState`` to what the dashboard serves: the JSON state and the
Prometheus text. No network here; ``synthetic_state`` makes a fake swarm for tests and the bench.
"""
from __future__ import annotations

import random
import time
from typing import Any

from potluck.protocol.records import ModelInfo, NodeRecord, NodeState

from .crawler import NodeView, SwarmState

SCHEMA_VERSION = 1
STATUSES = ("online", "joining", "draining", "offline", "unreachable", "stale")


def status(view: NodeView) -> str:
    """The one word the page shows: the record's state, unless it expired or the node does not answer
    (a DRAINING node that stops answering has left as it said it would: offline)."""
    if view.stale:
        return "stale"
    if view.reachable is False:
        leaving = view.record.state in (NodeState.DRAINING, NodeState.OFFLINE)
        return "offline" if leaving else "unreachable"
    return view.record.state.value


def block_counts(info: ModelInfo, views: dict[str, NodeView]) -> list[dict[str, int]]:
    """Per block: live ONLINE nodes holding it, and JOINING ones (shown striped)."""
    online, joining = [0] * (info.num_blocks + 1), [0] * (info.num_blocks + 1)
    for view in views.values():  # difference arrays: O(nodes + blocks), not O(nodes x span)
        if view.live:
            counts = online
        elif view.record.state == NodeState.JOINING and not view.stale:
            counts = joining
        else:
            continue
        counts[min(view.record.start, info.num_blocks)] += 1
        counts[min(view.record.end, info.num_blocks)] -= 1
    blocks, live, coming = [], 0, 0
    for i in range(info.num_blocks):
        live, coming = live + online[i], coming + joining[i]
        blocks.append({"online": live, "joining": coming})
    return blocks


def missing_spans(blocks: list[dict[str, int]]) -> list[list[int]]:
    """[start, end) runs of blocks with no live node."""
    spans: list[list[int]] = []
    for i, block in enumerate(blocks):
        if block["online"] == 0:
            if spans and spans[-1][1] == i:
                spans[-1][1] = i + 1
            else:
                spans.append([i, i + 1])
    return spans


def options_needed(info: ModelInfo, views: dict[str, NodeView]) -> list[str] | None:
    """The client options a chain through every block needs: [] for none (a default client keeps
    a chain to one dtype and to exact weights), else ``--mix-dtypes`` and/or ``--allow-quantized``;
    None when some block has no live node at all."""
    live = [view.record for view in views.values() if view.live]
    exact = [record for record in live if record.quant == "none"]
    if _in_one_dtype(info.num_blocks, exact):
        return []
    if _covers(info.num_blocks, exact):
        return ["--mix-dtypes"]
    if _in_one_dtype(info.num_blocks, live):
        return ["--allow-quantized"]
    if _covers(info.num_blocks, live):
        return ["--mix-dtypes", "--allow-quantized"]
    return None


def _in_one_dtype(num_blocks: int, records) -> bool:
    return any(_covers(num_blocks, [r for r in records if r.dtype == dtype]) for dtype in {r.dtype for r in records})


def _covers(num_blocks: int, records) -> bool:
    """Whether the records' spans hold every block between them."""
    reach = 0  # blocks 0:reach are held
    for start, end in sorted((r.start, r.end) for r in records):
        if start > reach:
            return False
        reach = max(reach, end)
    return reach >= num_blocks


def node_json(view: NodeView, now: float) -> dict[str, Any]:
    record = view.record
    pings = sorted(record.pings.items(), key=lambda item: item[1])
    return {
        "peer_id": view.peer_id, "name": record.public_name, "start": record.start, "end": record.end,
        "state": record.state.value, "status": status(view), "stale": view.stale, "reachable": view.reachable,
        "inference_steps_per_s": record.inference_steps_per_s, "forward_tokens_per_s": record.forward_tokens_per_s,
        "cache_tokens_left": record.cache_tokens_left, "active_sessions": record.active_sessions,
        "dtype": record.dtype, "quant": record.quant, "device": record.device, "version": record.version,
        "reachability": record.reachability or "local",
        "connection": None if view.relayed is None else "relayed" if view.relayed else "direct",
        "age_s": None if view.refreshed_at is None else round(max(0.0, now - view.refreshed_at), 3),
        "expires_in_s": round(view.expires_at - now, 3), "tokens_served": view.tokens_served,
        "ping_s": None if view.reachable is False else view.ping_s,  # not an old figure for a silent node
        "pings": [{"peer_id": peer, "rtt_s": rtt} for peer, rtt in pings],
    }


def model_json(info: ModelInfo, views: dict[str, NodeView], now: float) -> dict[str, Any]:
    blocks = block_counts(info, views)
    ordered = sorted(views.values(), key=lambda v: (v.record.start, v.record.end, v.record.public_name, v.peer_id))
    replicas = {"0": 0, "1": 0, "2+": 0}
    for block in blocks:
        replicas["0" if block["online"] == 0 else "1" if block["online"] == 1 else "2+"] += 1
    missing, needed = missing_spans(blocks), options_needed(info, views)
    return {"name": info.name, "family": info.family, "num_blocks": info.num_blocks, "hidden_size": info.hidden_size,
            "usable": needed == [], "usable_with": needed, "missing_blocks": missing, "replicas": replicas,
            "blocks": blocks,
            "nodes": [node_json(view, now) for view in ordered]}


def state_json(state: SwarmState) -> dict[str, Any]:
    """The document served at /api/v1/state (its schema is in the README). Ages and expiry times
    are as of ``updated_at``, so the document changes only when the state does (and is cached)."""
    now = state.updated_at if state.updated_at is not None else time.time()
    models = [model_json(info, state.nodes.get(name, {}), now) for name, info in state.models.items()]
    by_status = dict.fromkeys(STATUSES, 0)
    peers: set[str] = set()
    tokens: dict[str, int] = {}  # peer id -> tokens it served (a node serving two models counts once)
    for model in models:
        for node in model["nodes"]:
            by_status[node["status"]] += 1
            if node["status"] != "stale":
                peers.add(node["peer_id"])
            if node["tokens_served"] is not None:
                tokens[node["peer_id"]] = node["tokens_served"]
    totals = {
        "models": len(models), "models_usable": sum(m["usable"] for m in models), "nodes": len(peers),
        "nodes_by_status": by_status, "blocks": sum(m["num_blocks"] for m in models),
        "blocks_covered": sum(m["num_blocks"] - m["replicas"]["0"] for m in models),
        "tokens_served": sum(tokens.values()) if tokens else None,
    }
    crawl = {"period_s": state.period, "duration_s": round(state.crawl_seconds, 6),
             "probe_s": round(state.probe_seconds, 6), "crawls": state.crawls, "failures": state.failures,
             "last_error": state.last_error or None, "records_rejected": state.records_rejected}
    return {"schema_version": SCHEMA_VERSION, "updated_at": state.updated_at, "crawl": crawl, "totals": totals,
            "models": models}


# --- Prometheus text format 0.0.4 ----------------------------------------------------------------

_NODE_GAUGES = (  # metric name, help, value of a node view (None: no sample)
    ("potluck_node_inference_steps_per_second", "One-token steps per second through the node's whole span",
     lambda v: v.record.inference_steps_per_s),
    ("potluck_node_forward_tokens_per_second", "Tokens per second of a long forward through the node's span",
     lambda v: v.record.forward_tokens_per_s),
    ("potluck_node_cache_tokens_left", "Attention-cache tokens the node has not reserved",
     lambda v: v.record.cache_tokens_left),
    ("potluck_node_active_sessions", "Inference sessions open on the node", lambda v: v.record.active_sessions),
    ("potluck_node_ping_seconds", "Info round trip from the dashboard to the node",
     lambda v: None if v.reachable is False else v.ping_s),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _family(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {float(value)!r}" for labels, value in samples]


def metrics_text(state: SwarmState) -> str:
    """The text served at /metrics."""
    lines: list[str] = []
    nodes, blocks, usable = [], [], []
    per_node: list[tuple[str, NodeView]] = []
    for name, info in state.models.items():
        views = state.nodes.get(name, {})
        counts = dict.fromkeys(STATUSES, 0)
        for view in views.values():
            counts[status(view)] += 1
            if not view.stale:
                per_node.append((name, view))
        nodes += [(_labels(model=name, status=s), n) for s, n in counts.items()]
        online = [block["online"] for block in block_counts(info, views)]
        replicas = {"0": online.count(0), "1": online.count(1), "2+": sum(n >= 2 for n in online)}
        blocks += [(_labels(model=name, replicas=r), n) for r, n in replicas.items()]
        usable.append((_labels(model=name), int(options_needed(info, views) == [])))
    _family(lines, "potluck_nodes", "gauge", "Node records by model and status (stale: expired, still shown)", nodes)
    _family(lines, "potluck_blocks", "gauge", "Blocks by model and number of live ONLINE nodes holding them", blocks)
    _family(lines, "potluck_model_usable", "gauge", "1 if a client with default options can run the model: every "
            "block has a live ONLINE node with exact weights, in one dtype", usable)
    for metric, help_text, value in _NODE_GAUGES:
        samples = [(_node_labels(m, v), value(v)) for m, v in per_node if value(v) is not None]
        _family(lines, metric, "gauge", help_text, samples)
    served = [(_node_labels(m, v), v.tokens_served) for m, v in per_node if v.tokens_served is not None]
    _family(lines, "potluck_node_tokens_served_total", "counter", "Tokens the node has computed since it started",
            served)
    _family(lines, "potluck_crawl_duration_seconds", "gauge", "Duration of the last successful DHT read",
            [("", state.crawl_seconds)])
    _family(lines, "potluck_probe_duration_seconds", "gauge", "Duration of the last round of info probes",
            [("", state.probe_seconds)])
    _family(lines, "potluck_crawls_total", "counter", "Successful DHT reads", [("", state.crawls)])
    _family(lines, "potluck_crawl_failures_total", "counter", "Failed or timed-out DHT reads", [("", state.failures)])
    _family(lines, "potluck_records_rejected_total", "counter", "Node records refused: unsigned, forged or altered",
            [("", state.records_rejected)])
    if state.updated_at is not None:
        _family(lines, "potluck_state_updated_timestamp_seconds", "gauge", "Time of the last successful DHT read",
                [("", state.updated_at)])
    return "\n".join(lines) + "\n"


def _node_labels(model: str, view: NodeView) -> str:
    return _labels(model=model, peer_id=view.peer_id, name=view.record.public_name)


# --- a fake data source --------------------------------------------------------------------------

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def synthetic_state(nodes: int = 1000, models: int = 4, num_blocks: int = 80, seed: int = 0) -> SwarmState:
    """A made-up swarm of ``nodes`` records over ``models`` models: mostly ONLINE, a few joining,
    draining, unreachable and stale, with pings between neighbours. For tests and the bench only."""
    rng, now = random.Random(seed), time.time()
    infos = {f"synthetic-{i}": ModelInfo(f"synthetic-{i}", num_blocks, "llama", 4096) for i in range(models)}
    views: dict[str, dict[str, NodeView]] = {name: {} for name in infos}
    for i in range(nodes):
        model = f"synthetic-{i % models}"
        peer_id = "12D3KooW" + "".join(rng.choice(_BASE58) for _ in range(44))
        start = rng.randrange(num_blocks)
        end = min(num_blocks, start + rng.randint(4, 24))
        state = rng.choices(list(NodeState), weights=[3, 90, 3, 4])[0]
        peers = list(views[model])[-8:]
        record = NodeRecord(model=model, start=start, end=end, state=state, public_name=f"volunteer-{i:04d}",
                            version="0.1.0", dtype=rng.choice(["float32", "bfloat16"]),
                            inference_steps_per_s=rng.uniform(5, 200), forward_tokens_per_s=rng.uniform(200, 8000),
                            cache_tokens_left=rng.randrange(0, 200_000), active_sessions=rng.randrange(0, 8),
                            pings={p: rng.uniform(0.001, 0.2) for p in peers})
        stale, failing = rng.random() < 0.02, rng.random() < 0.02
        views[model][peer_id] = NodeView(
            peer_id, record, expires_at=now + (-10 if stale else rng.uniform(5, 37)),
            refreshed_at=now - rng.uniform(0, 15), stale=stale, ping_s=None if failing else rng.uniform(0.001, 0.3),
            probe_failures=3 if failing else 0, probed=True, tokens_served=rng.randrange(0, 10**7),
            relayed=rng.random() < 0.1)
    return SwarmState(models=infos, nodes=views, updated_at=now, crawl_seconds=0.05, probe_seconds=0.4, crawls=1,
                      period=5.0)
