"""A node computes on its span's device: wire inputs (CPU) move there, outputs leave only when encoded.

The span's weights sit on another device than the CPU (see ``tests/devices.py``), and every
operation is checked for tensors on two devices, as CUDA does; this is what crashed GPU nodes
at start (a mask built on the CPU) before the span owned its device.
"""
import asyncio

import pytest
import torch

from devices import OTHER_DEVICE, GraphSafe, NotCapturable, StrictDevices
from potluck.node import graphs, hardware
from potluck.node.batching import StepWork, decode_together, prefill_together
from potluck.node.compute import ComputeLane
from potluck.node.handlers import BlockServicer, ServingLimits
from potluck.node.sessions import SessionTable
from potluck.node.throughput import measure
from potluck.protocol import messages as msg
from potluck.node.span import load_span
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.devices import mps_available, resolve_device
from potluck.protocol.errors import BadRequest, NodeOutOfMemory

NEXT_PEER = "12D3KooWDfTd9ci767jyAkmad5szzT29RZdRsVJbgmqAhNnUAK2G"


def span_on_other_device(checkpoint_path, start=0, end=4, dtype=torch.float32):
    return load_span(resolve_checkpoint(str(checkpoint_path)), start, end, dtype, OTHER_DEVICE)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_span_steps_stay_on_its_device(family, tiny_checkpoints):
    span = span_on_other_device(tiny_checkpoints[family], dtype=torch.bfloat16)
    hidden = torch.randn(2, 5, 64)  # float32 from the wire
    positions = torch.arange(5).expand(2, -1)
    padding = torch.ones(2, 8, dtype=torch.int64)
    padding[0, :2] = 0
    table = SessionTable(1000)
    session = table.open(msg.OpenSession("s", 0, 4, 16, 2), span)  # its cache: the pool, on the span's device
    short, long = (table.open(msg.OpenSession(name, 0, 4, 16, 1), span) for name in ("short", "long"))
    with StrictDevices():
        out = session.step(hidden, positions, padding[:, :5], 0)  # prefill with a padding mask
        assert (out.device, out.dtype) == (OTHER_DEVICE, torch.bfloat16)
        out = session.step(hidden[:, :1], positions[:, :1] + 5, None, 5)  # one decoding step, no mask
        out = session.step(hidden[:, :2], positions[:, :2] + 6, padding, 6)  # two tokens on top of a cache
        short.step(hidden[:1, :2], positions[:1, :2], None, 0)
        long.step(hidden[:1], positions[:1], None, 0)
        works = [StepWork(s, hidden[:1, :1], positions[:1, :1] + s.cached, None, s.cached) for s in (short, long)]
        together = decode_together(works)  # a batch of two cache lengths, padded
        works = [StepWork(s, hidden[:1, :1], positions[:1, :1] + s.cached, None, s.cached) for s in (short, long)]
        fixed = decode_together(works, graphs=True)  # a fixed-shape pass, as --cuda-graphs captures it
        works = [StepWork(s, hidden[:1, :n], positions[:1, :n] + s.cached, None, s.cached)
                 for s, n in ((short, 3), (long, 2))]
        prompts = prefill_together(works)  # two sessions' new tokens in one pass, the shorter padded
        out = span(hidden, positions, None, None, 1, 3)  # a forward through part of the span
    assert out.device == OTHER_DEVICE and session.pool.keys[0].device == OTHER_DEVICE
    assert [t.device for t in together + fixed + prompts] == [OTHER_DEVICE] * 6
    assert (short.cached, long.cached) == (7, 9)
    assert all(t.device == OTHER_DEVICE for bucket in short.pool.fixed.buckets.values()
               for t in (bucket.hidden, bucket.positions, bucket.attend, bucket.read, bucket.write))
    assert span.rotary.inv_freq.device == OTHER_DEVICE


def test_speed_measurement_runs_on_the_span_device(tiny_checkpoints):
    span = span_on_other_device(tiny_checkpoints["llama"])
    with StrictDevices():
        speed = measure(span, steps=2, forward_tokens=8, repeats=1)
        fixed = measure(span, steps=2, forward_tokens=8, repeats=1, graphs=True)  # as with --cuda-graphs
    assert speed.steps_per_s > 0 and speed.forward_tokens_per_s > 0 and fixed.steps_per_s > 0


class CapturedPushes:
    def __init__(self):
        self.pushed = []

    async def push(self, peer_id, meta, tensors):
        self.pushed.append((peer_id, meta, tensors))

    def push_now(self, peer_id, meta, tensors) -> bool:
        self.pushed.append((peer_id, meta, tensors))
        return True


def test_handlers_step_and_hand_off_on_the_span_device(tiny_checkpoints):
    span = span_on_other_device(tiny_checkpoints["llama"], 0, 8)
    links = CapturedPushes()
    servicer = BlockServicer(span, ComputeLane(), SessionTable(1000), ServingLimits(),
                             describe=dict, links=links)
    opened = {}

    async def exchange():
        on_compute_thread = StrictDevices()  # modes are per thread: the prefill runs on the lane's thread
        await servicer.compute.run(on_compute_thread.__enter__)
        try:
            async def ask(meta, *tensors):
                answer = servicer._inference_request(msg.Frame(meta, tensors), opened, None)
                return await answer if isinstance(answer, asyncio.Future) else answer
            await ask({"type": "open", "session_id": "s", "start": 0, "end": 8, "max_length": 32, "batch_size": 1})
            wire = (torch.randn(1, 6, 64), torch.arange(6).unsqueeze(0))  # as decoded from a frame: CPU
            meta, (out,) = await ask({"type": "step", "session_id": "s", "start_from": None, "seq": 1}, *wire)
            handed = await ask({"type": "step", "session_id": "s", "start_from": 6, "seq": 2,
                                "next": [{"peer_id": NEXT_PEER, "session_id": "n"}]},
                               torch.randn(1, 1, 64), torch.tensor([[6]]))
        finally:
            await servicer.compute.run(on_compute_thread.__exit__, None, None, None)
        return meta, out, handed

    with StrictDevices():
        meta, out, handed = asyncio.run(exchange())
    assert meta["type"] == "result" and out.device == OTHER_DEVICE  # encode_frame moves it to the CPU
    assert handed is None and len(links.pushed) == 1
    peer, push_meta, tensors = links.pushed[0]
    assert (peer, push_meta["session_id"], push_meta["start_from"]) == (NEXT_PEER, "n", 6)
    assert tensors[0].device == OTHER_DEVICE and tensors[1].device.type == "cpu"


def test_out_of_memory_fails_the_request_not_the_node(tiny_checkpoints):
    span = span_on_other_device(tiny_checkpoints["llama"], 0, 8)
    servicer = BlockServicer(span, ComputeLane(), SessionTable(1000), ServingLimits(), describe=dict,
                             links=CapturedPushes())

    def exhausted(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    async def attempt():
        with pytest.raises(NodeOutOfMemory, match="ran out of meta memory"):
            await servicer._compute(span.device, servicer.compute.run(exhausted))
        return await servicer._compute(span.device, servicer.compute.run(lambda: "still serving"))

    assert asyncio.run(attempt()) == "still serving"


def test_hardware_defaults_on_a_cpu_only_machine(monkeypatch):
    assert resolve_device(None) == torch.device("cpu") or torch.cuda.is_available()
    assert hardware.default_dtype(torch.device("cpu")) == "float32"
    assert hardware.default_cache_gib(torch.device("cpu")) == hardware.CPU_CACHE_GIB
    with pytest.raises(BadRequest, match="--device"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BadRequest, match="pass --device cpu"):
        resolve_device("cuda")
    with pytest.raises(BadRequest, match="device cuda:1: this torch has no usable CUDA GPU"):  # as the client names it
        resolve_device("cuda:1", option="device")
    if not mps_available():
        with pytest.raises(BadRequest, match="--device mps: Apple's Metal backend is not available"):
            resolve_device("mps")  # was a RuntimeError from torch on the client's side
    with pytest.raises(BadRequest, match="one cpu device"):
        resolve_device("cpu:3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert hardware.default_dtype(torch.device("cuda", 0)) == "float16"  # e.g. a T4 or a V100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.default_dtype(torch.device("cuda", 0)) == "bfloat16"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "mixtral"])
def test_a_fixed_shape_pass_holds_nothing_a_cuda_graph_cannot_record(family, tiny_checkpoints):
    """What --cuda-graphs captures (``graphs.Bucket.forward``) moves nothing between the CPU and the
    device and reads nothing back; a mixture of experts does (so it is never captured)."""
    span = span_on_other_device(tiny_checkpoints[family], dtype=torch.bfloat16)
    table = SessionTable(1000)
    sessions = [table.open(msg.OpenSession(name, 0, 4, 16, 1), span) for name in ("a", "b", "c")]
    bucket = graphs.Bucket(sessions[0].pool, span, 0, 4, 4, 16)
    with GraphSafe():
        if family == "mixtral":
            with pytest.raises(NotCapturable, match="reads a value back"):
                bucket.forward()
        else:
            assert bucket.forward().shape == (4, 1, 64)
