"""What a node computes on: the one place that picks its device, dtype and cache budget by default.

A CUDA GPU when there is one, else Apple's ``mps``, else the CPU; 16-bit weights on accelerators
(bfloat16 where the card has it, float16 otherwise), float32 on the CPU. The attention-cache
budget defaults to a share of the GPU memory left after loading, or 1 GiB of RAM on the CPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging

import psutil
import torch


logger = logging.getLogger(__name__)
CPU_CACHE_GIB = 1.0  # cache budget on the CPU unless --cache-gib says otherwise
GPU_CACHE_SHARE = 0.5  # of the GPU memory free after loading; the rest is left for activations
MEMORY_SHARE = 0.8  # of the free memory a node fills by default
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def default_dtype(device: torch.device) -> str:
    """16-bit on accelerators (half the memory and twice the speed of float32), float32 on CPUs."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    if device.type == "mps":
        return "float16"
    return "float32"


def prepare(device: torch.device) -> None:
    """Process-wide settings for computing on ``device``, applied once at start."""
    if device.type == "cuda":
        # cuDNN's SDPA kernel plans anew for every new key length: ~60 ms of CPU per decoding step
        # measured on an H100 in bfloat16. Flash and memory-efficient attention have no such cost.
        torch.backends.cuda.enable_cudnn_sdp(False)


def usable_memory(device: torch.device) -> int:
    """Bytes a node may fill on ``device`` unless --max-memory says: most of the free GPU memory,
    or most of the RAM the system calls available (the rest stays for activations and the system)."""
    if device.type == "cuda":
        return int(MEMORY_SHARE * torch.cuda.mem_get_info(device)[0])
    return int(MEMORY_SHARE * psutil.virtual_memory().available)  # MemAvailable on Linux


def cache_reserve(device: torch.device, memory: int) -> int:
    """Bytes of ``memory`` kept for the attention cache when sizing a span: what
    ``default_cache_gib`` will take once the weights are loaded."""
    if device.type == "cuda":
        return int(GPU_CACHE_SHARE * memory)
    return int(min(CPU_CACHE_GIB * 2**30, memory // 2))


def default_cache_gib(device: torch.device) -> float:
    """Cache budget when none is given: a share of the GPU memory free now (call after loading)."""
    free = free_device_bytes(device)
    return CPU_CACHE_GIB if free is None else GPU_CACHE_SHARE * free / 2**30


def total_memory(device: torch.device) -> int | None:
    """The most a cache on ``device`` could ever take: a GPU's memory, or the RAM and swap; None
    where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return psutil.virtual_memory().total + psutil.swap_memory().total
    return None


def free_device_bytes(device: torch.device) -> int | None:
    """Memory this process can still take on a GPU: what the device has free, and what its own
    allocator holds unused; None off GPUs (a CPU cache pool takes its pages only as tokens are
    written)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def release_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back to the device: after an out-of-memory error in a
    step, or after dropping blocks."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def packing(device: torch.device):
    """While a node packs weights in 8 or 4 bits on the CPU: every allocation over 64 KiB comes from
    the OS and goes back when freed. Otherwise the packed weights (kept) and the packing's scratch
    (freed at once) share the C heap's pages, and the scratch stays resident: measured 95 MiB on
    top of 62 MiB of 4-bit weights. After it, 32 MiB again (glibc's own ceiling): steps that
    took each transient from the OS ran 3.5x slower."""
    if device.type != "cpu" or _libc is None or not hasattr(_libc, "mallopt"):
        yield
        return
    _libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    try:
        yield
    finally:  # where glibc's own adjustment ends up once big blocks were freed: fast steps
        _libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        _libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)
        _libc.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


_libc = _load_libc()
