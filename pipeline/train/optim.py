"""Optimisers and the learning-rate schedule of the segmentation training."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

# The `optim` keys each optimiser reads besides name, lr, head_lr_mult and weight_decay (the training
# config check refuses the others).
CONFIG_KEYS: dict[str, tuple[str, ...]] = {"adamw": ("betas", "eps"), "sgd": ("momentum",)}


def lr_factor(step: int, iters: int, warmup_iters: int, warmup_ratio: float, power: float, every: int = 1) -> float:
    """WeCLIP's learning-rate factor at 0-based ``step``: linear warm-up from ``warmup_ratio`` over
    ``warmup_iters``, then poly (1 - step/iters) ** power with ``step`` rounded down to a multiple of
    ``every`` (deeplab-pytorch: power 0.9, no warm-up, lr updated every 10 iterations)."""
    if step < warmup_iters:
        return 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return max(0.0, 1 - every * (step // every) / iters) ** power


def build_optimizer(model: nn.Module, optim: Mapping) -> torch.optim.Optimizer:
    """AdamW (WeCLIP) or SGD with momentum (deeplab-pytorch) over the model's ``param_groups``; each group
    remembers its base lr as 'base_lr' for the schedule."""
    groups = model.param_groups(float(optim["lr"]), float(optim["head_lr_mult"]), float(optim["weight_decay"]))
    for g in groups:
        g["base_lr"] = g["lr"]
    if optim["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=float(optim["lr"]), betas=tuple(optim["betas"]), eps=float(optim["eps"]))
    return torch.optim.SGD(groups, lr=float(optim["lr"]), momentum=float(optim["momentum"]))


def set_lr(optimizer: torch.optim.Optimizer, step: int, schedule: Mapping) -> None:
    """Every group's lr for 0-based ``step`` of the ``schedule`` section: its base lr times ``lr_factor``."""
    f = lr_factor(step, int(schedule["iters"]), int(schedule["warmup_iters"]), float(schedule["warmup_ratio"]),
                  float(schedule["power"]), int(schedule["lr_step"]))
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * f
