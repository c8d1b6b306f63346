"""``one_device()``: every tensor operation run inside must take its tensors from one device, as CUDA kernels
require; a 0-dim tensor counts as a scalar (PyTorch lets a CPU scalar meet a CUDA tensor) and copies may
cross devices. Some CPU kernels accept a 'meta' operand silently (matmul, gather, indexing), which would
hide a device bug from a CPU test; under this mode they raise."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
CROSSING = {aten.copy_, aten._copy_from, aten._to_copy, aten._copy_from_and_resize}


class MixedDevices(RuntimeError):
    pass


class _OneDevice(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in CROSSING:
            devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
            if len(devices) > 1:
                raise MixedDevices(f"{func} mixes tensors on {', '.join(sorted(map(str, devices)))}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def one_device():
    with _OneDevice():
        yield
