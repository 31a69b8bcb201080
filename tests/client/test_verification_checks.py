"""The comparisons verification makes: relative differences per token, and suspicious scales."""
import torch

from potluck.client import verification
from potluck.client.verification import TOLERANCE, difference


def suspicious(hidden, usual):
    return verification.suspicious(verification.token_scale(hidden), usual)


def test_difference_is_the_worst_token_relative_to_its_norm():
    a = torch.ones(2, 3, 4)
    b = a.clone()
    assert difference(a, b) == 0
    b[1, 2] *= 1.01  # one token off by 1 %
    assert abs(difference(b, a) - 0.01) < 1e-6
    assert difference(a + 1e-7 * torch.randn(2, 3, 4), a) < TOLERANCE["float32"]


def test_difference_of_16_bit_outputs_is_measured_in_float32():
    a = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    assert difference(a.bfloat16(), a) < TOLERANCE["bfloat16"]
    assert difference((a * 1.5).bfloat16(), a) > TOLERANCE["bfloat16"]


def test_scales_far_from_the_usual_are_suspicious():
    out = torch.full((1, 4, 8), 3.0)
    assert not suspicious(out, None)  # nothing to compare with yet
    assert not suspicious(out, 3.0) and not suspicious(out, 6.0)
    assert suspicious(out * 10, 3.0) and suspicious(out / 10, 3.0)
    sink = out.clone()
    sink[0, 0] *= 9  # a first token far above the rest, as attention sinks are, is normal
    assert not suspicious(sink, 3.0)
    sink[0, 0] *= 10
    assert suspicious(sink, 3.0)
