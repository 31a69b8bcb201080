"""Property tests: whatever bytes or metadata a peer sends, decoding and validation either accept it or
raise a typed ``BadRequest``; never another exception, never an allocation its size does not allow."""
import asyncio

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fuzz_cases import HIDDEN, encoded, hostile_values, messages, tensors, wire_bytes
from potluck.protocol import messages as msg
from potluck.protocol.bundles import BUNDLE, unbundle
from potluck.protocol.errors import BadRequest

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ["open", "step", "push", "close", "forward", "info", BUNDLE, "nonsense"]
FIELDS = ["session_id", "start", "end", "max_length", "batch_size", "start_from", "next", "seq", "parts", "rows"]
metadata = st.fixed_dictionaries({"type": st.sampled_from(KINDS)}, optional={f: hostile_values for f in FIELDS})


def checked(frame: msg.Frame) -> None:
    """What a node does with a frame before it computes: every failure must be a BadRequest."""
    for part in unbundle(frame):
        request = msg.parse_request(part.meta)
        if isinstance(request, (msg.Step, msg.Push, msg.Forward)):
            msg.check_step_tensors(part.tensors, HIDDEN, None, 0)


def decoded_and_checked(frame_bytes: bytes) -> None:
    try:
        checked(msg.decode_payload(frame_bytes[msg.HEADER_BYTES:]))
    except BadRequest:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_are_refused(payload):
    decoded_and_checked(b"\0" * msg.HEADER_BYTES + payload)


@FUZZ
@given(metadata, st.lists(tensors(), max_size=4))
def test_any_metadata_and_tensors_are_parsed_or_refused(meta, sent):
    frame = encoded(meta, sent)
    assume(frame is not None)
    decoded_and_checked(frame)


@FUZZ
@given(messages())
def test_mutated_messages_are_parsed_or_refused(message):
    frame = encoded(*message)
    assume(frame is not None)
    decoded_and_checked(frame)


@FUZZ
@given(wire_bytes())
def test_bit_flipped_and_random_frames_are_parsed_or_refused(frame):
    decoded_and_checked(frame)


@FUZZ
@given(st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_a_lying_length_header_is_refused_before_it_is_read(declared, body):
    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(declared.to_bytes(msg.HEADER_BYTES, "big") + body)
        reader.feed_eof()
        return await msg.read_frame(reader, max_bytes=1024)

    try:
        checked(asyncio.run(read()))
    except (BadRequest, asyncio.IncompleteReadError):  # too large, malformed, or shorter than it said
        pass


def test_msgpack_extension_types_are_refused():
    hostile = runtime_pb2.ExpertRequest(metadata=msgpack.packb(msgpack.ExtType(42, b"\x00" * 8)))
    with pytest.raises(BadRequest):
        msg.decode_payload(hostile.SerializeToString())


def test_a_bundle_of_mismatched_rows_is_refused():
    frame = encoded({"type": BUNDLE, "parts": [{"type": "step"}] * 2, "rows": [1, 1]}, [torch.zeros(3, 1, HIDDEN)])
    with pytest.raises(BadRequest):
        checked(msg.decode_payload(frame[msg.HEADER_BYTES:]))
