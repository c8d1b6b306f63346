"""Dense CRF mean-field inference in plain PyTorch (Krähenbühl & Koltun, NeurIPS 2011), computing what
pydensecrf computes for ``DenseCRF2D`` with ``addPairwiseGaussian`` + ``addPairwiseBilateral``: Potts
compatibility, diagonal kernels, symmetric normalisation, Q initialised to softmax(-U).

For each kernel k with features f_k and weight w_k: norm_k = 1 / sqrt(K_k 1 + 1e-20), and one iteration is
    Q <- softmax(-U + sum_k w_k * norm_k * K_k (norm_k * Q))
with K_k the permutohedral-lattice Gaussian filter (``permutohedral``). The kernel includes each pixel
itself, as pydensecrf's does. Device- and dtype-agnostic: the lattice is built in float32 (so it is the
same lattice as pydensecrf's), the iterations run in the unary's dtype on its device; a batch of images
of one size shares one lattice build, each image in its own group.
"""
from __future__ import annotations

import torch

from . import permutohedral


def pixel_features(batch: int, height: int, width: int, sxy: float, guide: torch.Tensor | None = None,
                   srgb: float | None = None, device=None) -> torch.Tensor:
    """(B * H * W, 2 or 5) float32 features, row-major pixels: (x / sxy, y / sxy[, c / srgb for the 3 guide
    channels]). ``guide`` (B, H, W, 3) uint8. Divisions in float32, as pydensecrf's ``DenseCRF2D`` does."""
    s = torch.tensor(sxy, dtype=torch.float32, device=device)
    x = (torch.arange(width, dtype=torch.float32, device=device) / s).view(1, 1, width).expand(batch, height, width)
    y = (torch.arange(height, dtype=torch.float32, device=device) / s).view(1, height, 1).expand(batch, height, width)
    cols = [x.reshape(-1), y.reshape(-1)]
    if guide is not None:
        c = guide.to(device).reshape(-1, 3).to(torch.float32) / torch.tensor(srgb, dtype=torch.float32, device=device)
        cols += [c[:, 0], c[:, 1], c[:, 2]]
    return torch.stack(cols, dim=1)


def symmetric_norm(lattice: permutohedral.Lattice, points: int, dtype: torch.dtype) -> torch.Tensor:
    """(P, 1) 1 / sqrt(K 1 + 1e-20) (computed in float64 from the float32 filter, as pydensecrf does)."""
    ones = torch.ones(points, 1, dtype=torch.float32, device=lattice.offsets.device)
    k1 = lattice.filter(ones).to(torch.float64)
    return (1.0 / torch.sqrt(k1 + 1e-20)).to(torch.float32).to(dtype)


def mean_field(unary: torch.Tensor, kernels: list[tuple[permutohedral.Lattice, torch.Tensor, float]],
               iters: int) -> torch.Tensor:
    """U (P, C) -> Q (P, C) marginals after ``iters`` iterations; kernels: (lattice, norm (P, 1), weight)."""
    neg_u = -unary
    q = torch.softmax(neg_u, dim=1)
    for _ in range(iters):
        energy = neg_u
        for lattice, norm, weight in kernels:
            energy = energy + weight * (lattice.filter(q * norm) * norm)
        q = torch.softmax(energy, dim=1)
    return q


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
    if not torch.isfinite(unary).all():
        raise ValueError("unary energies contain NaN or Inf")
    dev = unary.device
    groups = torch.arange(B, device=dev).repeat_interleave(H * W)
    u = unary.permute(0, 2, 3, 1).reshape(B * H * W, C)
    kernels = []
    for feats, weight in ((pixel_features(B, H, W, params.pos_xy, device=dev), params.pos_w),
                          (pixel_features(B, H, W, params.bi_xy, guide, params.bi_rgb, dev), params.bi_w)):
        if weight == 0:
            continue
        lattice = permutohedral.build(feats, groups if B > 1 else None)
        kernels.append((lattice, symmetric_norm(lattice, B * H * W, u.dtype), float(weight)))
    q = mean_field(u, kernels, params.iters)
    return q.view(B, H, W, C).permute(0, 3, 1, 2)
