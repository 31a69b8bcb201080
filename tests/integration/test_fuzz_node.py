"""A live node under thousands of random and mutated messages: it answers each with a reply or a typed
error (or closes a stream whose framing is broken), stays alive, leaks no session and little memory,
and then serves a normal client exactly."""
import asyncio
import time

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from fuzz_cases import wire_bytes
from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.protocol import messages as msg
from potluck.protocol.errors import MessageTooLarge, PeerLimitReached

HANDLERS = [msg.INFERENCE_HANDLER] * 7 + [msg.PUSH_HANDLER, msg.FORWARD_HANDLER, msg.INFO_HANDLER]
BATCHES, CASES = 30, 100  # 3,000 cases
RSS_BOUND = 96 * 2**20
sent = {"cases": 0, "answers": 0, "closed": 0, "silent pushes": 0, "seconds": 0.0}


@pytest.fixture(scope="module")
def node(tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    (peer,) = swarm.start_nodes(path, ["0:8"], "--cache-tokens", "4096", "--frame-timeout", "1")
    hostile, honest = SwarmConnection(swarm.initial_peers), SwarmConnection(swarm.initial_peers)
    process = psutil.Process(swarm.nodes[peer].pid)
    yield hostile, honest, peer, process, path
    hostile.close()
    honest.close()


class Streams:
    """The fuzzer's open streams to the node, one per handler, reopened when the node closes one."""

    def __init__(self, connection: SwarmConnection, peer: str):
        self.connection, self.peer, self.open = connection, peer, {}

    async def exchange(self, handler: str, data: bytes) -> None:
        reader, writer = self.open.get(handler, (None, None))
        if writer is None or writer.is_closing() or reader.at_eof():  # the node closed it after the last case
            reader, writer = self.open[handler] = await self.connection.open_stream(self.peer, handler, 10)
        writer.write(data)
        wait = 1.0 if handler == msg.PUSH_HANDLER else 10.0  # a push that is fine answers elsewhere
        ends = False
        try:
            answer = await asyncio.wait_for(msg.read_frame(reader), wait)
            sent["answers"] += 1
            # the node ends a stream after these, once this side closes it (or after a second)
            ends = isinstance(msg.error_of(answer), (MessageTooLarge, PeerLimitReached))
        except asyncio.TimeoutError:
            assert handler == msg.PUSH_HANDLER, f"no answer on {handler} to {data[:80]!r}"
            sent["silent pushes"] += 1
        except (asyncio.IncompleteReadError, ConnectionError):  # the node closed a broken stream
            sent["closed"] += 1
        if handler in (msg.FORWARD_HANDLER, msg.INFO_HANDLER) or ends or reader.at_eof():
            writer.close()  # one request per stream on those, and a closed stream is reopened
            del self.open[handler]
        sent["cases"] += 1

    async def close(self) -> None:
        for _, writer in self.open.values():
            writer.close()
        self.open.clear()


def test_thousands_of_bad_messages_leave_the_node_alive_and_exact(node):
    hostile, honest, peer, process, path = node
    rss_before = process.memory_info().rss
    streams = Streams(hostile, peer)
    began = time.monotonic()

    @settings(max_examples=BATCHES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(st.tuples(st.sampled_from(HANDLERS), wire_bytes()), min_size=CASES, max_size=CASES))
    def fuzz(cases):
        async def run():
            for handler, data in cases:
                await streams.exchange(handler, data)
        hostile.call(run(), timeout=600)
        assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE

    fuzz()
    sent["seconds"] = round(time.monotonic() - began, 1)
    hostile.call(streams.close())
    deadline = time.monotonic() + 10
    while hostile.call(hostile.info(peer, timeout=10))[0].open_sessions and time.monotonic() < deadline:
        time.sleep(0.1)
    info, _ = hostile.call(hostile.info(peer, timeout=10))
    grown = process.memory_info().rss - rss_before
    print(f"fuzz: {sent}, {sent['cases'] / sent['seconds']:.0f} cases/s, node RSS +{grown / 2**20:.1f} MiB")
    assert sent["cases"] == BATCHES * CASES and info.open_sessions == 0
    assert grown < RSS_BOUND, grown / 2**20
    remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=honest)
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(5))
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(remote.generate(ids, max_new_tokens=6, do_sample=False),
                       local.generate(ids, max_new_tokens=6, do_sample=False))
