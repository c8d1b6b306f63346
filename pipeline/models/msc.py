"""Multi-scale inputs with max fusion (DeepLabV2's "MSC", as deeplab-pytorch trains and tests it).

The network sees the image at scale 1 and bilinearly resized by each extra scale (0.5 and 0.75); the
fused prediction is the pixel-wise max of the three logit maps, the smaller ones bilinearly upsampled
to the scale-1 logit size. Training supervises all four maps, each at its own resolution with the
labels resized nearest-neighbour (PIL semantics); testing uses the max.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def fuse_max(base: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """base (B, C, h, w) and smaller maps (B, C, h_i, w_i) -> pixel-wise max (B, C, h, w) after bilinear
    upsampling (align_corners=False) of the others to (h, w)."""
    size = base.shape[-2:]
    ups = [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in others]
    return torch.stack([base, *ups]).amax(dim=0)


def msc_outputs(net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                scales: Sequence[float]) -> list[torch.Tensor]:
    """images (B, 3, H, W) -> [logits at scale 1, at each of ``scales``, their max], each (B, C, h_i, w_i)
    at the network's own output resolution. Inputs are resized with ``scale_factor`` (floor of the size)."""
    base = net(images)
    pyramid = [net(F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)) for s in scales]
    return [base, *pyramid, fuse_max(base, pyramid)]


def nearest_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """labels int64 (B, H, W) -> (B, h, w) with PIL's NEAREST rule: source index floor((i + 0.5) * H / h)
    (pixel centres, computed in float64 as PIL does)."""
    H, W = labels.shape[-2:]
    h, w = int(size[0]), int(size[1])

    def index(n_out: int, n_in: int) -> torch.Tensor:
        pos = (torch.arange(n_out, dtype=torch.float64, device=labels.device) + 0.5) * (n_in / n_out)
        return pos.floor().long().clamp_(max=n_in - 1)

    return labels[:, index(h, H)][:, :, index(w, W)]


def msc_loss(outputs: Sequence[torch.Tensor], labels: torch.Tensor,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum of ``loss_fn(logits, labels resized to the logits)`` over the MSC outputs -> scalar.

    (deeplab-pytorch hands PIL the size as (H, W) where PIL reads (W, H); the same for its square crops.)"""
    return sum(loss_fn(o, nearest_labels(labels, o.shape[-2:])) for o in outputs)
