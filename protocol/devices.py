"""Which torch device a node or a client's local part computes on, checked to be here."""
from __future__ import annotations

import torch

from .errors import BadRequest


def resolve_device(name: str | torch.device | None = None, option: str = "--device") -> torch.device:
    """The device a node (or a client's local part) computes on; ``None`` picks the best there is.
    CUDA devices get an explicit index, so every tensor compares equal to the weights' device. One
    that is not here is a BadRequest naming ``option``."""
    if name is None:
        if torch.cuda.is_available():
            name = "cuda"
        elif mps_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadRequest(f"{option} {name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadRequest(f"{option} {name}: this torch has no usable CUDA GPU (install a CUDA build of torch, "
                             f"or pass {option} cpu)")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise BadRequest(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if device.type == "cpu" and device.index not in (None, 0):
        raise BadRequest(f"{option} {name}: there is one cpu device (cpu)")
    if device.type == "mps" and not mps_available():
        raise BadRequest(f"{option} mps: Apple's Metal backend is not available here; pass {option} cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise BadRequest(f"{option} {name!r}: Potluck runs on cpu, cuda or mps")
    return device


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
