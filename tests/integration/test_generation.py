"""Through a real swarm of 3 node processes, each family generates exactly what transformers does."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "phi3", "gpt_oss", "gemma3_text")


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints[request.param]
    swarm = swarm_factory()
    swarm.start_nodes(path, ["0:3", "3:6", "6:8"])
    connection = SwarmConnection(swarm.initial_peers)
    remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    yield remote, local
    connection.close()
    swarm.stop()  # now, not with the module: nine families' idle nodes would share the two cores


def prompt(batch=1, length=16, seed=0):
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_greedy_generation_matches_local(setup):
    remote, local = setup
    ids = prompt()
    expected = local.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(remote.generate(ids, max_new_tokens=32, do_sample=False), expected)


def test_forward_logits_match_local(setup):
    remote, local = setup
    ids = prompt(batch=2, length=20, seed=1)
    with torch.no_grad():
        expected = local(ids).logits
    got = remote(ids).logits
    assert (got - expected).abs().max() < 1e-4


def test_seeded_sampling_matches_local(setup):
    remote, local = setup
    ids = prompt(seed=2)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=40, top_p=0.9)
    torch.manual_seed(7)
    expected = local.generate(ids, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(remote.generate(ids, **kwargs), expected)


def test_session_continues_across_generate_calls(setup):
    remote, local = setup
    ids, more = prompt(seed=3), torch.tensor([[11, 12, 13]])
    with remote.inference_session(max_length=64) as session:
        first = remote.generate(ids, max_new_tokens=8, do_sample=False)
        sent_before = session.position
        second = remote.generate(more, max_new_tokens=8, do_sample=False)  # only the new tokens
        assert session.position - sent_before == 3 + 1 + 7  # last generated token, new ids, new steps
        third = remote.generate(second, max_new_tokens=4, do_sample=False)  # the whole conversation
    assert torch.equal(first, local.generate(ids, max_new_tokens=8, do_sample=False))
    assert torch.equal(second, local.generate(torch.cat([first, more], 1), max_new_tokens=8, do_sample=False))
    assert torch.equal(third, local.generate(second, max_new_tokens=4, do_sample=False))


def test_edited_conversation_rewinds_the_caches(setup):
    remote, local = setup
    ids = prompt(seed=4)
    edited = ids.clone()
    edited[0, 10:] = 5
    with remote.inference_session(max_length=64):
        first = remote.generate(ids, max_new_tokens=6, do_sample=False)
        got = remote.generate(edited, max_new_tokens=6, do_sample=False)
        again = remote.generate(ids, max_new_tokens=6, do_sample=False)  # a prefix of what the nodes held
    assert torch.equal(got, local.generate(edited, max_new_tokens=6, do_sample=False))
    assert torch.equal(again, first)


def test_left_padded_batch_matches_local(setup):
    remote, local = setup
    ids = prompt(batch=2, length=10, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    expected = local.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    got = remote.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
