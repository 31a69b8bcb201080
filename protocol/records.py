"""What nodes announce on the DHT, and under which keys.

Keys: ``{model}.{block}`` holds one subkey per node (its peer id in base58) whose value is a
packed ``NodeRecord``; ``MODEL_INDEX_KEY`` holds one subkey per node (its peer id, so the entry is
signed like its record) with the ``ModelInfo`` of the model it serves, so a swarm can serve several
models. Records are frozen dataclasses packed with msgpack; unpacking
ignores unknown fields (old and new peers read each other) and rejects records of the wrong shape.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

MODEL_INDEX_KEY = "_potluck.models"
ANNOUNCE_PERIOD = 15.0  # seconds between re-announcements of a node record
RECORD_TTL_PERIODS = 2.5  # a record expires this many periods after it was stored
MAX_RECORD_BYTES = 16 * 1024
MAX_BLOCKS = 4096  # most blocks a model may claim (a reader reads one DHT key per block)
MAX_RELAYS, MAX_RELAY_CHARS = 8, 300  # circuit addresses a record may name, and their length
MAX_NAME_CHARS = 64  # of a public name, as shown to others
PROTOCOL_VERSION = 2  # what the RPCs mean; 2: sessions share a stream per node and messages travel in bundles


class NodeState(enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


def block_key(model: str, block: int) -> str:
    return f"{model}.{block}"


@dataclass(frozen=True)
class ModelInfo:
    """What a client needs to know about a model before it routes through the swarm."""

    name: str  # the name used in DHT keys
    num_blocks: int
    family: str  # config.model_type, e.g. "llama"
    hidden_size: int


@dataclass(frozen=True)
class NodeRecord:
    """One node's announcement for one model, stored under each block key it serves."""

    model: str
    start: int  # first block served
    end: int  # one past the last block served
    state: NodeState
    public_name: str = ""
    version: str = ""
    dtype: str = "float32"  # what the node computes in
    quant: str = "none"  # its weights in 8 or 4 bits ("int8", "nf4"): close to the model, not exact
    device: str = "cpu"  # the kind of device it computes on: cpu, cuda or mps
    inference_steps_per_s: float = 0.0  # one-token steps through the whole span, measured at start
    forward_tokens_per_s: float = 0.0  # tokens/s of a long forward through the whole span
    cache_tokens_left: int = 0  # attention-cache tokens not yet reserved by sessions
    active_sessions: int = 0  # inference sessions open when the record was stored
    max_batch_tokens: int = 0  # largest hidden-state message (batch x length) it accepts
    pings: dict[str, float] = field(default_factory=dict)  # peer id -> round trip in seconds
    protocol: int = 1  # the node's PROTOCOL_VERSION (records from before it existed say nothing: 1)
    reachability: str = ""  # "direct", "relayed" (not reachable directly) or "unknown"; "" in loopback swarms
    relays: tuple[str, ...] = ()  # circuit multiaddrs a node others cannot dial is reached at
    config_id: str = ""  # its checkpoint's shape (``checkpoint.config_id``): two models under one name differ here

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end

    def holds(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "start": (int,),
    "end": (int,),
    "state": (str,),
    "public_name": (str,),
    "version": (str,),
    "dtype": (str,),
    "quant": (str,),
    "device": (str,),
    "inference_steps_per_s": (int, float),
    "forward_tokens_per_s": (int, float),
    "cache_tokens_left": (int,),
    "active_sessions": (int,),
    "max_batch_tokens": (int,),
    "pings": (dict,),
    "protocol": (int,),
    "reachability": (str,),
    "relays": (list, tuple),
    "config_id": (str,),
}


def pack(record: NodeRecord | ModelInfo) -> bytes:
    fields = dataclasses.asdict(record)
    if isinstance(record, NodeRecord):
        fields["state"] = record.state.value
    return msgpack.packb(fields, use_bin_type=True)


def shown_name(name: str) -> str:
    """A peer's public name as it may reach a terminal or a log: control characters (a newline
    that forges output lines, an escape sequence) written as escapes, at most MAX_NAME_CHARS."""
    name = name[:MAX_NAME_CHARS]
    return name if name.isprintable() else "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)


def unpack_node_record(data: Any) -> NodeRecord | None:
    """Decode a node record from the DHT; None if it is not one (never raises on bad input)."""
    fields = _unpack_dict(data)
    if fields is None:
        return None
    known = {k: v for k, v in fields.items() if k in _FIELD_TYPES}
    for name, value in known.items():
        if not isinstance(value, _FIELD_TYPES[name]) or isinstance(value, bool):
            return None
    try:
        known["state"] = NodeState(known["state"])
        known["pings"] = {str(k): float(v) for k, v in known.get("pings", {}).items()}
        relays = known.get("relays", ())
        if len(relays) > MAX_RELAYS or not all(isinstance(r, str) and len(r) <= MAX_RELAY_CHARS for r in relays):
            return None
        known["relays"] = tuple(relays)
        known["public_name"] = shown_name(known.get("public_name", ""))
        record = NodeRecord(**known)
    except (KeyError, TypeError, ValueError):
        return None
    if not 0 <= record.start < record.end:
        return None
    return record


def unpack_model_info(data: Any) -> ModelInfo | None:
    fields = _unpack_dict(data)
    if fields is None:
        return None
    try:
        info = ModelInfo(**{f.name: fields[f.name] for f in dataclasses.fields(ModelInfo)})
    except KeyError:
        return None
    types_ok = isinstance(info.name, str) and isinstance(info.family, str)
    types_ok = types_ok and isinstance(info.num_blocks, int) and isinstance(info.hidden_size, int)
    return info if types_ok and 0 < info.num_blocks <= MAX_BLOCKS else None


def _unpack_dict(data: Any) -> dict | None:
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        return None
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError):
        return None
    return fields if isinstance(fields, dict) else None
