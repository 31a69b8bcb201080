"""Which checkpoint a model name means, and reading parts of it tensor by tensor.

Nodes read only their span of blocks (``potluck.node.span.load_span``) and clients only the
embeddings, final norm and lm_head, so nobody's peak memory follows the whole model. A model is
named in DHT keys by ``model_name``: the folder name of a local checkpoint, or the HF id of one
in the local HF cache.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from .default_model import DEFAULT_MODEL, ensure_default_model
from .errors import BadRequest
from .families import family_of

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # name or namespace/name


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # a folder with config.json and *.safetensors
    name: str  # the model's name in DHT keys
    config: PretrainedConfig

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers


SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "vocab_size", "num_local_experts", "num_experts")


def config_id(config) -> str:
    """A short digest of a model's shape (its type and sizes): nodes announce it and clients route
    only through nodes whose checkpoint has their own shape, so two models published under one
    name (a folder called "model", say) do not mix. Weights of the same shape are not told apart
    (``verify=`` catches replicas that disagree)."""
    shape = {key: getattr(config, key, None) for key in SHAPE_KEYS}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attention_for(config) -> str:
    """PyTorch's SDPA where the model's transformers code supports it, else its eager attention
    (what transformers itself would pick: gpt-oss's attention sinks, for one, need eager)."""
    from transformers import AutoModelForCausalLM

    model_cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return "sdpa" if model_cls is None or getattr(model_cls, "_supports_sdpa", False) else "eager"


def resolve_checkpoint(model: str | None = None, name: str | None = None) -> Checkpoint:
    """Find a checkpoint: None → the default model; a folder; or an HF id already in the HF cache."""
    if model is None or model == DEFAULT_MODEL:
        path, default_name = ensure_default_model(), DEFAULT_MODEL
    elif Path(model).expanduser().is_dir():
        path = Path(model).expanduser().resolve()
        default_name = path.name
        if not (path / "config.json").is_file():
            raise BadRequest(f"{model} has no config.json: MODEL must be a checkpoint folder (config.json and "
                             "*.safetensors) or an HF id")
    elif not HF_ID.fullmatch(model):
        raise BadRequest(f"no checkpoint folder at {model}: MODEL must be a folder with config.json and "
                         "*.safetensors, or an HF id such as HuggingFaceTB/SmolLM2-135M-Instruct")
    else:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:  # huggingface_hub raises several unrelated types for "not there"
            logger.debug("%s is not in the local HF cache: %s", model, e)
            raise BadRequest(f"{model} is not in the local Hugging Face cache: download it once with "
                             f"`hf download {model}` (or pass a checkpoint folder as MODEL)") from None
        default_name = model
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:  # transformers' words for a config.json that is not JSON, or not a model's
        raise BadRequest(f"{path / 'config.json'} cannot be read as a model's config: "
                         f"{str(e).strip().splitlines()[0]}") from None
    family_of(config)  # fail early on an unsupported family
    config._attn_implementation = attention_for(config)
    return Checkpoint(path, name or default_name, config)


async def resolve_checkpoint_soon(model: str | None = None, name: str | None = None) -> Checkpoint:
    """``resolve_checkpoint`` on a daemon thread, for an event loop: the default model's first
    conversion takes ~25 s, and a Ctrl-C cancels the wait at once (a thread of asyncio's executor
    would hold the process until it finished). The conversion then ends with the process; the
    next one removes what it left."""
    loop, done = asyncio.get_running_loop(), asyncio.Event()
    outcome: list = []

    def resolve() -> None:
        try:
            outcome.append(resolve_checkpoint(model, name))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome.append(e)
        try:
            loop.call_soon_threadsafe(done.set)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass

    threading.Thread(target=resolve, name="potluck-checkpoint", daemon=True).start()
    await done.wait()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def tensor_files(path: Path) -> dict[str, Path]:
    """Map each tensor name of a safetensors checkpoint to the file that holds it: a single
    ``model.safetensors`` first, then a sharded one's index, as transformers looks for them (a
    folder holding both, one left over, loads the same weights on nodes and in transformers)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists() and index.exists():
        logger.warning("%s holds model.safetensors and a sharded index: reading model.safetensors, as transformers "
                       "does (remove the one left over)", path)
    if index.exists() and not single.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = [single] if single.exists() else sorted(path.glob("*.safetensors"))
    if not files:
        raise BadRequest(f"no *.safetensors files in {path}")
    names: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                names.update({name: file for name in f.keys()})
        except (SafetensorError, OSError) as e:
            raise BadRequest(f"{file} is not a readable safetensors file ({e}): is it complete?") from None
    return names


def load_tensors(path: Path, names: list[str], dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read only the named tensors, one at a time, each moved to ``device`` and cast there (so host
    memory never holds more than one tensor, and the cast runs on the GPU when there is one)."""
    files = tensor_files(path)
    missing = [n for n in names if n not in files]
    if missing:
        raise BadRequest(f"checkpoint {path} lacks tensors {missing[:5]}")
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in file_names:
                tensors[name] = f.get_tensor(name).to(device=device).to(dtype=dtype)
    return tensors
