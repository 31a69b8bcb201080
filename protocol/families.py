"""Model families: what "block i of model M" is, for each supported architecture.

A family is a small adapter over the installed transformers classes: which decoder-layer and
rotary-embedding classes it uses, where a block's weights live in a checkpoint, and which blocks
use a sliding attention window. Register a new family with ``register_family``.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from .errors import BadRequest


@dataclass(frozen=True)
class Family:
    model_type: str  # config.model_type
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class-name prefix, e.g. "Llama" for LlamaDecoderLayer
    block_prefix: str = "model.layers.{}."  # where block i's weights live in the checkpoint

    def _modeling(self):
        return importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")

    def make_block(self, config: PretrainedConfig, index: int) -> torch.nn.Module:
        """An uninitialised (meta-device) decoder layer for global block ``index``."""
        layer_cls = getattr(self._modeling(), f"{self.prefix}DecoderLayer")
        with torch.device("meta"):
            return layer_cls(config, index)

    def make_rotary(self, config: PretrainedConfig) -> torch.nn.Module:
        return getattr(self._modeling(), f"{self.prefix}RotaryEmbedding")(config=config)

    def window(self, config: PretrainedConfig, index: int) -> int | None:
        """The sliding attention window of block ``index``, or None for full attention."""
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return config.sliding_window if layer_types[index] == "sliding_attention" else None
        return getattr(config, "sliding_window", None)


def _cache_argument() -> str:
    """The name transformers gives the attention-cache argument: ``cache`` since 5.24, before that
    ``past_key_values`` (still accepted, with a warning, until 6)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


CACHE_ARG = _cache_argument()  # pass caches as ``**{CACHE_ARG: cache}``
_FAMILIES: dict[str, Family] = {}


def kv_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(key/value heads, head dim) of one block's attention cache."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads, head_dim


def register_family(family: Family) -> None:
    _FAMILIES[family.model_type] = family


def family_of(config: PretrainedConfig) -> Family:
    try:
        return _FAMILIES[config.model_type]
    except KeyError:
        raise BadRequest(
            f"model family {config.model_type!r} is not supported; supported: {', '.join(sorted(_FAMILIES))}"
        ) from None


def supported_families() -> list[str]:
    return sorted(_FAMILIES)


register_family(Family("llama", "llama", "Llama"))
register_family(Family("mistral", "mistral", "Mistral"))
register_family(Family("qwen2", "qwen2", "Qwen2"))
register_family(Family("qwen3", "qwen3", "Qwen3"))
