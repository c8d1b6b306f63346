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


def neighbour_index(height: int, width: int, dilations: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Flat pixel indices (N, H·W), N = 8·len(dilations): row k holds every pixel's k-th neighbour (ring
    order within each dilation), coordinates clamped to the grid, which is what replicate padding reads."""
    offsets = torch.tensor([(d * (r - 1), d * (c - 1)) for d in dilations for r, c in RING], device=device)
    rows = (torch.arange(height, device=device) + offsets[:, :1]).clamp(0, height - 1)          # (N, H)
    cols = (torch.arange(width, device=device) + offsets[:, 1:]).clamp(0, width - 1)            # (N, W)
    return (rows[:, :, None] * width + cols[:, None, :]).flatten(1)


def neighbours(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W), ``neighbour_index`` (N, H·W) -> every pixel's N neighbours (B, C, N, H·W), one gather."""
    return x.flatten(2).index_select(2, index.flatten()).unflatten(2, index.shape)


def affinity(image: torch.Tensor, dilations: tuple[int, ...] = DILATIONS, colour_scale: float = COLOUR_SCALE,
             position_weight: float = POSITION_WEIGHT) -> torch.Tensor:
    """image (B, 3, H, W) float -> neighbour weights (B, 8·len(dilations), H, W), computed once per image."""
    index = neighbour_index(*image.shape[-2:], dilations, image.device)
    nb = neighbours(image, index).unflatten(-1, image.shape[-2:])                      # (B, 3, N, H, W)
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
    dtype. Each iteration replaces a pixel by the weighted sum of its neighbours (not itself): one
    gather of all neighbours and one weighted sum over them, summed in the reference's order.
    """
    if image.shape[-2:] != masks.shape[-2:]:
        image = F.interpolate(image, size=masks.shape[-2:], mode="bilinear", align_corners=True)
    weights = affinity(image.to(masks.dtype), dilations).flatten(2).unsqueeze(1)        # (B, 1, N, h·w)
    index = neighbour_index(*masks.shape[-2:], dilations, masks.device)
    for _ in range(iterations):
        masks = neighbours(masks, index).mul_(weights).sum(dim=2).view_as(masks)
    return masks
