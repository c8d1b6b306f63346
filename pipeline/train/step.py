"""One optimiser step: forward each accumulated batch, take its labels from the step kind
(``LabelStep``: label files, ``step_offline``; made while training, ``step_online``), losses, backward."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol

import torch
from torch import nn

from .device import autocast
from .distributed import Process, all_sum
from .losses import ONE, Pool, affinity_labels, affinity_loss, model_loss


class LabelStep(Protocol):
    """Where a run's training samples and each batch's labels come from."""

    size: int      # training samples
    source: str    # what the labels are, for the log

    def clip(self, clip_model: nn.Module | None) -> nn.Module | None:
        """The frozen CLIP the model is built on (None: the model loads its own, ``model.clip``)."""

    def prepare(self, clip_model: nn.Module | None, classes, label_maker=None) -> None:
        """Ready the labels once the model is built and on its device."""

    def identity(self) -> dict[str, Any] | None:
        """The label files' identity by content (None: no label files), recorded for ``--resume``."""

    def check(self, num_classes: int) -> None:
        """Refuse unusable training inputs before training (rank 0), naming the files."""

    def dataset(self, aug, seed: int) -> torch.utils.data.Dataset:
        """The training set; item k draws its augmentation from (seed, k)."""

    def labels(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, keys: list,
               iteration: int) -> tuple[Mapping[str, Any], torch.Tensor, torch.Tensor]:
        """(model outputs with 'logits' (and 'affinity', 'grid' for the affinity loss), label maps
        (B, H, W), label maps the affinity loss takes its pair targets from) of a batch."""

    def extra_loss(self, outputs: Mapping[str, Any], pool: Pool) -> torch.Tensor | None:
        """The label method's own loss terms for the batch ``labels`` last made (None: it has none)."""


@dataclass(frozen=True)
class StepSettings:
    """What one optimiser step needs besides the model: accumulation, precision, losses."""

    accum: int
    dtype: torch.dtype | None
    loss: str
    aff_weight: float
    aff_radius: int

    @classmethod
    def from_config(cls, train: Mapping[str, Any], dtype: torch.dtype | None) -> "StepSettings":
        return cls(int(train["accum"]), dtype, train["loss"], float(train["aff_weight"]), int(train["aff_radius"]))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches: Iterator, step: LabelStep, iteration: int, s: StepSettings,
               proc: Process) -> torch.Tensor:
    """One optimiser step over ``s.accum`` batches -> float64 (3,) on the device: loss, segmentation loss,
    affinity loss of the global batch; the losses' means count the pixels and pairs of every process. Left
    on the device: reading it here would make the host wait for the device at every step (``read_losses``)."""
    device, world = proc.device, proc.world
    pool = Pool(world, all_sum) if world > 1 else ONE   # losses pooled over all processes' batches
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for k in range(s.accum):
        images, targets, *keys = next(batches)
        images = images.to(device, non_blocking=True)
        sync = world == 1 or k == s.accum - 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with autocast(device, s.dtype):
                out, labels, pairs = step.labels(model, images, targets, keys, iteration)
            loss_seg = model_loss(model, out["logits"], labels, s.loss, pool)
            loss_aff = affinity_loss(out["affinity"], affinity_labels(pairs, out["grid"], s.aff_radius), pool) \
                if s.aff_weight else torch.zeros((), device=device)
            loss = loss_seg + s.aff_weight * loss_aff
            extra = step.extra_loss(out, pool)
            loss = (loss if extra is None else loss + extra) / s.accum
            scaler.scale(loss).backward()
        sums += torch.stack([loss.detach().double(), loss_seg.detach().double() / s.accum,
                             loss_aff.detach().double() / s.accum])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:   # the processes' mean of their pooled losses is the global batch's loss
        sums = all_sum(sums) / world
    return sums


def read_losses(pending: list[tuple[int, torch.Tensor]]) -> tuple[float, float, float]:
    """The losses ``train_step`` left on the device, [(iteration, (3,))], read in one transfer and cleared
    -> the last iteration's (loss, segmentation loss, affinity loss); ``FloatingPointError`` naming the
    first iteration whose loss is not finite."""
    values = torch.stack([losses for _, losses in pending]).tolist()
    iterations = [it for it, _ in pending]
    pending.clear()
    for it, (loss, _, _) in zip(iterations, values):
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at iteration {it}; lower optim.lr or use amp=bf16")
    return tuple(values[-1])
