"""Model families: what "block i of model M" is, for each supported architecture.

A family is a small adapter over the installed transformers classes: which decoder-layer and
rotary-embedding classes it uses, where a block's weights live in a checkpoint, and which blocks
use a sliding attention window. Any decoder-only model whose transformers code follows the
common layout (one ``*DecoderLayer`` class called with hidden states, position embeddings from
one ``*RotaryEmbedding``, a mask and a cache, returning hidden states, first if in a tuple) is
served by a family derived from its ``model_type`` (``family_of``): Llama, Mistral, Qwen2/3,
Mixtral, Qwen3-MoE, Phi-3, gpt-oss and Gemma 3 are tested. Register a family with
``register_family`` only where a model differs; an architecture outside the layout gets a
BadRequest naming what is missing.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch
import transformers
from transformers import PretrainedConfig

from .errors import BadRequest


@dataclass(frozen=True)
class Family:
    model_type: str  # config.model_type
    module: str  # transformers.models.<module>.modeling_<module>
    layer_class: str  # e.g. "LlamaDecoderLayer"
    rotary_class: str  # e.g. "LlamaRotaryEmbedding"
    block_prefix: str = "model.layers.{}."  # where block i's weights live in the checkpoint

    def _modeling(self):
        return importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")

    def make_block(self, config: PretrainedConfig, index: int) -> torch.nn.Module:
        """An uninitialised (meta-device) decoder layer for global block ``index``."""
        layer_cls = getattr(self._modeling(), self.layer_class)
        with torch.device("meta"):
            return layer_cls(config, index)

    def make_rotary(self, config: PretrainedConfig) -> torch.nn.Module:
        return getattr(self._modeling(), self.rotary_class)(config=config)

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


def rope_switch(config: PretrainedConfig) -> int | None:
    """Where a longrope model (Phi-3-mini-128k, Phi-3.5) switches to its long factors: a sequence
    longer than this many tokens is computed with them from its first token, so transformers drops
    its cache and computes the whole sequence again when a generation grows past it (None: the
    model's rope does not switch)."""
    rope = getattr(config, "rope_parameters", None) or {}
    switch = getattr(config, "original_max_position_embeddings", None)
    return switch if isinstance(rope, dict) and rope.get("rope_type") == "longrope" and switch else None


def register_family(family: Family) -> None:
    _FAMILIES[family.model_type] = family


def family_of(config: PretrainedConfig) -> Family:
    """The registered family of ``config.model_type``, else one derived from its transformers code."""
    family = _FAMILIES.get(config.model_type)
    if family is None:
        family = _FAMILIES[config.model_type] = derived_family(config.model_type)
    return family


def derived_family(model_type: str) -> Family:
    """A family from the installed transformers' code for ``model_type``: its modeling module's
    decoder-layer and rotary-embedding classes; BadRequest naming what is missing."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    base = MODEL_MAPPING_NAMES.get(model_type)
    if base is None:
        raise BadRequest(f"model type {model_type!r} has no transformers base model here (transformers "
                         f"{transformers.__version__}); Potluck serves decoder-only models transformers knows")
    module = model_type_to_module_name(model_type)
    try:
        modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    except ImportError as e:
        raise BadRequest(f"model type {model_type!r}: cannot import its transformers code ({e})") from None
    prefix = base.removesuffix("Model")
    found = {}
    for suffix in ("DecoderLayer", "RotaryEmbedding"):
        names = [n for n, v in vars(modeling).items() if n.endswith(suffix) and isinstance(v, type)]
        preferred = f"{prefix}{suffix}"
        if preferred in names or len(names) == 1:
            found[suffix] = preferred if preferred in names else names[0]
        else:
            what = "decoder-layer" if suffix == "DecoderLayer" else "rotary position embedding"
            raise BadRequest(f"model type {model_type!r} is not served: its transformers code has no single "
                             f"{what} class (*{suffix}: {', '.join(names) or 'none'}); Potluck serves decoder-only "
                             "models with one decoder-layer class and rotary position embeddings")
    return Family(model_type, module, found["DecoderLayer"], found["RotaryEmbedding"])


def supported_families() -> list[str]:
    """Families tested with Potluck (others following the common layout are derived when met)."""
    return sorted(TESTED)


TESTED = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "phi3", "gpt_oss", "gemma3_text")
