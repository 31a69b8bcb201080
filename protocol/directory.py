"""Reading the swarm's records from the DHT: the model index and the node records of each block.

Shared by every reader (clients, nodes measuring pings, the local swarm launcher, the health
dashboard). One batched ``get_many`` reads all blocks of a model; malformed or foreign records are
skipped, not trusted (forged ones never get here: ``signing``), and so are nodes that speak another
protocol version (one log line each); of a node's records under several blocks the latest-expiring
one counts.
"""
from __future__ import annotations

import logging
from typing import Any

from hivemind.dht.node import DHTNode

from .records import PROTOCOL_VERSION, ModelInfo, NodeRecord, block_key, unpack_model_info, unpack_node_record
from .signing import names_a_peer

logger = logging.getLogger(__name__)
_skipped: set[str] = set()  # peers already reported as speaking another protocol


Found = dict[str, dict[str, tuple[NodeRecord, float]]]  # model -> peer id -> (record, its expiration time)


async def read_block_records(dht: DHTNode, model: str, num_blocks: int, config_id: str = "") -> dict[str, NodeRecord]:
    """The latest record of every node serving some block of ``model``, by peer id (base58);
    with ``config_id``, not those of nodes whose checkpoint has another shape (another model
    under the same name)."""
    entries = await dht.get_many(block_keys(model, num_blocks), sufficient_expiration_time=float("inf"))
    found = parse_entries(entries, {model: num_blocks}).get(model, {})
    return {peer_id: record for peer_id, (record, _) in found.items()
            if not (config_id and record.config_id and record.config_id != config_id)}


def block_keys(model: str, num_blocks: int) -> list[str]:
    return [block_key(model, block) for block in range(num_blocks)]


def parse_index(entry: Any) -> dict[str, ModelInfo]:
    """The model index from a DHT answer: name -> ModelInfo. Each node signs its own entry; where
    nodes describe one model differently, most of them win (then the latest to expire). Entries
    not under a peer id (unsigned) or malformed are skipped."""
    claims: dict[str, dict[ModelInfo, tuple[int, float]]] = {}  # name -> info -> (nodes, latest expiration)
    for subkey, (raw, expiration) in _subkey_items(entry).items():
        info = unpack_model_info(raw)
        if info is None or not names_a_peer(subkey):
            continue
        nodes, latest = claims.setdefault(info.name, {}).get(info, (0, float("-inf")))
        claims[info.name][info] = (nodes + 1, max(latest, expiration))
    return {name: max(infos, key=infos.__getitem__) for name, infos in claims.items()}


def parse_entries(entries: dict[str, Any], blocks: dict[str, int]) -> Found:
    """model -> peer id -> (latest valid record, its expiration) from a ``get_many`` answer over the
    block keys of ``blocks`` (model -> number of blocks); a record that is malformed, of another
    model or past the model's end is skipped."""
    found: Found = {}
    for model, num_blocks in blocks.items():
        records: dict[str, tuple[NodeRecord, float]] = {}
        for key in block_keys(model, num_blocks):
            for peer_id, (raw, expiration) in _subkey_items(entries.get(key)).items():
                record = unpack_node_record(raw)
                if record is None or record.model != model or record.end > num_blocks:
                    logger.debug("skipping a malformed record of %s under %s", peer_id, key)
                    continue
                if record.protocol != PROTOCOL_VERSION:
                    _skip_once(peer_id, record)
                    continue
                if peer_id not in records or expiration > records[peer_id][1]:
                    records[peer_id] = (record, expiration)
        if records:
            found[model] = records
    return found


def _skip_once(peer_id: str, record: NodeRecord) -> None:
    if peer_id not in _skipped:
        _skipped.add(peer_id)
        logger.warning("skipping node %s (%s, Potluck %s): it speaks protocol %d, this peer %d; one of you "
                       "should upgrade", peer_id, record.public_name or "unnamed", record.version or "?",
                       record.protocol, PROTOCOL_VERSION)


def _subkey_items(entry: Any) -> dict[str, tuple[Any, float]]:
    """{subkey: (raw value, expiration)} of a dictionary DHT value; {} for anything else."""
    if entry is None or not hasattr(entry.value, "items"):
        return {}
    return {str(subkey): (item.value, item.expiration_time) for subkey, item in entry.value.items()}
