"""Where and in what precision a training process runs: its device, autocast dtype, seeds and peak memory."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .config import ConfigError


def pick_device(want: str, local_rank: int) -> torch.device:
    if want == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(want)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={want} but CUDA is not available")
    return dev


def amp_dtype(want: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: 'auto' = bf16 on CUDA when supported (else fp16), none on CPU."""
    if want == "none" or (want == "auto" and device.type != "cuda"):
        return None
    if want == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if want == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for ``dtype`` (None: full precision)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None
