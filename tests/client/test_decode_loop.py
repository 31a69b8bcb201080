"""How the serving loop picks a request's next token (the rest is tested through `potluck serve`)."""
import torch

from potluck.client.decode_loop import DecodeLoop, Request


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


def test_a_seeded_request_samples_the_same_tokens_whatever_else_runs():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    first, second = request(0.9, seed=7), request(0.9, seed=7)
    a = [DecodeLoop._choose(first, logits) for _ in range(10)]
    torch.rand(1000)  # the global generator moves: a request's own does not
    assert a == [DecodeLoop._choose(second, logits) for _ in range(10)]
