"""Many people at once: nodes batch the decoding steps of concurrent sessions (and concurrent
cache-less forwards), split long prompts into chunks that other sessions' steps go between, and
refuse sessions their cache pool cannot hold. Every session still gets the tokens it gets alone
(local transformers' greedy tokens)."""
import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from helpers import RawStream, open_meta
from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.protocol import messages as msg
from potluck.protocol.errors import CacheFull
from potluck.protocol.replies import Closed, Opened, parse_reply

CLIENTS = Path(__file__).parent.parent / "concurrent_clients.py"


@pytest.fixture(scope="module")
def swarm(tiny_checkpoints, swarm_factory):
    swarm = swarm_factory()
    peers = swarm.start_nodes(tiny_checkpoints["llama"], ["0:4", "4:8"], "--prefill-chunk", "16")
    connection = SwarmConnection(swarm.initial_peers)
    yield connection, peers
    connection.close()


@pytest.fixture(scope="module")
def local(tiny_checkpoints):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()


def prompt(seed: int, length: int) -> torch.Tensor:
    return torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


def counters(connection: SwarmConnection, peer: str) -> dict:
    return connection.call(connection.info(peer, timeout=10))[0].counters


def test_sixteen_sessions_from_four_processes_are_batched_and_each_gets_its_own_tokens(swarm, local,
                                                                                      tiny_checkpoints):
    connection, peers = swarm
    before = [counters(connection, peer) for peer in peers]
    specs = [[seed, 3 + seed] for seed in range(16)]  # prompts of 3 to 18 tokens
    clients = [subprocess.Popen([sys.executable, str(CLIENTS), str(tiny_checkpoints["llama"]),
                                 ",".join(connection.initial_peers), json.dumps(specs[i::4]), "24"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(4)]
    try:
        for client in clients:
            assert client.stdout.readline().strip() == "ready"
        for client in clients:  # all four start generating at once
            client.stdin.write("go\n")
            client.stdin.flush()
        results = {}
        for client in clients:
            out, _ = client.communicate(timeout=300)
            assert client.returncode == 0
            results.update({int(seed): tokens for seed, tokens in json.loads(out).items()})
    finally:
        for client in clients:
            client.kill()
    for seed, length in specs:
        expected = local.generate(prompt(seed, length), max_new_tokens=24, do_sample=False)[0].tolist()
        assert results[seed] == expected, seed
    for peer, earlier in zip(peers, before):
        now = counters(connection, peer)
        batches = now.get("decode_batches", 0) - earlier.get("decode_batches", 0)
        rows = now.get("decode_rows", 0) - earlier.get("decode_rows", 0)
        assert batches > 0 and rows > batches, (peer, now)  # on average more than one session per batch


def test_forwards_arriving_together_are_batched_and_each_gets_its_own_output(swarm, local):
    connection, peers = swarm
    before = counters(connection, peers[0])
    streams = [RawStream(connection, peers[0], msg.FORWARD_HANDLER) for _ in range(8)]
    ids = [prompt(seed, 12) for seed in range(8)]
    frames = [msg.encode_frame(msg.Forward(0, 4).to_meta(), [local.model.embed_tokens(i).detach(),
                                                               torch.arange(12).unsqueeze(0)]) for i in ids]

    async def all_at_once():  # written in one turn of the loop: the node gets them together
        for stream, frame in zip(streams, frames):
            stream.writer.write(frame)
        return await asyncio.gather(*(asyncio.wait_for(msg.read_frame(s.reader), 30) for s in streams))

    answers = connection.call(all_at_once())
    for stream in streams:
        stream.close()
    for i, answer in zip(ids, answers):
        expected = local(i, output_hidden_states=True).hidden_states[4]  # after blocks 0:4
        got = msg.raise_if_error(answer).tensors[0]
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    after = counters(connection, peers[0])
    assert after["forwards"] - before.get("forwards", 0) == 8
    assert after["forward_batches"] - before.get("forward_batches", 0) < 8, after  # some ran together


class Signal(LogitsProcessor):
    """Sets ``event`` once generation has chosen ``after`` tokens."""

    def __init__(self, after: int, event: threading.Event):
        self.after, self.event, self.seen = after, event, 0

    def __call__(self, input_ids, scores):
        self.seen += 1
        if self.seen == self.after:
            self.event.set()
        return scores


def test_a_long_prompt_goes_in_chunks_between_the_steps_of_sessions_that_are_decoding(swarm, local,
                                                                                     tiny_checkpoints):
    connection, peers = swarm
    remote = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_checkpoints["llama"]), swarm=connection)
    decoding, results = threading.Event(), {}

    def generate(seed: int, length: int, new_tokens: int, processors=None) -> None:
        results[seed] = remote.generate(prompt(seed, length), max_new_tokens=new_tokens, do_sample=False,
                                        logits_processor=processors)

    threads = [threading.Thread(target=generate, args=(seed, 4 + seed, 100, LogitsProcessorList(
        [Signal(5, decoding)] if seed == 0 else []))) for seed in range(8)]
    for thread in threads:
        thread.start()
    assert decoding.wait(120)
    before = counters(connection, peers[0])
    generate(100, 480, 2)  # 480 tokens: 30 chunks of 16 on each node while the 8 sessions decode
    after = counters(connection, peers[0])
    for thread in threads:
        thread.join(300)
    assert after["prefill_chunks"] - before.get("prefill_chunks", 0) >= 30
    between = after.get("decode_rows_during_prefill", 0) - before.get("decode_rows_during_prefill", 0)
    assert between > 0, after  # decoding steps ran between the prompt's chunks
    for seed, length, new_tokens in [(s, 4 + s, 100) for s in range(8)] + [(100, 480, 2)]:
        expected = local.generate(prompt(seed, length), max_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(results[seed], expected), seed


def test_a_full_cache_pool_refuses_a_session_until_one_closes_and_the_router_goes_elsewhere(
        tiny_checkpoints, swarm_factory, local):
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    full = swarm.start_nodes(path, ["0:8"], "--cache-tokens", "192",  # room for 3 sessions of 64 tokens,
                             "--peer-cache-share", "1")[0]  # all of which one peer may take
    connection = SwarmConnection(swarm.initial_peers)
    try:
        streams = [RawStream(connection, full) for _ in range(4)]
        for i, stream in enumerate(streams[:3]):
            assert parse_reply(stream.send(open_meta(f"s{i}", 0, 8, 64))) == Opened(f"s{i}")
        refused = streams[3].expect_error(CacheFull, open_meta("s3", 0, 8, 64))
        assert "only 0 of 192" in str(refused)
        assert parse_reply(streams[0].send(msg.CloseSession("s0").to_meta())) == Closed("s0")
        assert parse_reply(streams[3].send(open_meta("s3", 0, 8, 64))) == Opened("s3")  # room again
        other = swarm.start_nodes(path, ["0:8"])[0]
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection)
        ids = prompt(7, 6)
        with remote.inference_session(max_length=64) as session:
            out = remote.generate(ids, max_new_tokens=4, do_sample=False)
            assert [hop.peer_id for hop in session.hops] == [other]
        assert torch.equal(out, local.generate(ids, max_new_tokens=4, do_sample=False))
        for stream in streams:
            stream.close()
    finally:
        connection.close()


def test_nodes_with_cuda_graphs_on_a_cpu_run_fixed_shape_passes_and_stay_exact(tiny_checkpoints, swarm_factory,
                                                                                local):
    """--cuda-graphs without a GPU: every decoding pass runs at the fixed shapes a GPU node captures
    (tests/node/test_graphs.py), here eagerly; six concurrent sessions get local transformers' tokens."""
    swarm = swarm_factory()
    peers = swarm.start_nodes(tiny_checkpoints["llama"], ["0:4", "4:8"], "--cuda-graphs")
    assert all(swarm.wait_for_line(p, "--cuda-graphs: cpu is not a CUDA device") for p in peers)
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_checkpoints["llama"]), swarm=connection)
        prompts = [prompt(seed, 3 + 5 * seed) for seed in range(6)]  # 3 to 28 tokens
        got = {}

        def generate(i: int) -> None:
            got[i] = remote.generate(prompts[i], max_new_tokens=20, do_sample=False)

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for i, ids in enumerate(prompts):
            assert torch.equal(got.get(i), local.generate(ids, max_new_tokens=20, do_sample=False)), i
        assert all(counters(connection, p)["decode_rows"] > counters(connection, p)["decode_batches"] for p in peers)
    finally:
        connection.close()
