"""Anyone can speak on the DHT, but only a node can speak for itself: forged records are refused."""
import asyncio
import dataclasses

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.protocol.directory import read_block_records
from potluck.protocol.network import p2p_options
from potluck.protocol.records import NodeState, block_key, pack

FAKE_PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def test_forged_records_are_refused_and_the_node_keeps_serving(tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    (peer,) = swarm.start_nodes(path, ["0:8"], "--announce-period", "2")
    client = SwarmConnection(swarm.initial_peers)
    try:
        model = path.name
        honest = client.call(read_block_records(client.dht, model, 8))[peer]

        def honest_view() -> dict:
            return client.call(read_block_records(client.dht, model, 8))

        async def forge() -> tuple[dict, dict]:
            """A peer whose DHT checks nothing stores an OFFLINE record for the node, expiring later
            than the node's own, and an ONLINE record for a node that does not exist; what the forger
            and an honest client then read, while the forger is still there to answer."""
            p2p = await P2P.create(**p2p_options(swarm.initial_peers))
            dht = await DHTNode.create(p2p=p2p, initial_peers=swarm.initial_peers)
            try:
                offline = pack(dataclasses.replace(honest, state=NodeState.OFFLINE))
                fake = pack(dataclasses.replace(honest, public_name="fake"))
                expiration = get_dht_time() + 3600
                for block in range(8):
                    for value, subkey in ((offline, peer), (fake, FAKE_PEER)):
                        await dht.store(block_key(model, block), value, expiration, subkey=subkey)
                await asyncio.sleep(2.5)  # the node re-announces meanwhile
                return await read_block_records(dht, model, 8), await asyncio.to_thread(honest_view)
            finally:
                await dht.shutdown()
                await p2p.shutdown()

        forger_sees, seen = asyncio.run(forge())
        assert forger_sees[peer].state is NodeState.OFFLINE and FAKE_PEER in forger_sees  # it believes itself...
        assert seen[peer] == honest_view()[peer] and seen[peer].state is NodeState.ONLINE  # ...no honest peer does
        assert FAKE_PEER not in seen
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=client)
        ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(3))
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        assert torch.equal(remote.generate(ids, max_new_tokens=4, do_sample=False),
                           local.generate(ids, max_new_tokens=4, do_sample=False))
    finally:
        client.close()
