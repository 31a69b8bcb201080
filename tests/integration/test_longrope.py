"""A Phi-3 whose rope switches to long factors past a length (Phi-3-mini-128k past 4096 tokens):
a generation that grows past it gives transformers' tokens, through the Python API and through
`potluck serve` with other requests in the same batches (transformers computes the whole sequence
again at the switch; nodes scale each row by its own length)."""
import concurrent.futures

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from potluck import AutoDistributedModelForCausalLM
from potluck.client.transport import SwarmConnection

from helpers import start_serve, stop

SWITCH = 16  # the tiny model's original_max_position_embeddings


@pytest.fixture(scope="module")
def swarm(phi3_longrope, swarm_factory):
    swarm = swarm_factory()
    swarm.start_nodes(phi3_longrope, ["0:2", "2:4"])
    return swarm


def ids(length, seed):
    return torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


def test_a_generation_that_grows_past_the_switch_gives_transformers_tokens(phi3_longrope, swarm):
    local = AutoModelForCausalLM.from_pretrained(phi3_longrope).eval()
    connection = SwarmConnection(swarm.initial_peers)
    try:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(phi3_longrope), swarm=connection)
        for length in (10, SWITCH, 30):  # crosses it while generating; at the first new token; starts past it
            prompt = ids(length, seed=length)
            assert torch.equal(remote.generate(prompt, max_new_tokens=16, do_sample=False),
                               local.generate(prompt, max_new_tokens=16, do_sample=False)), length
    finally:
        connection.close()


def test_serve_gives_each_request_its_own_tokens_across_the_switch(phi3_longrope, swarm, tmp_path):
    local = AutoModelForCausalLM.from_pretrained(phi3_longrope).eval()
    tokenizer = AutoTokenizer.from_pretrained(phi3_longrope)
    proc, base_url = start_serve(phi3_longrope, swarm.initial_peers, tmp_path)
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    prompts = [ids(length, seed=length) for length in (4, 10, 30)]  # stays short; crosses; starts past it

    def complete(prompt):
        return client.completions.create(model=phi3_longrope.name, prompt=prompt[0].tolist(), max_tokens=10,
                                         temperature=0).choices[0].text

    try:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(complete, prompts))  # together: the nodes batch their steps
    finally:
        stop(proc)
    for prompt, text in zip(prompts, texts):
        expected = local.generate(prompt, max_new_tokens=10, do_sample=False)[0, prompt.shape[1]:]
        assert text == tokenizer.decode(expected, skip_special_tokens=True), prompt.shape
