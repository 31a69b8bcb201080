"""Running a computation as if its weights were on a GPU, on a CPU-only machine.

Weights go to PyTorch's ``meta`` device (shapes and dtypes, no data), inputs arrive on the CPU as
they do from the wire, and ``StrictDevices`` checks every operation the way CUDA does: all its
tensor arguments on one device, except 0-dim CPU scalars and the copies that move tensors
between devices. A tensor built on the CPU and used with the weights raises, as on a GPU.
(FakeTensorMode's fake CUDA tensors cannot be indexed by a CPU-only torch build, which the
transformers rotary embedding does, so the check is done here instead.)
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

OTHER_DEVICE = torch.device("meta")  # stands in for "cuda:0"
_MOVES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten._copy_from.default,
          torch.ops.aten._copy_from_and_resize.default}


class DeviceMismatch(RuntimeError):
    pass


class StrictDevices(TorchDispatchMode):
    """Raises ``DeviceMismatch`` on any operation whose tensors live on different devices."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _MOVES:
            devices = {t.device for t in tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                raise DeviceMismatch(f"{func} got tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


class GraphSafe(StrictDevices):
    """``StrictDevices``, and raises ``NotCapturable`` on what a CUDA graph cannot record: a copy
    between the CPU and the device (beyond 0-dim scalars), or a value read back to the CPU
    (``item``, ``nonzero``: the CPU would wait for the GPU)."""

    READ_BACKS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                  torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READ_BACKS:
            raise NotCapturable(f"{func} reads a value back to the CPU")
        if func in _MOVES:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
            devices = {t.device for t in tensors}
            if kwargs.get("device") is not None:
                devices.add(torch.device(kwargs["device"]))
            if len(devices) > 1:
                raise NotCapturable(f"{func} copies between {sorted(map(str, devices))}")
        return super().__torch_dispatch__(func, types, args, kwargs)


class NotCapturable(RuntimeError):
    pass
