"""PAR, pixel-adaptive refinement (AFA, CVPR 2022; used as is by WeCLIP and ExCEL): label maps are
smoothed by repeatedly averaging each pixel's 48 dilated neighbours, weighted by colour similarity
and, a little, by distance.

Neighbours: for each dilation d the 8 pixels of the 3x3 ring at distance d (row-major, centre left
out), taken from the image padded by replication. Colour weights: ``-(|I_k - I| / std_k I / 0.3)^2``
averaged over the channels, softmax over the 48; position weights the same on the neighbour
distances (d or d·√2), softmax, times 0.01; the two add (they sum to 1.01, so a constant map grows
by 1.01 per iteration, as in the reference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DILATIONS = (1, 2, 4, 8, 12, 24)
ITERATIONS = 20
COLOUR_SCALE = 0.3
POSITION_WEIGHT = 0.01
# the 3x3 ring without its centre, in the reference's order
RING = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))


def neighbours(x: torch.Tensor, dilation: int) -> list[torch.Tensor]:
    """x (B, C, H, W) -> the 8 ring neighbours at ``dilation``, each (B, C, H, W), replicate-padded."""
    h, w = x.shape[-2:]
    d = dilation
    pad = F.pad(x, [d] * 4, mode="replicate")
    return [pad[..., d * r: d * r + h, d * c: d * c + w] for r, c in RING]


def affinity(image: torch.Tensor, dilations: tuple[int, ...] = DILATIONS, colour_scale: float = COLOUR_SCALE,
             position_weight: float = POSITION_WEIGHT) -> torch.Tensor:
    """image (B, 3, H, W) float -> neighbour weights (B, 8·len(dilations), H, W), computed once per image."""
    nb = torch.stack([n for d in dilations for n in neighbours(image, d)], dim=2)      # (B, 3, N, H, W)
    diff = (nb - image.unsqueeze(2)).abs()
    colour = -(diff / (nb.std(dim=2, keepdim=True) + 1e-8) / colour_scale) ** 2
    colour = colour.mean(dim=1)                                                         # (B, N, H, W)
    dist = torch.tensor([d * (math.sqrt(2) if r != 1 and c != 1 else 1.0) for d in dilations for r, c in RING],
                        dtype=image.dtype, device=image.device)
    position = -(dist / (dist.std() + 1e-8) / colour_scale) ** 2
    return colour.softmax(dim=1) + position_weight * position.softmax(dim=0)[:, None, None]


def par(image: torch.Tensor, masks: torch.Tensor, iterations: int = ITERATIONS,
        dilations: tuple[int, ...] = DILATIONS) -> torch.Tensor:
    """Refine maps with PAR.

    image (B, 3, H, W) float (the reference passes the normalised image), resized to the maps' size
    (bilinear, align_corners=True) when it differs; masks (B, K, h, w) -> (B, K, h, w) in the masks'
    dtype. Each iteration replaces a pixel by the weighted sum of its neighbours (not itself).
    """
    if image.shape[-2:] != masks.shape[-2:]:
        image = F.interpolate(image, size=masks.shape[-2:], mode="bilinear", align_corners=True)
    weights = affinity(image.to(masks.dtype), dilations)
    for _ in range(iterations):
        shifted = [n for d in dilations for n in neighbours(masks, d)]
        out = torch.zeros_like(masks)
        for k, n in enumerate(shifted):
            out = out + weights[:, k: k + 1] * n
        masks = out
    return masks
