"""Weights in 8 or 4 bits on a node (``potluck node --quant int8|nf4``), applied block by block as
a span loads, so a node's memory follows the quantised span (one block in full precision at most).

The numbers are torchao's (weight-only): int8 keeps one scale per output row; NF4 keeps 4-bit
codes in groups of 64 with double-quantised scales, and computes by unpacking a weight to the
node's dtype when it is used (CPU and CUDA alike). A linear layer's weight becomes a torchao
tensor that ``F.linear`` understands. A mixture-of-experts weight (one matrix per expert, a 3D
tensor) is packed expert by expert and unpacked only for the experts a step's tokens use; such a
layer then runs transformers' eager experts loop, which reads one expert's matrix at a time.
Norms, biases, attention sinks and routers stay in the node's dtype: they are small, and a
router's choice of experts is not rounded.
"""
from __future__ import annotations

import copy
import importlib
import math
import warnings

import torch

from potluck.protocol.errors import BadRequest

QUANTS = ("none", "int8", "nf4")
NF4_GROUP = 64  # weights per 4-bit group (one scale each)
NF4_SCALE_GROUP = 256  # group scales per second-level scale
NF4_CHUNK = 2**16  # values matched to NF4 codes at once (64 bytes of scratch each)


def check(quant: str) -> str:
    """``quant`` if this node can store weights that way, else BadRequest saying what to do."""
    if quant not in QUANTS:
        raise BadRequest(f"--quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    if quant != "none":
        try:
            _import_torchao()
        except ImportError:
            raise BadRequest(f"--quant {quant} needs torchao: pip install torchao==0.18.0 (or pip install -e "
                             "'.[quant]' in a clone)") from None
    return quant


def quantize_block(block: torch.nn.Module, quant: str) -> torch.nn.Module:
    """``block`` with its linear and expert weights in ``quant`` (in place); "none" leaves it."""
    if check(quant) == "none":
        return block
    for module in list(block.modules()):
        if isinstance(module, torch.nn.Linear) and packable(module.weight, quant):
            module.weight = torch.nn.Parameter(_pack(module.weight.detach(), quant), requires_grad=False)
        experts = [name for name, p in module.named_parameters(recurse=False) if p.dim() == 3]
        for name in experts:
            weight = module._parameters.pop(name)
            setattr(module, name, PackedExperts(weight.detach(), quant))
        if experts and hasattr(module, "config"):  # the loop that reads one expert at a time
            module.config = copy.copy(module.config)
            module.config._experts_implementation = "eager"
    for param in block.parameters():  # what stays unpacked may be a view of the checkpoint's mapped file:
        if type(param.data) is torch.Tensor:  # copied, so the file's pages read while packing are let go
            param.data = param.data.clone()
    return block


def block_bytes(block: torch.nn.Module, quant: str, dtype: torch.dtype) -> int:
    """Bytes ``block`` (built on any device, "meta" included) takes in ``dtype`` with its weights
    in ``quant``: what ``quantize_block`` would pack, packed; the rest in ``dtype``."""
    packed = set()
    if quant != "none":
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        packed = {id(m.weight) for m in linears if packable(m.weight, quant)}
        packed |= {id(p) for p in block.parameters() if p.dim() == 3}
    value_bytes = torch.finfo(dtype).bits // 8
    return sum(packed_bytes(tuple(p.shape), quant, dtype) if id(p) in packed else p.numel() * value_bytes
               for p in block.parameters())


def packable(weight: torch.Tensor, quant: str) -> bool:
    """Whether a 2D weight of this shape is stored in ``quant`` (NF4 needs whole groups)."""
    return quant == "int8" or weight.numel() % NF4_GROUP == 0


def packed_bytes(shape: tuple[int, ...], quant: str, dtype: torch.dtype) -> int:
    """Bytes a weight of ``shape`` takes packed in ``quant`` (2D: a linear weight; 3D: experts)."""
    numel, value_bytes = math.prod(shape), torch.finfo(dtype).bits // 8
    rows = numel // shape[-1]
    if quant == "int8":
        return numel + rows * value_bytes  # codes, one scale per row
    if quant == "nf4" and numel % NF4_GROUP == 0:
        groups = numel // NF4_GROUP  # codes, a byte per group's scale, their own scales, the 16-value table
        return numel // 2 + groups + math.ceil(groups / NF4_SCALE_GROUP) * 4 + 16 * value_bytes
    return numel * value_bytes


class PackedExperts:
    """A mixture-of-experts weight [experts, rows, columns] packed one expert at a time; indexing it
    with an expert's number gives that expert's matrix in the node's dtype."""

    def __init__(self, weight: torch.Tensor, quant: str):
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device
        self.experts = [_pack(matrix, quant) for matrix in weight]

    def __getitem__(self, index) -> torch.Tensor:
        return _unpack(self.experts[int(index)], self.dtype)

    def __len__(self) -> int:
        return len(self.experts)

    def dim(self) -> int:
        return 3


def _pack(weight: torch.Tensor, quant: str) -> torch.Tensor:
    _import_torchao()
    if quant == "int8":
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow

        return Int8Tensor.from_hp(weight, granularity=PerRow())
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    nf4_tensor.CHUNK_SIZE = NF4_CHUNK  # its module-wide default: scratch of 128 MB per tensor packed
    groups = weight.numel() // NF4_GROUP
    scale_group = math.gcd(groups, NF4_SCALE_GROUP)  # tiny test models have fewer groups than 256
    return nf4_tensor.to_nf4(weight.contiguous(), block_size=NF4_GROUP, scaler_block_size=scale_group)


def _import_torchao() -> None:
    """Import torchao (its start-up notices are silenced in ``potluck/__init__``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importlib.import_module("torchao.quantization")


def _unpack(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if hasattr(packed, "get_original_weight"):  # NF4
        return packed.get_original_weight().to(dtype)
    return packed.dequantize().to(dtype)
