"""Measures how fast this node runs its span, for its record (routing weighs nodes by it).

A measurement is kept in the cache folder ($POTLUCK_CACHE, default ~/.cache/potluck) per model,
dtype, device and span size, so a node that restarts announces at once; it is refined later,
when the node is idle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import DynamicCache

from potluck.protocol.default_model import default_cache_dir
from potluck.protocol.messages import OpenSession

from .batching import StepWork, decode_together
from .sessions import SessionTable
from . import span as spans
from .span import BlockSpan, Interrupted

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speed:
    """How fast a node runs its whole span, as its record announces."""

    steps_per_s: float = 0.0  # one-token inference steps per second
    forward_tokens_per_s: float = 0.0  # tokens per second of a long cache-less forward

    def best_of(self, other: "Speed") -> "Speed":
        """Each figure's better value: contention only ever slows a measurement down."""
        return Speed(max(self.steps_per_s, other.steps_per_s),
                     max(self.forward_tokens_per_s, other.forward_tokens_per_s))


def measure(span: BlockSpan, steps: int = 16, forward_tokens: int = 128, repeats: int = 3,
            stopping: threading.Event | None = None, graphs: bool = False) -> Speed:
    """How fast one-token steps and a long forward run through the span (``stopping`` set: give
    up at the next step, raising Interrupted); ``graphs``: the steps as a --cuda-graphs node runs them.

    Nodes often start while others load beside them; taking each figure's best repeat keeps a
    moment of contention from being announced as the node's speed. A slow measurement (4-bit
    weights on a CPU take minutes) says how far it got every ``PROGRESS_EVERY_S``."""
    stopping, said = stopping or threading.Event(), time.monotonic()

    def progress(steps_done: int, forwards_done: int) -> None:
        nonlocal said
        if time.monotonic() - said > spans.PROGRESS_EVERY_S:
            logger.info("measuring speed: %d of %d steps, %d of %d forwards of %d tokens", steps_done, steps,
                        forwards_done, repeats, forward_tokens)
            said = time.monotonic()

    hidden = torch.randn(1, forward_tokens, span.config.hidden_size, dtype=span.dtype, device=span.device)
    positions = torch.arange(forward_tokens, device=span.device).unsqueeze(0)
    span(hidden[:, :8], positions[:, :8], None, DynamicCache())  # warm-up
    _synchronize(span.device)
    step = _fixed_step(span, steps) if graphs else _cached_step(span, hidden, positions)
    step_times = []
    for i in range(1, steps + 1):
        _check(stopping)
        began = time.perf_counter()
        step(i)
        _synchronize(span.device)
        step_times.append(time.perf_counter() - began)
        progress(i, 0)
    forward_times = []
    for _ in range(repeats):
        _check(stopping)
        began = time.perf_counter()
        span(hidden, positions, None, None)
        _synchronize(span.device)
        forward_times.append(time.perf_counter() - began)
        progress(steps, len(forward_times))
    fastest_half = sorted(step_times)[: max(1, steps // 2)]
    return Speed(len(fastest_half) / sum(fastest_half), forward_tokens / min(forward_times))


def _cached_step(span: BlockSpan, hidden: torch.Tensor, positions: torch.Tensor) -> Callable[[int], None]:
    """Step i (i >= 1) on a transformers cache holding token 0."""
    cache = DynamicCache()
    span(hidden[:, :1], positions[:, :1], None, cache)
    return lambda i: span(hidden[:, i:i + 1], positions[:, i:i + 1], None, cache)


def _fixed_step(span: BlockSpan, steps: int) -> Callable[[int], None]:
    """Step i (i >= 1) of a session in a cache pool of its own, as a fixed-shape pass (a CUDA graph
    on a GPU; the first step captures it, and the fastest half of the steps leaves that one out).
    Its inputs are on the CPU, as a step's from the wire."""
    table = SessionTable(steps + 1)
    session = table.open(OpenSession("speed", span.start, span.end, steps + 1, 1), span)
    hidden = torch.randn(1, steps + 1, span.config.hidden_size, dtype=span.dtype)
    positions = torch.arange(steps + 1).unsqueeze(0)
    session.step(hidden[:, :1], positions[:, :1], None, 0)
    return lambda i: decode_together([StepWork(session, hidden[:, i:i + 1], positions[:, i:i + 1], None, i)],
                                     graphs=True)


def _check(stopping: threading.Event) -> None:
    if stopping.is_set():
        raise Interrupted("speed measurement stopped")


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timing covers the computation and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_key(model: str, config_json: str, dtype: str, device: torch.device, blocks: int,
              graphs: bool = False) -> str:
    """What a cached measurement is valid for: this model (by name and config, since names are
    reused), dtype, device (a GPU's name counts: another card is another speed), span size, and
    whether decoding steps run as CUDA graphs."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    shape = hashlib.sha256(config_json.encode()).hexdigest()[:12]
    return f"{model}|{shape}|{dtype}|{kind}|{blocks} blocks" + ("|cuda graphs" if graphs else "")


def cached_speed(key: str, folder: Path | None = None) -> Speed | None:
    """The speed measured earlier for ``key``, or None (no cache, or an unreadable one)."""
    entry = _read(_cache_file(folder)).get(key)
    try:
        return Speed(float(entry["steps_per_s"]), float(entry["forward_tokens_per_s"]))
    except (TypeError, KeyError, ValueError):
        return None


def remember_speed(key: str, speed: Speed, folder: Path | None = None) -> None:
    """Keep ``speed`` for ``key``; a cache that cannot be written only costs a measurement later."""
    path = _cache_file(folder)
    entries = _read(path)
    entries[key] = {**dataclasses.asdict(speed), "measured_at": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(entries, indent=1))
        scratch.replace(path)  # atomic: nodes starting together never read half a file
    except OSError as e:
        logger.debug("could not keep the measured speed in %s: %s", path, e)


def _cache_file(folder: Path | None) -> Path:
    return (folder or default_cache_dir()) / "throughput.json"


def _read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}
