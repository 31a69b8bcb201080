"""Bundles: messages written in one loop turn share a frame, come back out in order, and a bad bundle is refused."""
import asyncio

import pytest
import torch

from memory_swarm import stream_pair
from potluck.protocol import messages as msg
from potluck.protocol.bundles import BUNDLE, MAX_BUNDLE_PARTS, FrameBatcher, bundled, unbundle
from potluck.protocol.errors import BadRequest


def step(name, rows=1, tokens=1):
    tensors = torch.randn(rows, tokens, 8), torch.zeros(rows, tokens, dtype=torch.int64)
    return {"type": "step", "session_id": name}, tensors


def on_the_wire(meta, tensors) -> msg.Frame:
    return msg.decode_payload(msg.encode_frame(meta, tensors)[msg.HEADER_BYTES:])


def test_steps_of_one_shape_share_a_frame_and_come_back_in_order():
    messages = [step("a"), step("b", rows=2), step("c"), step("long", tokens=5), step("d"),
                ({"type": "close", "session_id": "e"}, ())]
    frames = bundled(messages)
    assert [f[0]["type"] for f in frames] == [BUNDLE, "step", "step", "close"]  # a run breaks where shapes change
    assert frames[0][1][0].shape == (4, 1, 8)
    parts = [part for meta, tensors in frames for part in unbundle(on_the_wire(meta, tensors))]
    assert [p.meta["session_id"] for p in parts] == ["a", "b", "c", "long", "d", "e"]
    for part, (_, tensors) in zip(parts, messages):
        assert len(part.tensors) == len(tensors)
        assert all(torch.equal(got, sent) for got, sent in zip(part.tensors, tensors))


def test_a_bundle_holds_at_most_its_limit_of_parts():
    frames = bundled([step(str(i)) for i in range(MAX_BUNDLE_PARTS + 3)])
    assert [len(meta["parts"]) for meta, _ in frames] == [MAX_BUNDLE_PARTS, 3]


@pytest.mark.parametrize("meta, rows", [
    ({"parts": [], "rows": []}, 0),  # empty
    ({"parts": [{"type": "step"}], "rows": [1, 1]}, 2),  # parts and row counts disagree
    ({"parts": [{"type": "step"}, {"type": BUNDLE}], "rows": [1, 1]}, 2),  # nested
    ({"parts": [{"type": "step"}, {"type": "step"}], "rows": [3, -1]}, 2),  # negative rows
    ({"parts": [{"type": "step"}, {"type": "step"}], "rows": [1, 2]}, 2),  # rows the tensors do not carry
    ({"parts": ["step", {"type": "step"}], "rows": [1, 1]}, 2),  # a part that is no message
    ({"parts": [{"type": "step"}] * (MAX_BUNDLE_PARTS + 1), "rows": [0] * (MAX_BUNDLE_PARTS + 1)}, 0),
])
def test_a_bad_bundle_is_refused(meta, rows):
    with pytest.raises(BadRequest):
        unbundle(on_the_wire({"type": BUNDLE, **meta}, [torch.zeros(rows, 1, 8)] if rows else []))


def test_a_bundles_values_are_checked_once_for_all_its_parts():
    frames = bundled([step(name) for name in "abc"])
    assert all(part.sane for part in unbundle(on_the_wire(*frames[0])))
    for poison in (float("nan"), float("inf")):
        messages = [step(name) for name in "abc"]
        messages[1][1][0][0, 0, 3] = poison
        parts = unbundle(on_the_wire(*bundled(messages)[0]))
        assert not any(part.sane for part in parts)  # each part is then checked on its own
        with pytest.raises(BadRequest, match="NaN or infinite"):
            msg.check_step_tensors(parts[1].tensors, 8, 1, 0, parts[1].sane)
        assert msg.check_step_tensors(parts[0].tensors, 8, 1, 0, parts[0].sane)
    messages = [step(name) for name in "abc"]
    messages[2][1][1][0, 0] = msg.MAX_POSITION  # a position out of range
    assert not any(part.sane for part in unbundle(on_the_wire(*bundled(messages)[0])))
    assert not on_the_wire(*step("alone")).sane  # a message alone is checked by its handler


def test_a_batcher_sends_one_loop_turn_as_one_frame():
    async def exchange():
        (reader, _), (_, writer) = stream_pair()
        out = FrameBatcher(writer)
        for name in "abc":
            out.write(*step(name))  # one turn
        await asyncio.sleep(0)
        out.write(*step("d"))  # the next turn
        out.close()  # sends what is queued first
        frames = []
        while not reader.at_eof():
            frames.append(await msg.read_frame(reader))
            await asyncio.sleep(0)
        return frames

    frames = asyncio.run(exchange())
    assert [len(unbundle(f)) for f in frames] == [3, 1]

    async def too_late():
        (_, closed), _ = stream_pair()
        closed.close()
        FrameBatcher(closed).write(*step("late"))

    with pytest.raises(ConnectionResetError):
        asyncio.run(too_late())
