"""The lm_head on a CPU, its weight also held in oneDNN's packed layout.

On the CPU the lm_head is the client's largest matrix product: it reads the whole vocabulary's
weights for every token (50 MB for the tiny test model, 113 MB for SmolLM2 in float32).
PyTorch's default kernel (MKL's) read them at 10 to 12 GB/s on this project's 2-core machine,
on 1 thread or 2; oneDNN's kernel, over a copy packed once at load, at 22 to 24 GB/s on 2
threads: one token's lm_head 1.8 to 2.4x as fast (1.2 to 1.5x on 1 thread), 32 rows' 1.2 to
1.4x (`scripts/bench lmhead`, README). The result is the same product, rounded differently
(about 1e-6 of a logit).
"""
from __future__ import annotations

import logging

import psutil
import torch

logger = logging.getLogger(__name__)
MEMORY_SHARE = 0.25  # the packed copy may take at most this share of the RAM available when it is made


class PackedHead(torch.nn.Linear):
    """``head`` (the same weight and bias, shared) computing with ``packed``, its weight packed.
    A weight changed since (in place, moved, cast) is packed again, or used as it is where it
    cannot be packed: the packed copy never answers for a weight that is no longer its own."""

    def __init__(self, head: torch.nn.Linear, packed: torch.Tensor):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight, self.bias = head.weight, head.bias  # a tied weight stays the embeddings' own
        self.packed: torch.Tensor | None = packed  # an opaque oneDNN tensor: not a parameter, never saved
        self._packed_from = _identity(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., V]
        if _identity(self.weight) != self._packed_from:
            self.packed, self._packed_from = _packed(self.weight), _identity(self.weight)
        if self.packed is None or hidden.device.type != "cpu" or hidden.dtype != self.packed.dtype:
            return torch.nn.functional.linear(hidden, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), self.packed, self.bias, "none", [], "")


def packed_head(head: torch.nn.Module) -> torch.nn.Module:
    """``head`` as a ``PackedHead`` where that helps: a float32 ``nn.Linear`` on the CPU, in a
    torch with oneDNN, whose packed copy fits in ``MEMORY_SHARE`` of the available RAM;
    otherwise ``head`` itself."""
    if type(head) is not torch.nn.Linear:
        return head
    packed = _packed(head.weight)
    return head if packed is None else PackedHead(head, packed)


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` packed for oneDNN, or None where it cannot or should not be."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    size = weight.numel() * weight.element_size()
    if size > MEMORY_SHARE * psutil.virtual_memory().available:
        logger.info("the lm_head (%.1f GiB) stays unpacked: a packed copy would take over %d%% of the free RAM",
                    size / 2**30, MEMORY_SHARE * 100)
        return None
    try:
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)
    except RuntimeError as error:  # a CPU or build oneDNN cannot pack for
        logger.debug("the lm_head stays unpacked: %s", error)
        return None


def _identity(weight: torch.Tensor) -> tuple:
    """What changes when a weight's values may have: its storage, device, dtype, in-place writes."""
    return weight.data_ptr(), weight.device, weight.dtype, weight._version
