"""CPU proxies for GPU efficiency: how many tensor operations a call dispatches and how many of them
would make a CUDA device wait for the host (or the host for the device).

``count(fn, *args)`` runs ``fn`` once and returns a ``Counts``: ``ops`` (aten operations dispatched, the
proxy for kernel launches) and ``syncs`` (operations that need a value on the host or produce a
data-dependent shape: ``.item()``, ``nonzero``, ``equal``, boolean indexing, ``unique``, ... and every
``.cpu()`` / ``.numpy()`` / ``.tolist()`` of a tensor, which on CUDA is a device-to-host copy; not
torch.optim's reads of its step counters, which live on the host on every device).
Batching B images into one call should leave both nearly unchanged; a per-image loop multiplies them.
"""
from __future__ import annotations

import collections
import contextlib
import os
import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Overload packets whose result needs the host: a scalar read, or an output shape that depends on values.
SYNC_PACKETS = {
    aten._local_scalar_dense, aten.nonzero, aten.nonzero_static, aten.equal, aten.is_nonzero,
    aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.argwhere,
    aten.repeat_interleave, aten.bincount, aten.histc,
}


def _is_sync(func, args) -> bool:
    packet = func.overloadpacket
    if packet in SYNC_PACKETS:
        return True
    if packet is aten.index and len(args) > 1:  # x[bool_mask] has a data-dependent shape
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return False


@dataclass
class Counts:
    ops: int = 0
    syncs: int = 0
    by_op: collections.Counter = field(default_factory=collections.Counter)
    sync_ops: collections.Counter = field(default_factory=collections.Counter)


# torch.optim keeps its step counters on the host on every device (unless capturable or fused): reading
# them waits for nothing, so they are not counted as syncs (a training step reads one per parameter).
HOST_STATE_CALLERS = (f"{os.sep}torch{os.sep}optim{os.sep}",)


def _host_state_read(func) -> bool:
    return func.overloadpacket is aten._local_scalar_dense and any(
        c in frame.filename for frame in traceback.extract_stack(limit=12) for c in HOST_STATE_CALLERS)


class _Mode(TorchDispatchMode):
    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts.ops += 1
        self.counts.by_op[name] += 1
        if _is_sync(func, args) and not _host_state_read(func):
            self.counts.syncs += 1
            self.counts.sync_ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _host_reads(counts: Counts):
    """Count tensor -> host reads that never reach the dispatcher on a CPU tensor."""
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "numpy", "tolist")}

    def wrap(name, f):
        def counted(self, *a, **k):
            counts.syncs += 1
            counts.sync_ops[f"Tensor.{name}"] += 1
            return f(self, *a, **k)
        return counted

    for name, f in originals.items():
        setattr(torch.Tensor, name, wrap(name, f))
    try:
        yield
    finally:
        for name, f in originals.items():
            setattr(torch.Tensor, name, f)


def count(fn, *args, **kwargs) -> tuple[Counts, object]:
    """Run ``fn(*args, **kwargs)`` once; (counts, its result)."""
    counts = Counts()
    with _host_reads(counts), _Mode(counts):
        out = fn(*args, **kwargs)
    return counts, out
