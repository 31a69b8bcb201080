"""The client's local part (embeddings, final norm, lm_head) on a device other than the CPU.

Hidden states leave that device as CPU tensors for the wire and come back to it. The local part
sits on the ``meta`` device and runs under ``FakeTensorMode``, which raises on any operation
mixing tensors of two devices, as CUDA does; a stand-in session plays the swarm's part.
"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from devices import OTHER_DEVICE
from potluck.client.swarm_view import SwarmView
from potluck.client.model import RemoteCache, build_local_part
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.families import CACHE_ARG


class WireSession:
    """What the nodes would do with a step: take CPU tensors, answer hidden states of the same shape."""

    position = 0
    token_ids = None

    def __init__(self):
        self.seen = []

    def step(self, hidden, positions, mask):
        self.seen.append([t.device.type for t in (hidden, positions) + ((mask,) if mask is not None else ())])
        self.position += hidden.shape[1]
        return torch.empty_like(hidden)


def test_local_part_keeps_its_device_and_speaks_cpu_to_the_wire(tiny_checkpoints):
    checkpoint = resolve_checkpoint(str(tiny_checkpoints["qwen2"]))
    view = SwarmView(swarm=None, model=checkpoint.name, num_blocks=checkpoint.num_blocks)
    model = build_local_part(checkpoint, view, torch.float32, OTHER_DEVICE)
    assert model.device == OTHER_DEVICE and model.lm_head.weight.device == OTHER_DEVICE
    session = WireSession()
    ids = torch.randint(0, 1000, (2, 7)).to(OTHER_DEVICE)
    with FakeTensorMode(allow_non_fake_inputs=True):  # (a padding mask's all() would need real data)
        prefill = model(input_ids=ids, use_cache=True, **{CACHE_ARG: RemoteCache(session)})
        step = model(input_ids=ids[:, :1], position_ids=torch.tensor([[7]]).to(OTHER_DEVICE), use_cache=True,
                     **{CACHE_ARG: RemoteCache(session)})
    assert prefill.logits.device == OTHER_DEVICE and tuple(prefill.logits.shape) == (2, 7, 1000)
    assert step.logits.device == OTHER_DEVICE
    assert session.seen == [["cpu", "cpu"], ["cpu", "cpu"]]
