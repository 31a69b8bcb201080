"""bfloat16 nodes (the GPU default) give the greedy tokens of transformers run in bfloat16.

On the CPU here; tests/integration/test_cuda.py repeats it on a GPU where there is one.
"""
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.protocol import messages as msg


def test_bfloat16_nodes_match_local_bfloat16(tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    peers = swarm.start_nodes(path, ["0:4", "4:8"], "--dtype", "bfloat16")
    connection = SwarmConnection(swarm.initial_peers)
    try:
        info = connection.call(connection.request(peers[0], msg.INFO_HANDLER, {"type": "info"}))
        assert (info.meta["dtype"], info.meta["device"]) == ("bfloat16", "cpu")
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection, dtype="bfloat16")
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(5))
        expected = local.generate(ids, max_new_tokens=24, do_sample=False)
        assert torch.equal(remote.generate(ids, max_new_tokens=24, do_sample=False), expected)
        with torch.no_grad():
            difference = (remote(ids).logits.float() - local(ids).logits.float()).abs().max()
        assert difference < 1e-2, difference
    finally:
        connection.close()
