"""Reading the swarm's records from the DHT: the model index and the node records of each block.

Shared by every reader (clients, the local swarm launcher, the health dashboard). One batched
``get_many`` reads all blocks of a model; malformed or foreign records are skipped, not trusted.
"""
from __future__ import annotations

import logging
from typing import Any

from hivemind.dht.node import DHTNode

from .records import MODEL_INDEX_KEY, ModelInfo, NodeRecord, block_key, unpack_model_info, unpack_node_record

logger = logging.getLogger(__name__)


def _subkey_values(entry: Any) -> dict[str, Any]:
    """{subkey: raw value} of a dictionary DHT value (None or a non-dictionary value gives {})."""
    if entry is None or not hasattr(entry.value, "items"):
        return {}
    return {str(subkey): item.value for subkey, item in entry.value.items()}


async def read_models(dht: DHTNode) -> dict[str, ModelInfo]:
    """Every model announced in the swarm, by name."""
    found = await dht.get(MODEL_INDEX_KEY, latest=True)
    models = {}
    for name, raw in _subkey_values(found).items():
        info = unpack_model_info(raw)
        if info is not None and info.name == name:
            models[name] = info
    return models


async def read_block_records(dht: DHTNode, model: str, num_blocks: int) -> dict[str, NodeRecord]:
    """The latest record of every node serving some block of ``model``, by peer id (base58)."""
    keys = [block_key(model, i) for i in range(num_blocks)]
    found = await dht.get_many(keys, sufficient_expiration_time=float("inf"))
    records: dict[str, NodeRecord] = {}
    for key in keys:
        for peer_id, raw in _subkey_values(found.get(key)).items():
            record = unpack_node_record(raw)
            if record is None or record.model != model or record.end > num_blocks:
                logger.debug("skipping a malformed record of %s under %s", peer_id, key)
                continue
            records[peer_id] = record
    return records
