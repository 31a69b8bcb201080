"""The Python API used as transformers is: the ways of asking for a length, padding kept across a
session's calls, forward calls that continue a session, and what the swarm cannot do refused by
name before anything is sent (an honest node is never blamed for the caller's input)."""
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection
from potluck.protocol.errors import BadRequest, PotluckError


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, swarm_factory):
    path = tiny_checkpoints["llama"]
    swarm = swarm_factory()
    swarm.start_nodes(path, ["0:4", "4:8"])
    connection = SwarmConnection(swarm.initial_peers)
    remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    yield remote, local, path, connection
    connection.close()


def prompt(batch=1, length=6, seed=0):
    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_every_way_of_asking_for_a_length_gives_transformers_tokens(setup):
    remote, local, _, _ = setup
    ids = prompt()
    for kwargs in ({"generation_config": GenerationConfig(max_new_tokens=6)},  # was MaxLengthExceeded
                   {},  # transformers' default length (20 in all)
                   {"max_length": 9}):
        assert torch.equal(remote.generate(ids, do_sample=False, **kwargs),
                           local.generate(ids, do_sample=False, **kwargs)), kwargs


def test_beam_search_no_cache_and_inner_outputs_are_refused_by_name_however_asked(setup):
    remote, _, _, _ = setup
    ids = prompt()
    refused = [({"num_beams": 2}, "beam search"), ({"generation_config": GenerationConfig(num_beams=2)}, "beam search"),
               ({"use_cache": False}, "use_cache=False"), ({"cache_implementation": "static"}, "cache_implementation"),
               ({"output_hidden_states": True, "return_dict_in_generate": True}, "output_hidden_states")]
    for kwargs, words in refused:
        with pytest.raises(BadRequest, match=words):
            remote.generate(ids, max_new_tokens=3, **kwargs)
    with remote.inference_session(max_length=32):  # inside a session too (it gave other tokens)
        with pytest.raises(BadRequest, match="beam search"):
            remote.generate(ids, generation_config=GenerationConfig(num_beams=2, max_new_tokens=3))
    for kwargs in ({"output_hidden_states": True}, {"output_attentions": True}):
        with pytest.raises(BadRequest, match=next(iter(kwargs))):
            remote(ids, **kwargs)
    with pytest.raises(BadRequest, match="attention_mask of shape"):
        remote.generate(ids, attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=3)


def test_a_left_padded_batch_keeps_its_padding_across_a_sessions_calls(setup):
    remote, local, _, _ = setup
    ids, mask = prompt(batch=2, seed=1), torch.ones(2, 6, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0
    more = torch.tensor([[11], [12]])
    with remote.inference_session(max_length=32):
        first = remote.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        second = remote.generate(more, max_new_tokens=4, do_sample=False)  # only the new tokens
    assert torch.equal(first, local.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False))
    conversation = torch.cat([first, more], 1)
    whole_mask = torch.cat([mask, torch.ones(2, conversation.shape[1] - 6, dtype=torch.long)], 1)
    assert torch.equal(second, local.generate(conversation, attention_mask=whole_mask, max_new_tokens=4,
                                              do_sample=False))


def test_forward_calls_inside_a_session_continue_it(setup):
    remote, local, _, _ = setup
    ids = prompt(length=8, seed=2)
    with torch.no_grad():
        expected = local(ids).logits
        with remote.inference_session(max_length=16) as session:
            first = remote(ids[:, :5]).logits
            rest = remote(ids[:, 5:]).logits  # the next tokens, on the nodes' caches
            assert session.position == 8
    assert (first - expected[:, :5]).abs().max() < 1e-4 and (rest - expected[:, 5:]).abs().max() < 1e-4
    with pytest.raises(BadRequest, match="inference_session"):  # a cache it could not give back
        remote(ids, use_cache=True)


def test_a_generation_longer_than_its_session_is_refused_before_it_starts(setup):
    remote, _, _, _ = setup
    with remote.inference_session(max_length=12) as session:
        with pytest.raises(BadRequest, match="max_length=12"):
            remote.generate(prompt(), max_new_tokens=30)
        assert session.position == 0
        assert remote.generate(prompt(), max_new_tokens=4).shape == (1, 10)  # the session still serves


def test_hidden_states_no_node_takes_are_refused_before_sending_and_nobody_is_banned(setup):
    remote, local, path, connection = setup
    wide = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection).double()
    with pytest.raises(BadRequest, match="float64"):
        wide.generate(prompt(), max_new_tokens=3)
    with remote.inference_session(max_length=8) as session:
        for hidden in (torch.zeros(1, 2, 64, dtype=torch.float64), torch.zeros(1, 2, 64, device="meta")):
            with pytest.raises(BadRequest):
                session.step(hidden, torch.arange(2).unsqueeze(0))
    assert not wide.swarm_view.banned and not remote.swarm_view.banned
    ids = prompt(seed=3)
    assert torch.equal(remote.generate(ids, max_new_tokens=3, do_sample=False),
                       local.generate(ids, max_new_tokens=3, do_sample=False))


def test_arguments_of_the_wrong_kind_get_one_clear_line(setup):
    remote, _, path, connection = setup
    for length in (0, -5, 64.5):
        with pytest.raises(BadRequest, match="max_length"):
            with remote.inference_session(max_length=length):
                pass
    with pytest.raises(BadRequest, match="verify"):
        AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection, verify="0.1")
    one = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection, node_dtypes="float32")
    assert one.swarm_view.dtypes == {"float32"}  # one dtype, not the letters of its name
    with pytest.raises(BadRequest, match="at least one token"):
        remote(prompt()[:, :0])


def test_closing_the_model_while_another_thread_generates_is_a_potluck_error(setup):
    _, _, path, connection = setup
    own = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=connection.initial_peers)
    outcome = []

    def generate():
        try:
            own.generate(prompt(), max_new_tokens=400, min_new_tokens=400)
        except BaseException as e:  # noqa: BLE001 - what the thread saw is the point
            outcome.append(e)

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(1.0)
    own.close()
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], PotluckError), outcome  # was a bare CancelledError


def test_two_models_published_under_one_name_do_not_mix(tiny_checkpoints, swarm_factory):
    """Names come from folder names, so strangers' models may share one: each client routes only
    through nodes whose checkpoint has its own shape (it mixed them, or failed on the sizes)."""
    swarm = swarm_factory()
    paths = {family: tiny_checkpoints[family] for family in ("llama", "qwen3")}
    for path in paths.values():
        swarm.start_nodes(path, ["0:8"], "--model-name", "model")
    connection = SwarmConnection(swarm.initial_peers)
    try:
        for family, path in paths.items():
            remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm=connection, model_name="model")
            local = AutoModelForCausalLM.from_pretrained(path).eval()
            ids = prompt(seed=4)
            for _ in range(3):  # whichever node routing would have preferred
                remote.swarm_view.costs.local_sessions.clear()
                assert torch.equal(remote.generate(ids, max_new_tokens=4, do_sample=False),
                                   local.generate(ids, max_new_tokens=4, do_sample=False)), family
    finally:
        connection.close()
