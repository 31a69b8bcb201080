"""bfloat16 nodes (the GPU default) give the greedy tokens of transformers run in bfloat16.

On the CPU here; tests/integration/test_cuda.py repeats it on a GPU where there is one.
"""
import subprocess

import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.protocol import messages as msg

from helpers import potluck_command


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
        swarm.stop()


def test_a_float32_client_sends_bfloat16_nodes_16_bit_activations(tiny_checkpoints, swarm_factory):
    """The nodes compute in bfloat16 anyway: the client sends them 2 bytes a value, not 4, and gets
    the same logits as when it sent float32 (the node's first step is to round them)."""
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    peers = swarm.start_nodes(path, ["0:4", "4:8"], "--dtype", "bfloat16")
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection)  # float32 locally
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(6))

        def received():
            infos = [connection.call(connection.request(p, msg.INFO_HANDLER, {"type": "info"})) for p in peers]
            return sum(i.meta["counters"].get("hidden_bytes_in", 0) for i in infos), \
                sum(i.meta["counters"].get("tokens", 0) for i in infos)

        value_bytes = local.config.hidden_size * 2  # a token's hidden state in bfloat16
        before = received()
        with torch.no_grad():
            logits = remote(ids).logits  # a forward: 16 tokens through each node
        assert logits.dtype == torch.float32
        assert received()[0] - before[0] == 2 * 16 * value_bytes
        before = received()
        with remote.inference_session(max_length=32):
            remote.generate(ids, max_new_tokens=8, do_sample=False)
        after = received()
        tokens = after[1] - before[1]  # steps: the prompt and 7 more, through each node
        assert tokens == 2 * (16 + 7) and after[0] - before[0] == tokens * value_bytes
        # the same logits as float32 activations would give: the layers' bfloat16 output, normed in float32
        seen = {}
        local16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        local16.model.norm.register_forward_hook(lambda module, args, out: seen.update(hidden=args[0]))
        with torch.no_grad():
            local16(ids)
            expected = local.lm_head(local.model.norm(seen["hidden"].float()))
        assert (logits - expected).abs().max() < 1e-2
    finally:
        connection.close()
        swarm.stop()


def test_route_shows_a_chain_of_mixed_dtypes_only_when_asked(tiny_checkpoints, swarm_factory):
    """`potluck route` routes as generate does: one dtype per chain unless --mix-dtypes."""
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    swarm.start_nodes(path, ["0:4"], "--dtype", "float32", name="f32")
    swarm.start_nodes(path, ["4:8"], "--dtype", "bfloat16", name="b16")
    command = potluck_command("route", str(path), "--initial-peers", *swarm.initial_peers)
    one = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert one.returncode != 0 and "--mix-dtypes" in one.stderr, one.stderr[-2000:]
    assert "Traceback" not in one.stderr and len(one.stderr.strip().splitlines()) <= 2, one.stderr
    mixed = subprocess.run([*command, "--mix-dtypes"], capture_output=True, text=True, timeout=120)
    assert mixed.returncode == 0, mixed.stderr[-2000:]
    assert [line.split()[1] for line in mixed.stdout.splitlines() if "compute" in line] == ["0:4", "4:8"]
    only = subprocess.run([*command, "--mix-dtypes", "--node-dtypes", "bfloat16"], capture_output=True, text=True,
                          timeout=120)  # the float32 node left out, and the reason names the option
    assert only.returncode != 0 and "computes in float32, which this client leaves out" in only.stderr, only.stderr
    assert "--node-dtypes" in only.stderr and "Traceback" not in only.stderr
