"""Training losses: cross-entropy on label maps (plain, or WeCLIP's background/foreground balance) and
the affinity loss on the decoder's patch affinity (WeCLIP CVPR 2024, after AFA CVPR 2022).

Both take label maps with 255 = ignore, so offline pseudo labels (with 255 holes) and online labels
(no ignore) go through the same functions.

Both are means over the whole batch's pixels or pairs (as the references compute them), not means of
per-image means. Under DDP a ``Pool`` makes them means over all processes' batches: each process
divides its own sum by the pixel counts summed over the processes, so the averaged gradient (and the
averaged loss) equals one process's at the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import unwrap
from ..classes import IGNORE_INDEX

LOSSES = ("ce", "bgfg")


@dataclass(frozen=True)
class Pool:
    """The processes a batch is spread over: ``world`` of them, whose counts ``total`` adds up (DDP: an
    all-reduce sum; the default is one process)."""

    world: int = 1
    total: Callable[[torch.Tensor], torch.Tensor] = lambda counts: counts

    def share(self, counts: torch.Tensor) -> torch.Tensor:
        """This process's counts (float32) -> the counts over all processes, divided by ``world``: a
        process's sum over them is its share of the pooled mean (DDP averages gradients over processes)."""
        return self.total(counts.detach().float()) / self.world


ONE = Pool()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "ce", pool: Pool = ONE) -> torch.Tensor:
    """logits (B, C, H, W), labels int64 (B, H, W) with 255 = ignore -> scalar.

    'ce': mean cross-entropy over non-ignored pixels (the confidence-guided loss on offline labels).
    'bgfg': WeCLIP's (CE over background pixels + CE over foreground pixels) / 2, means over the whole
    batch. A batch with no pixel of one kind uses the other term alone: the reference's mean over an
    empty set gives NaN there. Pixels labelled 255 get exactly zero gradient either way; an
    all-ignored batch gives 0. ``pool``: counts over all processes (see ``Pool``).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W), 0 at 255
    valid = labels != IGNORE_INDEX
    if kind == "ce":
        return ce.sum() / pool.share(valid.sum()).clamp(min=1 / pool.world)
    bg = labels == 0
    masks = (bg, valid & ~bg)
    counts = pool.share(torch.stack([m.sum() for m in masks]))
    terms = [ce[m].sum() / n for m, n in zip(masks, counts) if n > 0]
    return sum(terms) / len(terms) if terms else ce.sum() * 0


def model_loss(model: nn.Module, outputs, labels: torch.Tensor, kind: str = "ce", pool: Pool = ONE) -> torch.Tensor:
    """``segmentation_loss`` of the model's outputs, through the model's ``training_loss`` hook when it
    has one (DeepLab's multi-scale outputs: a sum over scales at their own resolutions)."""
    hook = getattr(unwrap(model), "training_loss", None)
    loss_fn = lambda lg, lb: segmentation_loss(lg, lb, kind, pool)  # noqa: E731
    return hook(outputs, labels, loss_fn) if hook else loss_fn(outputs, labels)


def affinity_labels(labels: torch.Tensor, grid: tuple[int, int], radius: int = 8) -> torch.Tensor:
    """Pairwise targets for the affinity loss.

    labels int (B, H, W), 255 = ignore -> uint8 (B, n, n), n = h * w for ``grid`` = (h, w): the label
    map is sampled at the patch grid (nearest: pixel (i * H // h, j * W // w)), then 1 where two
    patches share a label, 0 where they differ, and 255 (ignored) where either is 255 or the two are
    more than ``radius`` patches apart in row or column.
    """
    h, w = grid
    y = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].long().flatten(1)   # (B, n)
    out = (y[:, :, None] == y[:, None, :]).to(torch.uint8)
    rows = torch.arange(h, device=labels.device).repeat_interleave(w)
    cols = torch.arange(w, device=labels.device).repeat(h)
    far = ((rows[:, None] - rows[None]).abs() > radius) | ((cols[:, None] - cols[None]).abs() > radius)
    ignored = (y == IGNORE_INDEX)
    out[far.expand_as(out) | ignored[:, :, None] | ignored[:, None, :]] = IGNORE_INDEX
    return out


def affinity_loss(affinity: torch.Tensor, targets: torch.Tensor, pool: Pool = ONE) -> torch.Tensor:
    """affinity (B, n, n) in (0, 1), targets uint8 (B, n, n) from ``affinity_labels`` -> scalar:
    ½ Σ_pos (1 - A) / (N_pos + 1) + ½ Σ_neg A / (N_neg + 1), sums over the whole batch (the +1 keeps
    a batch without positive or negative pairs finite); ``pool``: counts over all processes."""
    a = affinity.float()
    pos, neg = targets == 1, targets == 0
    n_pos, n_neg = pool.share(torch.stack([pos.sum(), neg.sum()])) + 1 / pool.world
    return 0.5 * ((1 - a) * pos).sum() / n_pos + 0.5 * (a * neg).sum() / n_neg
