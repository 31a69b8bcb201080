"""How the serving loop picks a request's next token and orders its work; its batches through a
real swarm are tested through `potluck serve`."""
import asyncio
import threading
import time
import types

import pytest
import torch
from transformers import LlamaConfig

from devices import OTHER_DEVICE
from potluck.client import decode_loop
from potluck.client.decode_loop import DecodeLoop, Request
from potluck.client.packed_head import PackedHead, packed_head


def request(temperature, top_p=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Request([1], 4, temperature, top_p, generator, on_token=lambda t: False, on_end=lambda e: None)


def test_greedy_takes_the_most_likely_token():
    assert DecodeLoop._choose(request(0.0), torch.tensor([0.1, 3.0, 2.9])) == 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.05, 0.6, 0.3, 0.05]))
    picks = {DecodeLoop._choose(request(1.0, top_p=0.5, seed=s), logits) for s in range(50)}
    assert picks == {1}  # 0.6 alone reaches 0.5
    picks = {DecodeLoop._choose(request(1.0, top_p=0.85, seed=s), logits) for s in range(200)}
    assert picks == {1, 2}  # 0.6 + 0.3 reach 0.85; the 0.05 tails are cut
    picks = {DecodeLoop._choose(request(1.0, top_p=0.0, seed=s), logits) for s in range(50)}
    assert picks == {1}  # top_p 0 (OpenAI accepts it): the most likely token only


def test_a_seeded_request_samples_the_same_tokens_whatever_else_runs():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    first, second = request(0.9, seed=7), request(0.9, seed=7)
    a = [DecodeLoop._choose(first, logits) for _ in range(10)]
    torch.rand(1000)  # the global generator moves: a request's own does not
    assert a == [DecodeLoop._choose(second, logits) for _ in range(10)]


def test_logit_bias_and_penalties_change_the_logits_as_openai_defines_them():
    biased = request(0.0)
    biased.logit_bias = {0: 5.0, 2: -100.0}
    biased.presence_penalty, biased.frequency_penalty = 0.5, 0.25
    biased.counts.update([1, 1, 1, 3])  # generated so far: token 1 three times, token 3 once
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    expected = torch.tensor([5.0, 1.0 - 0.5 - 3 * 0.25, 2.0 - 100.0, 3.0 - 0.5 - 0.25, 4.0])
    assert torch.equal(decode_loop._adjusted(biased, logits), expected)
    assert torch.equal(logits, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))  # the round's logits are left as they were
    assert DecodeLoop._choose(biased, logits) == 0  # greedy on the adjusted logits: 5.0 beats 4.0
    plain = request(0.0)
    assert decode_loop._adjusted(plain, logits) is logits and not plain.needs_logits
    assert biased.needs_logits


def test_a_banned_token_is_never_sampled_and_a_forced_one_always_is():
    logits = torch.zeros(50)
    banned = request(1.0, seed=3)
    banned.logit_bias = {token: -100.0 for token in range(49)}
    assert {DecodeLoop._choose(banned, logits) for _ in range(20)} == {49}
    forced = request(1.5, top_p=0.9, seed=4)
    forced.logit_bias = {7: 100.0}
    assert {DecodeLoop._choose(forced, logits) for _ in range(20)} == {7}


class _Session:
    """Stands for an inference session: a step's output is its input (the embeddings), after the
    test lets it finish; what happens is written to a shared log."""

    def __init__(self, view, max_length):
        self.view, self.position, self.closed = view, 0, False
        self.number = len(view.sessions)
        view.sessions.append(self)

    def step_async(self, hidden, positions):
        position = int(positions[0, 0])
        self.view.log.append(("step", self.number, position))
        self.position += hidden.shape[1]
        self.view.swarm.loop.call_soon_threadsafe(time.sleep, 0.005)  # a busy swarm loop: the step runs late

        async def step():
            self.view.log.append(("written", self.number, position))  # where a session writes its frame
            await self.view.released.wait()
            if position >= 2 and self.number in self.view.held:  # a hung node: this session's steps from here on
                await self.view.held[self.number].wait()
            return hidden

        return step()

    def close(self):
        self.view.log.append(("close", self.number))


class _Model(torch.nn.Module):
    """Embeddings, norm and lm_head of a 6-token vocabulary; the swarm is ``_Session``."""

    def __init__(self, view):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(6, 4, _weight=torch.randn(6, 4, generator=generator))
        self.model.norm = torch.nn.Identity()
        self.lm_head = torch.nn.Linear(4, 6, bias=True)
        self.config = LlamaConfig(vocab_size=6, hidden_size=4, num_attention_heads=1)  # a plain rope: no switch
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(6, 4, generator=generator))
            self.lm_head.bias.copy_(torch.randn(6, generator=generator))
        self.device, self.swarm_view = torch.device("cpu"), view


@pytest.fixture
def loop_and_view(monkeypatch):
    monkeypatch.setattr(decode_loop, "InferenceSession", _Session)
    view = types.SimpleNamespace(sessions=[], log=[], swarm=types.SimpleNamespace(loop=asyncio.new_event_loop()))
    view.released, view.held = asyncio.Event(), {}  # session number -> event its steps wait for
    thread = threading.Thread(target=view.swarm.loop.run_forever, daemon=True)
    thread.start()
    loop = DecodeLoop(_Model(view), eos_ids=set())
    yield loop, view
    loop.close()
    view.swarm.loop.call_soon_threadsafe(view.swarm.loop.stop)
    thread.join(5)


def release(view):
    """Let every step finish from now on."""
    view.swarm.loop.call_soon_threadsafe(view.released.set)


def greedy_chain(model, first, count):
    """The tokens a session whose steps return their input gives: the lm_head of the last token's embedding."""
    tokens, last = [], first
    for _ in range(count):
        last = int(model.lm_head(model.model.embed_tokens.weight[last]).argmax())
        tokens.append(last)
    return tokens


def submit(loop, prompt, max_tokens, log, stop_at=None):
    ended = threading.Event()

    def on_token(token):
        log.append(("token", prompt[-1], token))
        return stop_at is not None and len([e for e in log if e[:2] == ("token", prompt[-1])]) == stop_at

    def on_end(error):
        log.append(("end", prompt[-1], error))
        ended.set()

    loop.submit(Request(prompt, max_tokens, 0.0, 1.0, torch.Generator(), on_token, on_end))
    return ended


def test_a_round_leaves_before_its_tokens_are_handed_out(loop_and_view):
    loop, view = loop_and_view
    release(view)
    prompts = (1, 2, 5)
    ends = [submit(loop, [p], 4, view.log) for p in prompts]
    assert all(end.wait(10) for end in ends)
    for number, prompt in enumerate(prompts):  # sessions open in the order requests arrive
        handed = [i for i, e in enumerate(view.log) if e[:2] == ("token", prompt)]
        assert [view.log[i][2] for i in handed] == greedy_chain(loop.model, prompt, 4)
        steps = [i for i, e in enumerate(view.log) if e[:2] == ("step", number)]
        assert [view.log[i][2] for i in steps] == [0, 1, 2, 3]  # the prompt, then a token a step
        written = [i for i, e in enumerate(view.log) if e[:2] == ("written", number)]
        assert [view.log[i][2] for i in written] == [0, 1, 2, 3]
        assert all(step < token for step, token in zip(written[1:], handed))  # a token's next step left first
        assert handed[-1] < view.log.index(("close", number)) < view.log.index(("end", prompt, None))


def test_a_step_held_by_a_hung_node_holds_up_only_its_own_request(loop_and_view):
    loop, view = loop_and_view
    view.held[1] = asyncio.Event()  # the second request's node hangs at its third step
    release(view)
    prompts = (1, 2, 5)
    ends = [submit(loop, [p], 6, view.log) for p in prompts]
    assert ends[0].wait(10) and ends[2].wait(10)  # the others' rounds went on without it
    assert not ends[1].is_set()
    assert [e[2] for e in view.log if e[:2] == ("token", 2)] == greedy_chain(loop.model, 2, 2)
    view.swarm.loop.call_soon_threadsafe(view.held[1].set)  # its session fails over, say: it goes on
    assert ends[1].wait(10)
    for prompt in prompts:
        assert [e[2] for e in view.log if e[:2] == ("token", prompt)] == greedy_chain(loop.model, prompt, 6)


def test_a_stop_string_answers_at_once_and_the_session_closes_when_its_step_is_back(loop_and_view):
    loop, view = loop_and_view
    ended = submit(loop, [1], 8, view.log, stop_at=1)
    for _ in range(200):  # the prompt's step is held until released
        if view.log:
            break
        time.sleep(0.01)
    release(view)
    assert ended.wait(10)
    for _ in range(200):
        if ("close", 0) in view.log:
            break
        time.sleep(0.01)
    assert [e[0] for e in view.log if e[0] != "written"] == ["step", "step", "token", "end", "close"]  # the second
    # step was in flight
    assert view.log[-3] == ("token", 1, greedy_chain(loop.model, 1, 1)[0])


def test_a_request_that_fails_to_start_ends_alone(loop_and_view):
    loop, view = loop_and_view
    release(view)
    errors, ended = [], threading.Event()

    def on_end(error):
        errors.append(error)
        ended.set()

    # no tokens to embed: the server refuses such a prompt sooner; here it reaches the loop, which must not fall
    loop.submit(Request([], 4, 0.0, 1.0, torch.Generator(), on_token=lambda t: False, on_end=on_end))
    good = submit(loop, [1], 4, view.log)
    assert ended.wait(10) and good.wait(10)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert [e[2] for e in view.log if e[:2] == ("token", 1)] == greedy_chain(loop.model, 1, 4)
    assert ("end", 1, None) in view.log


def test_a_request_whose_sampling_fails_ends_alone(loop_and_view, monkeypatch):
    loop, view = loop_and_view

    def choose(request, logits):
        raise FloatingPointError("probabilities with inf")  # as torch.multinomial on logits / 1e-45

    monkeypatch.setattr(DecodeLoop, "_choose", staticmethod(choose))
    release(view)
    errors, ended = [], threading.Event()
    loop.submit(Request([2], 4, 0.7, 1.0, torch.Generator(), on_token=lambda t: False,
                        on_end=lambda e: (errors.append(e), ended.set())))
    good = submit(loop, [1], 4, view.log)
    assert ended.wait(10) and good.wait(10)
    assert len(errors) == 1 and isinstance(errors[0], FloatingPointError)
    assert [e[2] for e in view.log if e[:2] == ("token", 1)] == greedy_chain(loop.model, 1, 4)


@pytest.mark.parametrize("chunk_bytes", [decode_loop.LOGITS_CHUNK_BYTES, 40])
def test_choices_are_the_lm_heads_greedy_tokens_and_logits_whatever_the_chunks(loop_and_view, monkeypatch,
                                                                                chunk_bytes):
    loop, _ = loop_and_view
    monkeypatch.setattr(decode_loop, "LOGITS_CHUNK_BYTES", chunk_bytes)  # 40 bytes, 5 rows: 2 tokens a chunk
    with torch.no_grad():
        loop.model.lm_head.weight[5] = loop.model.lm_head.weight[1]  # a tie across chunks: the first token wins
        loop.model.lm_head.bias[5] = loop.model.lm_head.bias[1]
        last = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
        last[4] = loop.model.lm_head.weight[1] * 10  # so that row's best token is 1 (and 5, equal)
        expected = loop.model.lm_head(loop.model.model.norm(last))
        greedy, logits = loop._choices(last, [0, 3])
    assert greedy == expected.argmax(1).tolist() and greedy[4] == 1
    assert torch.allclose(logits, expected[[0, 3]].t(), atol=1e-6)
    assert loop._choices(last, [])[1] is None


def test_the_lm_head_runs_in_chunks_on_a_cpu_and_whole_on_a_gpu():
    vocab = 128256
    assert decode_loop.logits_chunk(32, torch.empty(vocab, 8)) == decode_loop.LOGITS_CHUNK_BYTES // (4 * 32) < vocab
    assert decode_loop.logits_chunk(1, torch.empty(vocab, 8)) == decode_loop.LOGITS_CHUNK_BYTES // 4
    assert decode_loop.logits_chunk(32, torch.empty(vocab, 8, device=OTHER_DEVICE)) == vocab


def test_choices_of_a_packed_head_are_the_linears(loop_and_view):
    loop, _ = loop_and_view
    head = loop.model.lm_head
    loop.model.lm_head = packed_head(head)
    assert isinstance(loop.model.lm_head, PackedHead)
    with torch.no_grad():
        last = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
        expected = head(loop.model.model.norm(last))
        greedy, logits = loop._choices(last, [1, 6])
    assert greedy == expected.argmax(1).tolist()
    torch.testing.assert_close(logits, expected[[1, 6]].t(), rtol=0, atol=1e-5)
