"""CUDA nodes and a CUDA client, exact against transformers on the same GPU (``pytest -m gpu``).

Skipped, saying why, where torch sees no CUDA GPU; CPU-only CI proves device handling with the
device-checked dry runs in tests/node/test_devices.py and tests/client/test_local_device.py.
"""
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.protocol import messages as msg
from potluck.protocol.checkpoint import resolve_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")]


def cuda_swarm(swarm_factory, path, dtype, spans=("0:4", "4:8"), graphs=False):
    swarm = swarm_factory()
    peers = swarm.start_nodes(path, list(spans), "--device", "cuda", "--dtype", dtype,
                              *(["--cuda-graphs"] if graphs else []))
    return swarm, peers


def graph_passes(connection, peers) -> list[int]:
    infos = [connection.call(connection.request(p, msg.INFO_HANDLER, {"type": "info"})) for p in peers]
    return [info.meta["counters"].get("graph_passes", 0) for info in infos]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_two_cuda_nodes_match_local_transformers_on_the_gpu(family, graphs, tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints[family]
    swarm, peers = cuda_swarm(swarm_factory, path, "float32", graphs=graphs)
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection, device="cuda")
        info = connection.call(connection.request(peers[0], msg.INFO_HANDLER, {"type": "info"}))
        assert (info.meta["device"], info.meta["dtype"]) == ("cuda", "float32")
        local = AutoModelForCausalLM.from_pretrained(path).to("cuda").eval()
        ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
        expected = local.generate(ids, max_new_tokens=32, do_sample=False)
        assert torch.equal(remote.generate(ids, max_new_tokens=32, do_sample=False), expected)
        with torch.no_grad():
            assert (remote(ids).logits - local(ids).logits).abs().max() < 1e-4
        assert all(n > 0 if graphs else n == 0 for n in graph_passes(connection, peers))
    finally:
        connection.close()


def test_default_model_in_bfloat16_gives_the_local_bfloat16_answer(swarm_factory):
    checkpoint = resolve_checkpoint(None)
    swarm, _ = cuda_swarm(swarm_factory, checkpoint.path, "bfloat16", ("0:15", "15:30"))
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(checkpoint.path), swarm=connection,
                                                                 device="cuda", dtype="bfloat16")
        local = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.bfloat16).to("cuda").eval()
        ids = torch.tensor([[504, 3575, 282, 4649, 314]], device="cuda")  # "The capital of France is"
        expected = local.generate(ids, max_new_tokens=24, do_sample=False)
        assert torch.equal(remote.generate(ids, max_new_tokens=24, do_sample=False), expected)
    finally:
        connection.close()


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_thirty_two_concurrent_clients_through_cuda_nodes(graphs, tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints["llama"]
    swarm, peers = cuda_swarm(swarm_factory, path, "float32", graphs=graphs)
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection, device="cuda")
        local = AutoModelForCausalLM.from_pretrained(path).to("cuda").eval()
        prompts = [torch.randint(0, 1000, (1, 4 + i), generator=torch.Generator().manual_seed(i))
                   for i in range(32)]  # lengths 4 to 35: batches of many rows and cache lengths
        expected = [local.generate(p.cuda(), max_new_tokens=16, do_sample=False).cpu() for p in prompts]
        got: dict[int, torch.Tensor] = {}

        def client(i: int) -> None:
            got[i] = remote.generate(prompts[i], max_new_tokens=16, do_sample=False).cpu()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert all(torch.equal(got.get(i), expected[i]) for i in range(32))
        assert all(n > 0 if graphs else n == 0 for n in graph_passes(connection, peers))
    finally:
        connection.close()
