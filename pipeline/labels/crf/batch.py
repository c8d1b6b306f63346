"""Label maps for a batch of images on one device with the torch CRF, equal to ``crf.refine`` image by image
for images within the resolution cap: same float16 unary, same marginals, first maximum on ties, same
confidence rules. Images of any sizes batch together when they have the same number of labels.

The unary -log(clip(P, 1e-5, 1)) of the reference's float16 probabilities is looked up in a table of all
65,536 float16 values computed with numpy (``crf.half_unary_table``): numpy's float16 rounding bit for bit,
on any device, in one gather.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import IGNORE_INDEX, half_unary_table
from .torch_backend import crf_points, image_points


def unary_table(device) -> torch.Tensor:
    """(65536,) float32 unary of every float16 bit pattern, on ``device``."""
    return torch.from_numpy(half_unary_table()).to(device)


def half_unary(probs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float16 probabilities (any shape) -> float32 unary energies of that shape, looked up in ``table``."""
    return table[probs.view(torch.int16).to(torch.int32) & 0xFFFF]


@torch.no_grad()
def refine_batch(probs: Sequence[torch.Tensor], guides: Sequence[torch.Tensor], values: torch.Tensor, params,
                 conf: float, confidence: str, table: torch.Tensor) -> torch.Tensor:
    """B images -> their uint8 label maps, flat: (sum_i H_i W_i,) on ``table``'s device, image after image.

    probs: float16 (C, H_i, W_i), background first, checked (``crf.check_probs``); guides: uint8 (H_i, W_i, 3);
    values: (B, C) uint8 label of each channel (``crf.keys_ext``); ``params``: ``CRFParams``; conf, confidence:
    as ``crf.refine`` (255 where max Q < conf for 'crf', where max(1 - m, m) < conf of the CAMs' maximum m for
    'raw', nowhere for 'none'); table: ``unary_table``. Inputs may be on the host (pinned for an
    asynchronous copy)."""
    dev, C = table.device, probs[0].shape[0]
    p = torch.cat([x.to(dev, non_blocking=True).permute(1, 2, 0).reshape(-1, C) for x in probs])
    colors = torch.cat([g.to(dev, non_blocking=True).reshape(-1, 3) for g in guides])
    xy, groups = image_points([tuple(x.shape[1:]) for x in probs], dev)
    q = crf_points(half_unary(p, table), xy, colors, groups, len(probs), params)
    label = values.to(dev, non_blocking=True)[groups, q.argmax(1)]
    if confidence == "crf":
        return label.masked_fill(q.amax(1) < conf, IGNORE_INDEX)
    if confidence == "raw":
        m = p[:, 1:].amax(1).to(torch.float32)
        return label.masked_fill(torch.maximum(1 - m, m) < conf, IGNORE_INDEX)
    return label
