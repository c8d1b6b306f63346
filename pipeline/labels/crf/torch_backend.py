"""Dense CRF mean-field inference in plain PyTorch (Krähenbühl & Koltun, NeurIPS 2011), computing what
pydensecrf computes for ``DenseCRF2D`` with ``addPairwiseGaussian`` + ``addPairwiseBilateral``: Potts
compatibility, diagonal kernels, symmetric normalisation, Q initialised to softmax(-U).

For each kernel k with features f_k and weight w_k: norm_k = 1 / sqrt(K_k 1 + 1e-20), and one iteration is
    Q <- softmax(-U + sum_k w_k * norm_k * K_k (norm_k * Q))
with K_k the permutohedral-lattice Gaussian filter (``permutohedral``). The kernel includes each pixel
itself, as pydensecrf's does. Device- and dtype-agnostic: the lattice is built in float32 (so it is the
same lattice as pydensecrf's), the iterations run in the unary's dtype on its device (the lattice's sparse
products in float32 for 16-bit dtypes). A batch of images shares one lattice build per kernel, each image in its own group, so the
number of operations (kernel launches on a GPU) and of host reads does not grow with the batch; images
of different sizes batch together (``dense_crf_images``) as long as they have the same number of labels.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import permutohedral


def pixel_grid(height: int, width: int, device=None) -> torch.Tensor:
    """(H * W, 2) float32 pixel coordinates (x, y) of an H x W image, row-major."""
    x = torch.arange(width, dtype=torch.float32, device=device).expand(height, width)
    y = torch.arange(height, dtype=torch.float32, device=device)[:, None].expand(height, width)
    return torch.stack([x, y], -1).reshape(-1, 2)


def image_points(sizes: Sequence[tuple[int, int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of images of (H_i, W_i) ``sizes``, image after image, row-major: (P, 2) float32 (x, y) and
    (P,) int64 image index."""
    xy = torch.cat([pixel_grid(h, w, device) for h, w in sizes])
    groups = torch.cat([torch.full((h * w,), i, device=device) for i, (h, w) in enumerate(sizes)])
    return xy, groups


def pixel_features(xy: torch.Tensor, sxy: float, colors: torch.Tensor | None = None,
                   srgb: float | None = None) -> torch.Tensor:
    """(P, 2) float32 (x, y)[, (P, 3) uint8 guide colours] -> (P, 2 or 5) float32 features
    (x / sxy, y / sxy[, c / srgb]). Divisions in float32, as pydensecrf's ``DenseCRF2D`` does, by a tensor
    on the points' device (CUDA would turn a division by a host scalar into a product with its reciprocal)."""
    dev = xy.device
    pos = xy / torch.full((), sxy, dtype=torch.float32, device=dev)
    if colors is None:
        return pos
    return torch.cat([pos, colors.to(dev, torch.float32) / torch.full((), srgb, dtype=torch.float32, device=dev)], 1)


def symmetric_norm(lattice: permutohedral.Lattice, points: int, dtype: torch.dtype) -> torch.Tensor:
    """(P, 1) 1 / sqrt(K 1 + 1e-20) (computed in float64 from the float32 filter, as pydensecrf does)."""
    ones = torch.ones(points, 1, dtype=torch.float32, device=lattice.offsets.device)
    k1 = lattice.filter(ones).to(torch.float64)
    return (1.0 / torch.sqrt(k1 + 1e-20)).to(torch.float32).to(dtype)


def mean_field(unary: torch.Tensor, kernels: list[tuple[permutohedral.Filter, torch.Tensor, float]],
               iters: int) -> torch.Tensor:
    """U (P, C) -> Q (P, C) marginals after ``iters`` iterations; kernels: (filter, norm (P, 1), weight)."""
    neg_u = -unary
    q = torch.softmax(neg_u, dim=1)
    for _ in range(iters):
        energy = neg_u
        for filt, norm, weight in kernels:
            energy = energy + weight * (filt.filter(q * norm) * norm)
        q = torch.softmax(energy, dim=1)
    return q


def crf_points(unary: torch.Tensor, xy: torch.Tensor, colors: torch.Tensor, groups: torch.Tensor,
               num_groups: int, params) -> torch.Tensor:
    """Mean-field marginals of P pixels of ``num_groups`` images: U (P, C) float, xy (P, 2) float32 pixel
    coordinates, colors (P, 3) uint8 guide, groups (P,) int64 image index -> Q (P, C) in U's dtype.
    ``params``: ``CRFParams`` (iters, pos_xy, pos_w, bi_xy, bi_rgb, bi_w)."""
    P, C = unary.shape
    kernels = []
    for weight, sxy, rgb in ((params.pos_w, params.pos_xy, None), (params.bi_w, params.bi_xy, colors)):
        if weight == 0:
            continue
        lattice = permutohedral.build(pixel_features(xy, sxy, rgb, params.bi_rgb), groups, num_groups)
        kernels.append((lattice.operator(unary.dtype, C), symmetric_norm(lattice, P, unary.dtype), float(weight)))
    return mean_field(unary, kernels, params.iters)


def check_unary(unary: torch.Tensor) -> None:
    """``ValueError`` for NaN/Inf energies."""
    if not torch.isfinite(unary).all():
        raise ValueError("unary energies contain NaN or Inf")


@torch.no_grad()
def dense_crf(unary: torch.Tensor, guide: torch.Tensor, params) -> torch.Tensor:
    """Mean-field marginals for a batch of images of one size.

    unary: (B, C, H, W) float energies -log P (its dtype and device are used for the iterations);
    guide: (B, H, W, 3) uint8 bilateral guide image (channel order as given);
    params: ``CRFParams`` (iters, pos_xy, pos_w, bi_xy, bi_rgb, bi_w). Returns Q (B, C, H, W) in U's dtype.
    """
    if unary.ndim != 4 or unary.shape[1] < 1 or not unary.is_floating_point():
        raise ValueError(f"unary must be floating point (B, C, H, W) with C >= 1 labels, got {unary.dtype} "
                         f"{tuple(unary.shape)} (at least one label is needed)")
    B, C, H, W = unary.shape
    if guide.dtype != torch.uint8 or tuple(guide.shape) != (B, H, W, 3):
        raise ValueError(f"guide must be uint8 {(B, H, W, 3)} to match the unary, got {guide.dtype} {tuple(guide.shape)}")
    check_unary(unary)
    dev = unary.device
    u = unary.permute(0, 2, 3, 1).reshape(B * H * W, C)
    xy = pixel_grid(H, W, dev).expand(B, H * W, 2).reshape(-1, 2)
    groups = torch.arange(B, device=dev)[:, None].expand(B, H * W).reshape(-1)
    q = crf_points(u, xy, guide.to(dev).reshape(-1, 3), groups, B, params)
    return q.view(B, H, W, C).permute(0, 3, 1, 2)


@torch.no_grad()
def dense_crf_images(unaries: Sequence[torch.Tensor], guides: Sequence[torch.Tensor], params) -> list[torch.Tensor]:
    """``dense_crf`` for images of any sizes with the same number of labels C, in one batch:
    unaries (C, H_i, W_i) float on one device, guides (H_i, W_i, 3) uint8 -> Q (C, H_i, W_i) each."""
    if not unaries or len(unaries) != len(guides):
        raise ValueError(f"need one guide per unary, got {len(unaries)} unaries and {len(guides)} guides")
    C, dev = unaries[0].shape[0], unaries[0].device
    for u, g in zip(unaries, guides):
        if u.ndim != 3 or u.shape[0] != C or not u.is_floating_point() or C < 1:
            raise ValueError(f"unaries must be floating point (C, H, W) with one C >= 1, got {u.dtype} {tuple(u.shape)}")
        if g.dtype != torch.uint8 or tuple(g.shape) != (*u.shape[1:], 3):
            raise ValueError(f"guide must be uint8 {(*u.shape[1:], 3)} to match its unary, got {g.dtype} {tuple(g.shape)}")
    u = torch.cat([x.permute(1, 2, 0).reshape(-1, C) for x in unaries])
    check_unary(u)
    sizes = [tuple(x.shape[1:]) for x in unaries]
    xy, groups = image_points(sizes, dev)
    q = crf_points(u, xy, torch.cat([g.to(dev).reshape(-1, 3) for g in guides]), groups, len(unaries), params)
    return [p.view(h, w, C).permute(2, 0, 1) for p, (h, w) in zip(q.split([h * w for h, w in sizes]), sizes)]
