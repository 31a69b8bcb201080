"""Hypothesis strategies for what a hostile or broken peer sends: hostile values, tensors of any shape,
dtype and content, well-formed messages with mutated fields, and bytes on the wire (random, bit-flipped,
with lying length headers)."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from potluck.protocol import messages as msg
from potluck.protocol.bundles import BUNDLE

HIDDEN = 64  # the tiny test models' hidden size
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=80), st.binary(max_size=40))
hostile_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                               st.dictionaries(st.text(max_size=12), inner,
                                                                               max_size=6)), max_leaves=20)
session_ids = st.sampled_from(["s0", "s1", "s2", "s3"])  # a few, so steps meet sessions that were opened
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]


@st.composite
def tensors(draw, max_dims: int = 5, max_size: int = 6) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, max_size), max_size=max_dims))
    tensor = torch.zeros(shape, dtype=draw(st.sampled_from(DTYPES)))
    if tensor.is_floating_point() and tensor.numel():
        tensor.view(-1)[0] = draw(st.sampled_from([0.0, 1.0, 1e30, float("nan"), float("inf"), -float("inf")]))
    return tensor


@st.composite
def step_tensors(draw) -> list[torch.Tensor]:
    """Hidden states and positions that are often right, sometimes not."""
    batch, length = draw(st.integers(0, 3)), draw(st.integers(0, 4))
    hidden = torch.randn(batch, length, draw(st.sampled_from([HIDDEN, HIDDEN, 3])))
    if hidden.numel() and draw(st.booleans()):
        hidden.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf")]))
    positions = torch.arange(length).repeat(batch, 1) + draw(st.sampled_from([0, 0, 5, -3, 2**30]))
    chosen = [hidden, positions]
    if draw(st.integers(0, 4)) == 0:
        chosen.append(draw(tensors()))  # a mask of any shape
    return chosen


@st.composite
def messages(draw) -> tuple[dict, list[torch.Tensor]]:
    """A request of each kind with plausible fields, then some of them mutated, dropped or added."""
    kind = draw(st.sampled_from(["open", "open", "step", "step", "step", "close", "push", "forward", "info",
                                 BUNDLE, "nonsense"]))
    sid = draw(session_ids)
    meta: dict = {"type": kind}
    sent: list[torch.Tensor] = []
    if kind == "open":
        start = draw(st.integers(0, 9))
        meta.update(session_id=sid, start=start, end=start + draw(st.integers(-1, 8)),
                    max_length=draw(st.sampled_from([1, 16, 64, 10**6])), batch_size=draw(st.integers(0, 3)))
    elif kind in ("step", "push"):
        meta.update(session_id=sid, start_from=draw(st.one_of(st.none(), st.integers(-1, 70))),
                    seq=draw(st.integers(0, 5)))
        if draw(st.integers(0, 3)) == 0:
            meta["next"] = [{"peer_id": draw(st.text(max_size=60)), "session_id": sid}]
        sent = draw(step_tensors())
    elif kind == "close":
        meta["session_id"] = sid
    elif kind == "forward":
        meta.update(start=draw(st.integers(-1, 9)), end=draw(st.integers(0, 10)))
        sent = draw(step_tensors())
    elif kind == BUNDLE:
        rows = draw(st.integers(1, 3))
        meta.update(parts=[{"type": "step", "session_id": draw(session_ids)} for _ in range(rows)],
                    rows=[1] * rows)
        sent = [torch.randn(rows, 1, HIDDEN), torch.zeros(rows, 1, dtype=torch.int64)]
    for _ in range(draw(st.integers(0, 2))):  # mutations
        field = draw(st.sampled_from(sorted(meta) + ["extra"]))
        if draw(st.booleans()):
            meta[field] = draw(hostile_values)
        else:
            meta.pop(field, None)
    return meta, sent


def encoded(meta: dict, sent: list[torch.Tensor]) -> bytes | None:
    """The frame, or None if msgpack cannot carry it (integers past 64 bits): no peer can send it."""
    try:
        return msg.encode_frame(meta, sent)
    except (OverflowError, ValueError, TypeError):
        return None


@st.composite
def wire_bytes(draw) -> bytes:
    """What reaches a stream: a message, its bits flipped, or random bytes, each with a true length
    header; now and then a header declaring far more than any request can need (the stream is closed)."""
    how = draw(st.integers(0, 19))
    if how <= 13:
        frame = encoded(*draw(messages()))
        if frame is not None:
            if how >= 11:  # flip bits of the payload, keep the header honest
                payload = bytearray(frame[msg.HEADER_BYTES:])
                for flip in draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=6)):
                    payload[flip % len(payload)] ^= 1 << (flip % 8)
                frame = frame[:msg.HEADER_BYTES] + bytes(payload)
            return frame
    payload = draw(st.binary(max_size=200))
    if how == 19:
        return draw(st.integers(2**30, 2**32 - 1)).to_bytes(msg.HEADER_BYTES, "big") + payload
    return len(payload).to_bytes(msg.HEADER_BYTES, "big") + payload
