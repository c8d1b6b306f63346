"""The permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) as Krähenbühl & Koltun's dense CRF
code (NeurIPS 2011; pydensecrf) builds and filters with it, in plain PyTorch.

A d-dimensional feature vector is elevated onto the plane x . 1 = 0 of R^(d+1), scaled so that the
lattice's blur approximates a Gaussian of unit standard deviation, and splatted with barycentric
weights onto the d+1 vertices of its enclosing simplex. Filtering = splat, blur with [1/2, 1, 1/2]
along each of the d+1 lattice directions in turn, slice (the transpose of splat) times the constant
alpha = 1 / (1 + 2^-d). Every step follows pydensecrf's x86 (SSE) build in float32 and in the same
operation order, so the lattice (its vertices and weights) is identical and filtered values agree to
float rounding: the lattice points are numbered here by sorted key instead of hash insertion order,
and on CUDA the splat sums run in an arbitrary order; neither changes a sum by more than a few ulps.

Lattice points are found with ``torch.unique`` on integer-packed keys and blur neighbours with
``torch.searchsorted``: no hash table and no loop over pixels, on any device. Points may carry a group
id (one per image of a batch): points of different groups never share a lattice vertex.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Pixels splatted per index_add_ call: bounds the (chunk * (d+1), C) temporary, keeps CPU sums in pixel order.
SPLAT_CHUNK = 1 << 16


@dataclass(frozen=True)
class Lattice:
    """A permutohedral lattice over P points with d-dimensional features and M lattice vertices.

    offsets: (P, d+1) int64, row of each enclosing vertex in a value table whose row 0 is the empty row;
    weights: (P, d+1) float32 barycentric weights (each row sums to 1);
    blur: (d+1, 2, M+1) int64, the two neighbours of every table row along each direction (0: none).
    """

    offsets: torch.Tensor
    weights: torch.Tensor
    blur: torch.Tensor

    @property
    def d(self) -> int:
        return self.offsets.shape[1] - 1

    @property
    def vertices(self) -> int:
        return self.blur.shape[2] - 1

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(P, C) -> (P, C) in the values' dtype: splat, blur along the d+1 directions, slice times alpha."""
        P, C = values.shape
        dtype, d = values.dtype, self.d
        w = self.weights.to(dtype)
        table = values.new_zeros(self.vertices + 1, C)
        for s in range(0, P, SPLAT_CHUNK):
            part = (w[s:s + SPLAT_CHUNK, :, None] * values[s:s + SPLAT_CHUNK, None, :]).reshape(-1, C)
            table.index_add_(0, self.offsets[s:s + SPLAT_CHUNK].reshape(-1), part)
        new, other = torch.empty_like(table), torch.empty_like(table)
        for j in range(d + 1):  # new = old + 0.5 * (n1 + n2), in that rounding order
            torch.index_select(table, 0, self.blur[j, 0], out=new)
            new += torch.index_select(table, 0, self.blur[j, 1], out=other)
            new *= 0.5
            new += table
            table, new = new, table
        alpha = float(torch.tensor(1 / (1 + 2.0 ** -d), dtype=torch.float32))
        out, gathered = values.new_zeros(P, C), values.new_empty(P, C)
        # pydensecrf slices 1-2 channels as (w * v) * alpha and more (its SSE path) as (w * alpha) * v
        wa = w * torch.tensor(alpha, dtype=torch.float32).to(dtype) if C > 2 else w
        for j in range(d + 1):
            torch.index_select(table, 0, self.offsets[:, j], out=gathered)
            gathered *= wa[:, j:j + 1]
            if C <= 2:
                gathered *= alpha
            out += gathered
        return out


def scale_factors(d: int) -> torch.Tensor:
    """(d,) float32: the diagonal of the elevation's scaling, sqrt(2/3) (d+1) / sqrt((i+1)(i+2))."""
    inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    return torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)], dtype=torch.float32)


def elevate(features: torch.Tensor) -> torch.Tensor:
    """(P, d) float32 features -> (P, d+1) float32 points on the plane x . 1 = 0 (scaled as the lattice needs)."""
    P, d = features.shape
    sf = scale_factors(d).to(features.device)
    out = features.new_empty(P, d + 1)
    sm = features.new_zeros(P)
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * sf[j - 1]
        out[:, j] = sm - j * cf
        sm = sm + cf
    out[:, 0] = sm
    return out


def simplex(elevated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enclosing simplex of each elevated point: (P, d+1) float32 ->
    rem0 (P, d+1) int64 (the nearest remainder-0 lattice point, moved back onto the plane),
    rank (P, d+1) int64 (each coordinate's rank in the point's offset from rem0; ties by coordinate order),
    barycentric (P, d+1) float32 weights of the d+1 vertices."""
    P, d1 = elevated.shape
    d = d1 - 1
    inv = torch.tensor(1.0 / d1, dtype=torch.float32, device=elevated.device)
    q = torch.round(elevated * inv)  # round half to even, like SSE's default rounding mode
    rem0f = q * d1
    shift = q.sum(1, keepdim=True).long()
    diff = elevated - rem0f
    rank = torch.zeros(P, d1, dtype=torch.long, device=elevated.device)
    for i in range(d):
        for j in range(i + 1, d1):
            lt = (diff[:, i] < diff[:, j]).long()
            rank[:, i] += lt
            rank[:, j] += 1 - lt
    rank += shift
    fix = d1 * ((rank < 0).long() - (rank >= d1).long())
    rank += fix
    rem0 = rem0f.long() + fix
    v = (elevated - rem0.to(torch.float32)) * inv
    bary = elevated.new_zeros(P, d + 2)
    bary.scatter_add_(1, d - rank, v)
    bary.scatter_add_(1, d - rank + 1, -v)
    bary[:, 0] += 1 + bary[:, d + 1]
    return rem0, rank, bary[:, :d1]


def build(features: torch.Tensor, groups: torch.Tensor | None = None) -> Lattice:
    """The lattice of (P, d) features (float32; other dtypes are converted) on their device.

    ``groups`` (P,) int64 >= 0 keeps points of different groups apart (an image index for a batch).
    """
    if features.ndim != 2 or features.shape[1] < 1:
        raise ValueError(f"features must be (P, d) with d >= 1, got {tuple(features.shape)}")
    f = features.to(torch.float32)
    P, d = f.shape
    d1 = d + 1
    rem0, rank, bary = simplex(elevate(f))
    # Vertex r of a point: key_i = rem0_i + r on coordinates whose rank <= d - r, rem0_i + r - (d+1) on the
    # others; only the first d coordinates are keys (the last follows from the plane). Keys are packed into
    # one int64 (mixed radix, margins for the +-d of the vertices and of the blur neighbours), built as
    # base + r * sum(stride) - (d+1) * sum_i stride_i [rank_i > d - r] without a (P, d+1, d) array.
    lo = rem0[:, :d].amin(0) - 2 * d1
    radix = rem0[:, :d].amax(0) - lo + 2 * d1 + 1
    strides = [1]
    for n in radix.tolist()[:-1]:
        strides.append(strides[-1] * n)
    span = strides[-1] * int(radix[-1])
    ngroups = 1 if groups is None else int(groups.max()) + 1
    if span * ngroups >= 2 ** 62:
        raise ValueError("features span too large a lattice to index; scale the features down "
                         "(larger sxy/srgb) or filter fewer images at once")
    stride = torch.tensor(strides, dtype=torch.long, device=f.device)
    base = ((rem0[:, :d] - lo) * stride).sum(1)
    if groups is not None:
        base += groups.to(f.device, torch.long) * span
    # coordinate i moves down by d+1 from vertex r = d - rank_i + 1 on: scatter its stride there, then cumsum
    drop = torch.zeros(P, d1 + 1, dtype=torch.long, device=f.device)
    drop.scatter_add_(1, d - rank[:, :d] + 1, stride.expand(P, d))
    r = torch.arange(d1, device=f.device)
    packed = base[:, None] + r * stride.sum() - d1 * drop.cumsum(1)[:, :d1]              # (P, d+1)
    table, inverse = torch.unique(packed.reshape(-1), sorted=True, return_inverse=True)
    M = table.numel()
    # Neighbours along direction j: every key coordinate -1 and coordinate j + d (j < d), or all -1 (j = d).
    step = torch.cat([d1 * stride, stride.new_zeros(1)]) - stride.sum()               # (d+1,)
    blur = torch.zeros(d1, 2, M + 1, dtype=torch.long, device=f.device)
    for j in range(d1):
        for side, sign in enumerate((1, -1)):
            want = table + sign * step[j]
            at = torch.searchsorted(table, want).clamp_(max=M - 1)
            blur[j, side, 1:] = torch.where(table[at] == want, at + 1, 0)
    return Lattice(offsets=inverse.view(P, d1) + 1, weights=bary, blur=blur)
