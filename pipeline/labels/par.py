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


def offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """(row, column) offsets of the N = 8·len(dilations) neighbours, ``RING`` order within each dilation."""
    return [(d * (r - 1), d * (c - 1)) for d in dilations for r, c in RING]


def ring_offsets(dilations: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``offsets`` as row and column tensors (N,) int64 made on ``device`` (a host-to-device copy would
    make the host wait for a GPU)."""
    ring = torch.arange(8, device=device)
    ring = ring + (ring >= 4).long()                                    # RING: the 3 x 3 cells but the centre
    return (torch.cat([d * (ring // 3 - 1) for d in dilations]), torch.cat([d * (ring % 3 - 1) for d in dilations]))


def shifted(padded: torch.Tensor, margin: int, size: tuple[int, int], dilations: tuple[int, ...]) -> list[torch.Tensor]:
    """Views of a map padded by ``margin`` >= every dilation: for each neighbour offset, the (..., H, W)
    window that holds every pixel's neighbour there (replicate padding = coordinates clamped to the map)."""
    h, w = size
    return [padded[..., margin + y: margin + y + h, margin + x: margin + x + w] for y, x in offsets(dilations)]


def replicate_border(padded: torch.Tensor, margin: int) -> None:
    """Refill the ``margin`` wide border of a padded map (..., H + 2m, W + 2m) from its inside, in place,
    as replicate padding does: rows first, then whole columns (corners included)."""
    m, (hp, wp) = margin, padded.shape[-2:]
    padded[..., :m, m:wp - m] = padded[..., m:m + 1, m:wp - m]
    padded[..., hp - m:, m:wp - m] = padded[..., hp - m - 1:hp - m, m:wp - m]
    padded[..., :, :m] = padded[..., :, m:m + 1]
    padded[..., :, wp - m:] = padded[..., :, wp - m - 1:wp - m]


def affinity(image: torch.Tensor, dilations: tuple[int, ...] = DILATIONS, colour_scale: float = COLOUR_SCALE,
             position_weight: float = POSITION_WEIGHT) -> torch.Tensor:
    """image (B, 3, H, W) float -> neighbour weights (B, 8·len(dilations), H, W), computed once per image."""
    margin = max(dilations)
    padded = F.pad(image, [margin] * 4, mode="replicate")
    nb = torch.stack(shifted(padded, margin, image.shape[-2:], dilations), dim=2)     # (B, 3, N, H, W)
    diff = (nb - image.unsqueeze(2)).abs()
    colour = -(diff / (nb.std(dim=2, keepdim=True) + 1e-8) / colour_scale) ** 2
    colour = colour.mean(dim=1)                                                         # (B, N, H, W)
    dy, dx = ring_offsets(dilations, image.device)
    # d or d·√2, in float64 as the reference's table, then in the image's dtype
    size = torch.maximum(dy.abs(), dx.abs()).double()
    dist = torch.where((dy != 0) & (dx != 0), size * math.sqrt(2), size).to(image.dtype)
    position = -(dist / (dist.std() + 1e-8) / colour_scale) ** 2
    return colour.softmax(dim=1) + position_weight * position.softmax(dim=0)[:, None, None]


def par(image: torch.Tensor, masks: torch.Tensor, iterations: int = ITERATIONS,
        dilations: tuple[int, ...] = DILATIONS) -> torch.Tensor:
    """Refine maps with PAR.

    image (B, 3, H, W) float (the reference passes the normalised image), resized to the maps' size
    (bilinear, align_corners=True) when it differs; masks (B, K, h, w) -> (B, K, h, w) in the masks'
    dtype. Each iteration replaces a pixel by the weighted sum of its neighbours (not itself).

    The maps live in two buffers padded once by the largest dilation: an iteration reads every
    neighbour through a fixed view of one and accumulates into the inside of the other (one fused
    multiply-add per neighbour, no copies of shifted maps), then refills that one's border.
    """
    if image.shape[-2:] != masks.shape[-2:]:
        image = F.interpolate(image, size=masks.shape[-2:], mode="bilinear", align_corners=True)
    weights = affinity(image.to(masks.dtype), dilations).unsqueeze(2).unbind(1)                # N x (B, 1, h, w)
    margin, size = max(dilations), masks.shape[-2:]
    buffers = [F.pad(masks, [margin] * 4, mode="replicate")]
    buffers.append(torch.empty_like(buffers[0]))
    views = [shifted(b, margin, size, dilations) for b in buffers]
    insides = [b[..., margin: margin + size[0], margin: margin + size[1]] for b in buffers]
    for i in range(iterations):
        src, dst = i % 2, 1 - i % 2
        out = insides[dst].zero_()
        for weight, neighbour in zip(weights, views[src]):
            out.addcmul_(weight, neighbour)
        if i + 1 < iterations:
            replicate_border(buffers[dst], margin)
    return insides[iterations % 2].contiguous()
