"""The RPC messages and their wire format.

Every message is one frame on a libp2p stream: a 4-byte big-endian length, then a hivemind
``runtime_pb2.ExpertRequest`` whose ``metadata`` is a msgpack map and whose ``tensors`` are
hivemind tensor messages. A frame is checked against its size limit before it is read, and its
metadata against the request schemas below before anything acts on it; a bad frame raises a
``BadRequest`` subclass and changes nothing. Nothing here unpickles or evaluates peer data.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import msgpack
import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from .errors import BadRequest, MessageTooLarge, NodeUnavailable, PotluckError, ProtocolViolation
from .network import connect_through

INFERENCE_HANDLER = "potluck.inference"  # a stream: open, then steps, then close
FORWARD_HANDLER = "potluck.forward"  # a stream: one forward request, one answer
INFO_HANDLER = "potluck.info"  # a stream: one info request, one answer
PUSH_HANDLER = "potluck.push"  # a stream between nodes: step outputs handed to the next node

HEADER_BYTES = 4
MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_METADATA_BYTES = 64 * 1024
MAX_TENSORS = 4
MAX_TENSOR_DIMS = 4
MAX_POSITION = 2**24
MAX_NEXT_HOPS = 64
LINGER_S = 2.0  # how long a stream that has answered waits for the peer to close it first
REFUSED_LINGER_S = 1.0  # the same after a refusal that ends the stream (what the peer sends is dropped); 0.1 s
# lost 84 of 296 refusals once, when a peer's 256 idle streams timed out together on a loaded machine
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,64}$")  # base58
_TENSOR_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}
_COMPRESSIONS = {runtime_pb2.CompressionType.NONE, runtime_pb2.CompressionType.FLOAT16}


@dataclass(frozen=True)
class Frame:
    meta: dict[str, Any]
    tensors: tuple[torch.Tensor, ...] = ()
    sane: bool = False  # its tensors' values are known to pass ``values_sane`` (checked for a whole bundle)


def values_sane(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every float tensor is finite and every integer one lies in [0, MAX_POSITION): what
    the tensors of steps and answers hold. Checked once for a bundle's tensors, it spares each part
    its own checks (three small operations per part and tensor add up at 32 parts a bundle)."""
    for tensor in tensors:
        if tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                return False
        elif tensor.numel() and not (0 <= int(tensor.min()) and int(tensor.max()) < MAX_POSITION):
            return False
    return True


def encode_frame(meta: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> bytes:
    message = runtime_pb2.ExpertRequest(
        metadata=msgpack.packb(meta, use_bin_type=True),
        tensors=[_encode_tensor(t.detach().cpu()) for t in tensors],
    )
    payload = message.SerializeToString()
    return len(payload).to_bytes(HEADER_BYTES, "big") + payload


async def write_frame(writer: asyncio.StreamWriter, meta: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> None:
    writer.write(encode_frame(meta, tensors))
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Read one frame; raises ``asyncio.IncompleteReadError`` when the peer closed the stream."""
    length = int.from_bytes(await reader.readexactly(HEADER_BYTES), "big")
    if length > max_bytes:
        raise MessageTooLarge(f"frame of {length} bytes is over this peer's limit of {max_bytes}")
    return decode_payload(await reader.readexactly(length))


async def end_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, linger: float = LINGER_S) -> None:
    """Close a stream this side has answered on, once the peer has closed its side (or after
    ``linger`` seconds; what the peer still sends meanwhile is dropped). A stream closed right
    after its last write can lose those bytes: p2pd resets it, and the reset may reach the peer
    before the data (measured here: 2 of 40,000 answers lost on a loaded machine, 0 with this).
    The data only has to reach the peer's daemon first, so a short ``linger`` is enough for a
    peer that keeps its stream open after a refusal."""
    try:
        async with asyncio.timeout(linger):
            await writer.drain()
            while await reader.read(65536):
                pass
    except (TimeoutError, ConnectionError, OSError):
        pass
    finally:
        writer.close()


def decode_payload(payload: bytes) -> Frame:
    message = runtime_pb2.ExpertRequest()
    try:
        message.ParseFromString(payload)
    except Exception as e:  # protobuf raises its own DecodeError and, on some inputs, others
        raise ProtocolViolation(f"frame is not a valid message: {e}") from None
    if len(message.metadata) > MAX_METADATA_BYTES:
        raise MessageTooLarge(f"metadata of {len(message.metadata)} bytes (limit {MAX_METADATA_BYTES})")
    if len(message.tensors) > MAX_TENSORS:
        raise BadRequest(f"{len(message.tensors)} tensors in one message (limit {MAX_TENSORS})")
    try:
        meta = msgpack.unpackb(message.metadata, raw=False, strict_map_key=True) if message.metadata else {}
    except (ValueError, TypeError) as e:
        raise ProtocolViolation(f"metadata is not msgpack: {e}") from None
    if not isinstance(meta, dict):
        raise ProtocolViolation("metadata must be a map")
    return Frame(meta, tuple(_decode_tensor(t) for t in message.tensors))


_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def _encode_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """An uncompressed hivemind tensor message, built directly (hivemind's generic path costs
    more than a decoding step's whole payload); bfloat16 goes through hivemind."""
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _NUMPY_DTYPES:
        return serialize_torch_tensor(tensor)
    return runtime_pb2.Tensor(buffer=tensor.contiguous().numpy().tobytes(), size=tensor.shape, dtype=name,
                              compression=runtime_pb2.CompressionType.NONE)


def _decode_tensor(proto: runtime_pb2.Tensor) -> torch.Tensor:
    if proto.dtype not in _TENSOR_DTYPES or proto.compression not in _COMPRESSIONS:
        raise BadRequest(f"unsupported tensor dtype {proto.dtype!r:.40} / compression {proto.compression}")
    shape = list(proto.size)
    if len(shape) > MAX_TENSOR_DIMS or proto.chunks > 1:
        raise BadRequest(f"tensor of shape {shape[:8]} / {proto.chunks} chunks is not accepted")
    itemsizes = {2} if proto.compression == runtime_pb2.CompressionType.FLOAT16 else {_TENSOR_DTYPES[proto.dtype]}
    if proto.dtype == "bfloat16":
        itemsizes.add(4)  # hivemind sends bfloat16 as float32 in its legacy mode
    if len(proto.buffer) not in {math.prod(shape) * size for size in itemsizes}:
        raise BadRequest(f"tensor buffer of {len(proto.buffer)} bytes does not match shape {shape}")
    if proto.compression == runtime_pb2.CompressionType.NONE and proto.dtype in _NUMPY_DTYPES:
        array = np.frombuffer(proto.buffer, dtype=_NUMPY_DTYPES[proto.dtype]).copy()  # writable, owned
        return torch.from_numpy(array).reshape(shape)
    return deserialize_torch_tensor(proto)


def error_meta(error: PotluckError, request: dict[str, Any] | None = None,
               session_id: str | None = None) -> dict[str, Any]:
    """An error answer; it echoes the request's ``seq`` and ``session_id`` (or names ``session_id``,
    for an error nobody asked for) so the client can match it."""
    meta = {"type": "error", "error": error.to_wire()}
    seq, session = (request or {}).get("seq"), (request or {}).get("session_id", session_id)
    if isinstance(seq, int) and not isinstance(seq, bool):
        meta["seq"] = seq
    if isinstance(session, str) and _SESSION_ID.match(session):
        meta["session_id"] = session
    return meta


def error_of(frame: Frame, peer_id: str | None = None) -> PotluckError | None:
    """The typed error a peer answered with, tagged with that peer's id; None for other frames."""
    if frame.meta.get("type") != "error":
        return None
    error = PotluckError.from_wire(frame.meta.get("error"))
    error.peer_id = peer_id
    return error


def raise_if_error(frame: Frame, peer_id: str | None = None) -> Frame:
    """Raise the typed error a peer answered with, tagged with that peer's id."""
    error = error_of(frame, peer_id)
    if error is not None:
        raise error
    return frame


class Message:
    """Mixed into the frozen dataclasses that travel as metadata: their fields plus ``type``."""

    KIND: ClassVar[str]

    def to_meta(self) -> dict[str, Any]:
        return {"type": self.KIND, **_plain(self)}


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(item.name for item in dataclasses.fields(cls))


def _plain(value: Any) -> Any:
    """``value`` as msgpack takes it: records (next hops) as maps, tuples as lists. What
    ``dataclasses.asdict`` gives, at a fifth of its cost (it copies every value); a decoding step
    builds a message per session per hop."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value):
        return {name: _plain(getattr(value, name)) for name in _field_names(type(value))}
    return value


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenSession(Message):
    KIND: ClassVar[str] = "open"
    session_id: str
    start: int  # first block of the sub-span this session runs on the node
    end: int
    max_length: int  # tokens reserved in the node's cache, per sequence
    batch_size: int
    previous: str | None = None  # the node allowed to push steps into it (the chain's previous hop), if any


@dataclass(frozen=True)
class NextHop:
    peer_id: str  # base58 peer id of the next node
    session_id: str  # the session opened on it for this chain


class _Stepping(Message):
    """``Step`` and ``Push``: their metadata built directly, not through ``_plain`` (one message
    per session per hop and round)."""

    def to_meta(self) -> dict[str, Any]:
        return {"type": self.KIND, "session_id": self.session_id, "start_from": self.start_from,
                "next": [{"peer_id": hop.peer_id, "session_id": hop.session_id} for hop in self.next],
                "seq": self.seq}


@dataclass(frozen=True)
class Step(_Stepping):
    """Run new tokens through the session's blocks; tensors: hidden [B, T, H], position_ids [B, T],
    optionally attention_mask [B, prefix + T] (1 = attend, 0 = padding).

    With ``next`` (hand-off), the node pushes its output to the first of them as a ``Push``
    carrying the rest, and the last node of the chain answers the client; without, it answers."""

    KIND: ClassVar[str] = "step"

    session_id: str
    start_from: int | None  # rewind the cache to this many tokens first (None: append)
    next: tuple[NextHop, ...] = ()
    seq: int | None = None  # the client's number for this attempt, echoed in the answer


@dataclass(frozen=True)
class Push(_Stepping):
    """A step handed on by the previous node of a chain (tensors as in Step); its answer goes to
    the stream the session was opened on, not back to the pushing node."""

    KIND: ClassVar[str] = "push"

    session_id: str
    start_from: int  # where the step starts in the session's cache: pushes always say
    next: tuple[NextHop, ...] = ()
    seq: int | None = None


@dataclass(frozen=True)
class Follow(Message):
    """From now on, steps of the session are pushed by ``previous`` (the client replaced the node
    before this one in the chain); answered with ``Followed``."""

    KIND: ClassVar[str] = "follow"

    session_id: str
    previous: str | None


@dataclass(frozen=True)
class CloseSession(Message):
    KIND: ClassVar[str] = "close"
    session_id: str


@dataclass(frozen=True)
class Forward(Message):
    """Run whole sequences through blocks start:end with no cache; tensors as in Step."""

    KIND: ClassVar[str] = "forward"

    start: int
    end: int


@dataclass(frozen=True)
class InfoRequest(Message):
    KIND: ClassVar[str] = "info"


Request = OpenSession | Step | Push | Follow | CloseSession | Forward | InfoRequest


def parse_request(meta: dict[str, Any]) -> Request:
    """Check a request's metadata against its schema; raises BadRequest naming the bad field."""
    kind = meta.get("type")
    if kind == "open":
        start, end = _int(meta, "start", 0), _int(meta, "end", 1)
        if end <= start:
            raise BadRequest(f"empty span {start}:{end}")
        return OpenSession(_session_id(meta), start, end, _int(meta, "max_length", 1), _int(meta, "batch_size", 1),
                           _previous(meta))
    if kind == "step":
        start_from = None if meta.get("start_from") is None else _int(meta, "start_from", 0)
        return Step(_session_id(meta), start_from, _next_hops(meta.get("next", [])), _seq(meta))
    if kind == "push":
        return Push(_session_id(meta), _int(meta, "start_from", 0), _next_hops(meta.get("next", [])), _seq(meta))
    if kind == "follow":
        return Follow(_session_id(meta), _previous(meta))
    if kind == "close":
        return CloseSession(_session_id(meta))
    if kind == "forward":
        start, end = _int(meta, "start", 0), _int(meta, "end", 1)
        if end <= start:
            raise BadRequest(f"empty span {start}:{end}")
        return Forward(start, end)
    if kind == "info":
        return InfoRequest()
    raise BadRequest(f"unknown request type {kind!r:.40}")


def _seq(meta: dict[str, Any]) -> int | None:
    return None if meta.get("seq") is None else _int(meta, "seq", 0)


def _int(meta: dict[str, Any], name: str, minimum: int) -> int:
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 2**31:
        raise BadRequest(f"field {name!r} must be an integer >= {minimum}, got {value!r:.40}")
    return value


def _previous(meta: dict[str, Any]) -> str | None:
    value = meta.get("previous")
    if value is not None and not (isinstance(value, str) and _PEER_ID.match(value)):
        raise BadRequest(f"field 'previous' must be a base58 peer id or absent, got {value!r:.40}")
    return value


def _next_hops(value: Any) -> tuple[NextHop, ...]:
    if not isinstance(value, list) or len(value) > MAX_NEXT_HOPS:
        raise BadRequest(f"field 'next' must be a list of at most {MAX_NEXT_HOPS} hops")
    hops = []
    for item in value:
        if not isinstance(item, dict) or not _PEER_ID.match(str(item.get("peer_id", ""))):
            raise BadRequest("each hop in 'next' needs a base58 'peer_id'")
        hops.append(NextHop(item["peer_id"], _session_id(item)))
    return tuple(hops)


def _session_id(meta: dict[str, Any]) -> str:
    value = meta.get("session_id")
    if not isinstance(value, str) or not _SESSION_ID.match(value):
        raise BadRequest(f"field 'session_id' must be 1-64 characters of [A-Za-z0-9_.:-], got {value!r:.40}")
    return value


def check_step_tensors(
    tensors: Sequence[torch.Tensor], hidden_size: int, batch_size: int | None, prefix: int, sane: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate (hidden, position_ids[, attention_mask]) of a step or forward; returns them.
    ``sane``: their values passed ``values_sane`` already (only shapes and dtypes are left)."""
    if len(tensors) not in (2, 3):
        raise BadRequest(f"expected hidden states, position ids and an optional mask; got {len(tensors)} tensors")
    hidden, positions = tensors[0], tensors[1]
    if hidden.ndim != 3 or hidden.shape[2] != hidden_size or not hidden.is_floating_point():
        raise BadRequest(f"hidden states must be float [batch, length, {hidden_size}], got {tuple(hidden.shape)}")
    batch, length = hidden.shape[:2]
    if batch == 0 or length == 0 or (batch_size is not None and batch != batch_size):
        raise BadRequest(f"hidden states of shape {tuple(hidden.shape)} do not fit a session of batch {batch_size}")
    if positions.dtype != torch.int64 or tuple(positions.shape) != (batch, length):
        raise BadRequest(f"position_ids must be int64 [{batch}, {length}], "
                         f"got {positions.dtype} {tuple(positions.shape)}")
    if not sane and positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < MAX_POSITION):
        raise BadRequest(f"position_ids must lie in [0, {MAX_POSITION})")
    if not sane and not bool(torch.isfinite(hidden).all()):
        raise BadRequest("hidden states hold NaN or infinite values; they are not passed on")
    mask = tensors[2] if len(tensors) == 3 else None
    if mask is not None and (mask.dtype != torch.int64 or tuple(mask.shape) != (batch, prefix + length)):
        raise BadRequest(f"attention_mask must be int64 [{batch}, {prefix + length}], got {tuple(mask.shape)}")
    return hidden, positions, mask


@dataclass(frozen=True)
class Dial:
    """How to reach a peer: through ``relays`` (circuit multiaddrs its record names, for a peer
    behind NAT) tried first, dialling again for ``patience`` seconds while it cannot be reached yet
    (a new relayed connection takes a few seconds at first)."""
    patience: float = 0.0
    relays: tuple[str, ...] = ()


DIRECTLY = Dial()


async def open_stream(p2p, peer_id: str, handler: str, timeout: float, dial: Dial = DIRECTLY):
    """(reader, writer) of a new stream to a peer's handler; NodeUnavailable if it cannot be reached."""
    deadline = asyncio.get_running_loop().time() + dial.patience
    while True:
        if dial.relays:
            await connect_through(p2p, peer_id, dial.relays)
        try:
            _, reader, writer = await asyncio.wait_for(
                p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handler), timeout)
            return reader, writer
        except Exception as e:  # p2pd reports unreachable peers with its own ControlFailure, timeouts, OSErrors
            if asyncio.get_running_loop().time() + 1.0 > deadline:
                raise NodeUnavailable(f"node {peer_id} cannot be reached: {type(e).__name__}: {e}", peer_id) from None
        await asyncio.sleep(1.0)


async def call_once(p2p, peer_id: str, handler: str, meta: dict[str, Any], tensors: Sequence[torch.Tensor] = (),
                    timeout: float = 30.0, dial: Dial = DIRECTLY) -> Frame:
    """One request on a fresh stream to ``peer_id`` and its answer; a peer that cannot be reached
    or does not answer in time raises NodeUnavailable, a typed refusal raises its own error."""
    reader, writer = await open_stream(p2p, peer_id, handler, timeout, dial)
    try:
        await write_frame(writer, meta, tensors)
        frame = await asyncio.wait_for(read_frame(reader), timeout)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as e:
        raise NodeUnavailable(f"node {peer_id} failed during {handler}: {type(e).__name__} {e}".rstrip(),
                              peer_id) from None
    finally:
        writer.close()
    return raise_if_error(frame, peer_id)
