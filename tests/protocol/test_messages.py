"""Frames round-trip, and every kind of bad frame is refused with a typed error."""
import asyncio

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from potluck.protocol import messages as msg
from potluck.protocol.errors import BadRequest, MessageTooLarge, ProtocolViolation


def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def read(data: bytes, **kwargs) -> msg.Frame:
    return asyncio.run(_read(data, **kwargs))


async def _read(data, **kwargs):
    return await msg.read_frame(feed(data), **kwargs)


def test_frame_round_trip():
    hidden, positions = torch.randn(2, 3, 8), torch.arange(3).repeat(2, 1)
    frame = read(msg.encode_frame({"type": "step", "session_id": "abc"}, [hidden, positions]))
    assert frame.meta == {"type": "step", "session_id": "abc"}
    assert torch.equal(frame.tensors[0], hidden) and torch.equal(frame.tensors[1], positions)


def test_bfloat16_round_trip():
    hidden = torch.randn(1, 2, 8).to(torch.bfloat16)
    assert torch.equal(read(msg.encode_frame({}, [hidden])).tensors[0], hidden)


def test_frame_over_limit_is_refused_before_reading():
    data = msg.encode_frame({"type": "info"}, [torch.zeros(1000)])
    with pytest.raises(MessageTooLarge):
        read(data, max_bytes=100)


def test_random_bytes_are_a_protocol_violation():
    junk = bytes(range(256)) * 4
    with pytest.raises((ProtocolViolation, BadRequest)):
        read(len(junk).to_bytes(4, "big") + junk)


def frame_with(tensor: runtime_pb2.Tensor, metadata: bytes = b"\x80") -> bytes:
    payload = runtime_pb2.ExpertRequest(metadata=metadata, tensors=[tensor]).SerializeToString()
    return len(payload).to_bytes(4, "big") + payload


def test_tensor_buffer_must_match_shape():
    with pytest.raises(BadRequest, match="does not match"):
        read(frame_with(runtime_pb2.Tensor(buffer=b"\0" * 12, size=[4], dtype="float32")))


@pytest.mark.parametrize("dtype", ["object", "O", "complex128", "<U8", ""])
def test_unsafe_tensor_dtypes_are_refused(dtype):
    with pytest.raises(BadRequest, match="unsupported tensor dtype"):
        read(frame_with(runtime_pb2.Tensor(buffer=b"\0" * 8, size=[1], dtype=dtype)))


def test_metadata_must_be_a_msgpack_map():
    with pytest.raises(ProtocolViolation):
        read(frame_with(runtime_pb2.Tensor(buffer=b"\0" * 4, size=[1], dtype="float32"), msgpack.packb([1, 2])))


@pytest.mark.parametrize("meta, field", [
    ({"type": "open", "session_id": "s", "start": 0, "end": 2, "max_length": 0, "batch_size": 1}, "max_length"),
    ({"type": "open", "session_id": "s", "start": "0", "end": 2, "max_length": 8, "batch_size": 1}, "start"),
    ({"type": "open", "session_id": "../x y", "start": 0, "end": 2, "max_length": 8, "batch_size": 1}, "session_id"),
    ({"type": "step", "session_id": "s", "start_from": -1}, "start_from"),
    ({"type": "forward", "start": 3, "end": 3}, "empty span"),
    ({"type": "format_disk"}, "unknown request type"),
])
def test_bad_requests_name_the_field(meta, field):
    with pytest.raises(BadRequest, match=field):
        msg.parse_request(meta)


def test_step_tensors_are_checked():
    hidden, positions = torch.randn(1, 2, 8), torch.arange(2).unsqueeze(0)
    assert msg.check_step_tensors([hidden, positions], 8, 1, 0)[0] is hidden
    with pytest.raises(BadRequest, match="hidden states must be"):
        msg.check_step_tensors([torch.randn(1, 2, 7), positions], 8, 1, 0)
    with pytest.raises(BadRequest, match="batch"):
        msg.check_step_tensors([torch.randn(2, 2, 8), positions.repeat(2, 1)], 8, 1, 0)
    with pytest.raises(BadRequest, match="position_ids"):
        msg.check_step_tensors([hidden, positions.float()], 8, 1, 0)
    with pytest.raises(BadRequest, match="attention_mask"):
        msg.check_step_tensors([hidden, positions, torch.ones(1, 2, dtype=torch.int64)], 8, 1, 3)
    with pytest.raises(BadRequest, match="do not fit"):  # a forward of batch 0: refused before any mask is built
        msg.check_step_tensors([torch.randn(0, 16384, 8), torch.zeros(0, 16384, dtype=torch.int64)], 8, None, 0)
    for bad in (float("nan"), float("inf")):
        poisoned = hidden.clone()
        poisoned[0, 1, 3] = bad
        with pytest.raises(BadRequest, match="NaN or infinite"):
            msg.check_step_tensors([poisoned, positions], 8, 1, 0)
