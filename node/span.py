"""What a span of blocks computes: the decoder layers start:end, called as transformers calls them,
and how a node loads one from a checkpoint.

Only nodes compute spans (tests check them against the transformers model). The attention cache
is any transformers-style cache indexed by global block index: a node's ``cache_pool.PassCache``
or a ``DynamicCache``. A span computes on its weights'
device: inputs move there as they enter ``forward``, and every tensor it builds (masks, positions,
rotary tables, caches) is made there.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time

import torch
from safetensors import SafetensorError
from tqdm import tqdm
from transformers import DynamicCache, PretrainedConfig

from potluck.protocol.checkpoint import Checkpoint, load_tensors, tensor_files
from potluck.protocol.errors import BadRequest
from potluck.protocol.conversion import convert_block
from potluck.protocol.families import CACHE_ARG, Family, family_of

from . import hardware, quantize
from .quantize import quantize_block

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0  # without a progress bar (a log file), loading says how far it got this often


class Interrupted(Exception):
    """Loading or measuring gave up because the node was told to stop."""


class BlockSpan(torch.nn.Module):
    """Blocks ``start:end`` of one model, with the rotary embedding they share."""

    def __init__(self, config: PretrainedConfig, family: Family, start: int, blocks: list[torch.nn.Module]):
        super().__init__()
        self.config, self.start, self.end = config, start, start + len(blocks)
        self.blocks = torch.nn.ModuleList(blocks)
        weight = next(self.blocks.parameters())
        self.device, self.dtype = weight.device, weight.dtype  # where and in what it computes
        with torch.device(self.device):
            self.rotary = family.make_rotary(config)
        self.windows = [family.window(config, i) for i in range(self.start, self.end)]
        # rotary settings per layer type (Gemma 3: sliding and global layers differ), where the model has them
        typed = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.rope_types = [config.layer_types[i] if typed else None for i in range(self.start, self.end)]
        kinds = self.rotary.rope_type.values() if isinstance(self.rotary.rope_type, dict) else [self.rotary.rope_type]
        # Phi-3's longrope (and dynamic NTK) scale by the longest position of a call: each row by its own
        self.rope_by_length = any(kind == "longrope" or "dynamic" in str(kind) for kind in kinds)

    def blocks_by_index(self, indices: range) -> dict[int, torch.nn.Module]:
        """This span's blocks among ``indices`` (global), for ``load_span(reuse=...)``."""
        return {i: self.blocks[i - self.start] for i in indices if self.start <= i < self.end}

    def cache_length(self, cache: DynamicCache | None, start: int | None = None) -> int:
        start = self.start if start is None else start
        return cache.get_seq_length(layer_idx=start) if cache is not None else 0

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,  # [B, T, H]
        position_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, prefix + T], 1 = attend; None = no padding
        cache: DynamicCache | None = None,
        start: int | None = None,  # run only blocks start:end of this span (default: all)
        end: int | None = None,
        rope_until: list[int] | None = None,  # per row: the last position of its whole step (default: of these tokens)
    ) -> torch.Tensor:
        hidden = hidden.to(self.device, self.dtype)  # from the wire: CPU, any float dtype
        position_ids = position_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        first = 0 if start is None else start - self.start
        last = len(self.blocks) if end is None else end - self.start
        prefix = self.cache_length(cache, first + self.start)
        windows, rope_types = self.windows[first:last], self.rope_types[first:last]
        masks = {w: causal_mask(hidden, prefix, attention_mask, w) for w in set(windows)}
        rotary = {t: self._rotary(hidden, position_ids, t, rope_until) for t in set(rope_types)}
        for block, window, rope_type in zip(self.blocks[first:last], windows, rope_types):
            out = block(
                hidden,
                attention_mask=masks[window],
                position_embeddings=rotary[rope_type],
                position_ids=position_ids,
                **{CACHE_ARG: cache},
                use_cache=cache is not None,
            )
            hidden = out[0] if isinstance(out, tuple) else out  # some layers also return attention weights
        return hidden

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, rope_type: str | None,
                rope_until: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``position_ids``. A rope whose scale depends on the longest position of
        the call (``rope_by_length``) gets each row's own: its step's last position (a long prompt
        runs in chunks, and rows of other sessions share the pass; transformers runs a prompt in
        one call, and each session alone)."""
        typed = {"layer_type": rope_type} if rope_type else {}
        if not self.rope_by_length:
            return self.rotary(hidden, position_ids=position_ids, **typed)
        rows = []
        for b in range(hidden.shape[0]):
            positions = position_ids[b:b + 1]
            if rope_until is not None:  # an extra column at the step's last position sets the scale, then goes
                positions = torch.cat([positions, positions.new_full((1, 1), rope_until[b])], 1)
            cos, sin = self.rotary(hidden[b:b + 1], position_ids=positions, **typed)
            rows.append((cos[:, :position_ids.shape[1]], sin[:, :position_ids.shape[1]]))
        return torch.cat([cos for cos, _ in rows]), torch.cat([sin for _, sin in rows])


def causal_mask(
    hidden: torch.Tensor, prefix: int, attention_mask: torch.Tensor | None, window: int | None
) -> torch.Tensor | None:
    """Additive mask [B, 1, T, prefix + T]; None where plain attention to everything is right
    (one new token, no padding, no window reached), which lets SDPA take its fast path."""
    batch, length = hidden.shape[:2]
    total = prefix + length
    if length == 1 and attention_mask is None and (window is None or total <= window):
        return None
    device = hidden.device
    query = torch.arange(prefix, total, device=device).view(-1, 1)  # [T, 1] absolute query positions
    key = torch.arange(total, device=device).view(1, -1)  # [1, prefix + T]
    allowed = key <= query
    if window is not None:
        allowed = allowed & (query - key < window)
    allowed = allowed.view(1, 1, length, total).expand(batch, 1, length, total)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool().view(batch, 1, 1, total)
    zeros = torch.zeros((), dtype=hidden.dtype, device=device)
    return torch.where(allowed, zeros, torch.finfo(hidden.dtype).min)


def load_span(checkpoint: Checkpoint, start: int, end: int, dtype: torch.dtype,
              device: str | torch.device = "cpu", progress: bool = False,
              reuse: dict[int, torch.nn.Module] | None = None, stopping: threading.Event | None = None,
              quant: str = "none") -> BlockSpan:
    """Build blocks ``start:end`` with their weights, block by block (a progress bar if asked);
    blocks in ``reuse`` (index -> block already loaded in this dtype on this device) are shared.
    ``stopping`` set (the node is told to stop) ends the load at the next block: Interrupted.
    ``quant``: each block's weights packed in 8 or 4 bits as soon as it is built (``quantize``)."""
    if not 0 <= start < end <= checkpoint.num_blocks:
        raise BadRequest(f"blocks {start}:{end} are outside the model's 0:{checkpoint.num_blocks}")
    family = family_of(checkpoint.config)
    files = tensor_files(checkpoint.path)
    blocks, said = [], time.monotonic()
    with hardware.packing(torch.device(device)) if quant != "none" else contextlib.nullcontext():
        for index in tqdm(range(start, end), desc=f"loading blocks {start}:{end}", unit="block",
                          disable=not progress):
            if stopping is not None and stopping.is_set():
                raise Interrupted(f"loading blocks {start}:{end} stopped at block {index}")
            if reuse and index in reuse:
                blocks.append(reuse[index])
                continue
            prefix = family.block_prefix.format(index)
            names = [n for n in files if n.startswith(prefix)]
            if not names:
                raise BadRequest(f"{checkpoint.path} holds no weights of block {index} (its config.json names "
                                 f"{checkpoint.num_blocks} blocks): is the checkpoint complete?")
            try:
                weights = convert_block(checkpoint.config.model_type,
                                        load_tensors(checkpoint.path, names, dtype, device))
                block = place_block(checkpoint.config, index, {n[len(prefix):]: t for n, t in weights.items()})
            except (RuntimeError, OSError, ValueError, KeyError, SafetensorError) as e:  # a truncated file, weights
                # of another shape or a config.json that names more blocks than the files hold
                if isinstance(e, torch.OutOfMemoryError):
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BadRequest(f"block {index}'s weights in {checkpoint.path} do not load: {first[:300]} (is the "
                                 "checkpoint complete, and its config.json the one of these weights?)") from None
            del weights  # the full-precision tensors go as soon as the block holds its packed ones
            blocks.append(quantize_block(block, quant))
            logger.debug("loaded block %d (%d tensors)", index, len(names))
            if not progress and time.monotonic() - said > PROGRESS_EVERY_S and index + 1 < end:  # no bar: a line
                logger.info("loaded %d of %d blocks", index + 1 - start, end - start)
                said = time.monotonic()
    return BlockSpan(checkpoint.config, family, start, blocks).eval()


def block_bytes(checkpoint: Checkpoint, index: int, dtype: torch.dtype, quant: str = "none") -> int:
    """Bytes block ``index`` takes in ``dtype`` with its weights in ``quant``: the block is built
    without memory (on the meta device) and each of its weights counted as it will be stored."""
    with torch.device("meta"):
        block = family_of(checkpoint.config).make_block(checkpoint.config, index)
    return quantize.block_bytes(block, quant, dtype)


def place_block(config: PretrainedConfig, index: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Decoder layer ``index`` holding ``weights`` (names relative to the block) where they already are."""
    block = family_of(config).make_block(config, index)
    block.load_state_dict(weights, strict=True, assign=True)
    return block.eval()
