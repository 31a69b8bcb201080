"""A block's weights as the installed transformers' layer names them.

Checkpoints of mixture-of-experts models (Mixtral, Qwen3-MoE, ...) store each expert's
projections as separate tensors (``...experts.3.w1.weight``); transformers 5 layers hold all
experts in one tensor (``...experts.gate_up_proj``) and convert when ``from_pretrained`` loads.
A node loads one block's tensors itself, so it applies the same conversion, read from
transformers' own table for the model type (``transformers.conversion_mapping``): renamings, and
converters whose operations stack a list of per-expert tensors and concatenate them. A table
entry with any other operation is refused with a BadRequest naming it.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from .errors import BadRequest


def convert_block(model_type: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` (full checkpoint names of one block) renamed and merged as the layer expects."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming

    for transform in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(transform, WeightConverter):
            unknown = [type(op).__name__ for op in transform.operations if not isinstance(op, (MergeModulelist,
                                                                                                 Concatenate))]
            if unknown:
                raise BadRequest(f"{model_type} checkpoints need a weight conversion Potluck does not do yet "
                                 f"({', '.join(unknown)})")
            weights = _merged(transform, weights)
        elif isinstance(transform, WeightRenaming):
            for source, target in zip(transform.source_patterns, transform.target_patterns):
                weights = {re.sub(source, target, name): tensor for name, tensor in weights.items()}
    return weights


def _merged(converter, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply one converter: per module (the name before the pattern), its sources' tensors in expert
    order through the converter's operations, stored under the target pattern."""
    sources = converter.source_patterns
    matchers = [re.compile(re.escape(p).replace(r"\*", r"(\d+)") + "$") for p in sources]
    groups: dict[str, dict[str, list[tuple[int, torch.Tensor]]]] = defaultdict(lambda: defaultdict(list))
    rest = {}
    for name, tensor in weights.items():
        for pattern, matcher in zip(sources, matchers):
            found = matcher.search(name)
            if found:
                index = int(found.group(1)) if found.groups() else 0
                groups[name[:found.start()]][pattern].append((index, tensor))
                break
        else:
            rest[name] = tensor
    for module, by_pattern in groups.items():
        data: dict = {p: [t for _, t in sorted(by_pattern[p], key=lambda item: item[0])]
                      for p in sources if p in by_pattern}
        for op in converter.operations:
            data = op.convert(data, source_patterns=list(sources), target_patterns=list(converter.target_patterns))
        for target, tensor in data.items():
            rest[module + target] = tensor
    return rest
