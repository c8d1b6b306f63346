"""The permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) as Krähenbühl & Koltun's dense CRF
code (NeurIPS 2011; pydensecrf) builds and filters with it, in plain PyTorch.

A d-dimensional feature vector is elevated onto the plane x . 1 = 0 of R^(d+1), scaled so that the
lattice's blur approximates a Gaussian of unit standard deviation, and splatted with barycentric
weights onto the d+1 vertices of its enclosing simplex. Filtering = splat, blur with [1/2, 1, 1/2]
along each of the d+1 lattice directions in turn, slice (the transpose of splat) times the constant
alpha = 1 / (1 + 2^-d). Every step follows pydensecrf's x86 (SSE) build in float32 and in the same
operation order, so the lattice (its vertices and weights) is identical and filtered values agree to
float rounding: the lattice points are numbered here by sorted key instead of hash insertion order,
which changes no sum (each vertex still adds its points in point order).

The lattice is found with one stable sort of integer-packed keys and its blur neighbours with one
``torch.searchsorted``: no hash table, no loop over pixels, two host reads per build, on any device.
Filtering is d+3 sparse (CSR, int32 indices) matrix products built once per lattice: splat, one per
blur direction (three entries a row) and slice; no atomics, no per-pixel chunks, so the number of
operations does not depend on the number of points. Points may carry a group id (one per image of a
batch): points of different groups never share a lattice vertex.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch


def f32(x: float) -> float:
    """``x`` rounded to float32: a Python scalar operand that a float32 kernel uses unchanged on any device."""
    return float(np.float32(x))


def csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from int32 row pointers and columns (torch flags the layout as beta; the indices are
    correct by construction, so the invariant check is skipped)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, device=values.device, check_invariants=False)


# Sparse products accumulate in float32 for 16-bit values: cuSPARSE computes them in no other type (and
# some CUDA 13 releases not at all with 16-bit matrices), the CPU's in none.
SPARSE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Filter:
    """A lattice's Gaussian filter as sparse matrices in one dtype, for values of 1-2 or of 3+ channels.

    splat: (M+1, P) CSR of barycentric weights, each row's points in point order (row 0 empty);
    blur: d+1 (M+1, M+1) CSR, row r = [its two neighbours: 1/2 each (the empty row 0 when missing), r: 1];
    slice: (P, M+1) CSR of weights times alpha, for 3+ channels (pydensecrf's SSE order (w alpha) v); or,
    for 1-2 channels (its scalar order (w v) alpha), ``terms`` (P (d+1),) int32 table rows with their
    ``term_weights`` (P (d+1), 1) and slice (P, P (d+1)) CSR of alpha summing each point's d+1 terms.
    """

    splat: torch.Tensor
    blur: tuple[torch.Tensor, ...]
    slice: torch.Tensor
    terms: torch.Tensor | None = None
    term_weights: torch.Tensor | None = None

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(P, C) -> (P, C) in the values' dtype (computed in the filter's): splat, blur along each
        direction, slice."""
        dtype = self.splat.dtype
        table = self.splat @ (values if values.dtype == dtype else values.to(dtype))
        for step in self.blur:  # new = 1/2 n1 + 1/2 n2 + old, which rounds as old + (n1 + n2) / 2
            table = step @ table
        if self.terms is None:
            out = self.slice @ table
        else:
            out = self.slice @ (table.index_select(0, self.terms) * self.term_weights)
        return out if out.dtype == values.dtype else out.to(values.dtype)


@dataclass(frozen=True)
class Lattice:
    """A permutohedral lattice over P points with d-dimensional features and M lattice vertices.

    offsets: (P, d+1) int32, row of each enclosing vertex in a value table whose row 0 is the empty row;
    weights: (P, d+1) float32 barycentric weights (each row sums to 1);
    blur: (d+1, 2, M+1) int32, the two neighbours of every table row along each direction (0: none);
    splat_rows: (M+2,) int32 and splat_points, splat_weights (P (d+1),) int32 / float32: the splat's CSR,
    every (point, vertex) pair grouped by vertex, in point order within a vertex.
    """

    offsets: torch.Tensor
    weights: torch.Tensor
    blur: torch.Tensor
    splat_rows: torch.Tensor
    splat_points: torch.Tensor
    splat_weights: torch.Tensor

    @property
    def d(self) -> int:
        return self.offsets.shape[1] - 1

    @property
    def vertices(self) -> int:
        return self.blur.shape[2] - 1

    def operator(self, dtype: torch.dtype = torch.float32, channels: int = 3) -> Filter:
        """The filter for values of ``dtype`` and ``channels`` channels, in that dtype (float32 for 16-bit
        ones, see ``SPARSE_DTYPES``): its weights are the float32 ones converted, times alpha rounded to
        float32 and converted, as pydensecrf's float math does."""
        dtype = dtype if dtype in SPARSE_DTYPES else torch.float32
        P, d1 = self.offsets.shape
        rows, dev = self.vertices + 1, self.offsets.device
        splat = csr(self.splat_rows, self.splat_points, self.splat_weights.to(dtype), (rows, P))
        # blur rows are [n1, n2, self] with values [1/2, 1/2, 1]: the same three numbers in every row
        three = torch.arange(0, 3 * rows + 1, 3, dtype=torch.int32, device=dev)
        cols = torch.cat([self.blur, torch.arange(rows, dtype=torch.int32, device=dev).expand(d1, 1, rows)], 1)
        cols = cols.transpose(1, 2).reshape(d1, -1)
        halves = torch.full((rows, 3), 0.5, dtype=dtype, device=dev)
        halves[:, 2] = 1
        blur = tuple(csr(three, c, halves.view(-1), (rows, rows)) for c in cols)
        point_rows = torch.arange(0, P * d1 + 1, d1, dtype=torch.int32, device=dev)
        alpha = torch.full((), f32(1 / (1 + 2.0 ** -self.d)), dtype=torch.float32, device=dev).to(dtype)
        w = self.weights.to(dtype)
        if channels > 2:
            return Filter(splat, blur, csr(point_rows, self.offsets.reshape(-1), (w * alpha).reshape(-1),
                                           (P, rows)))
        terms = torch.arange(P * d1, dtype=torch.int32, device=dev)
        return Filter(splat, blur, csr(point_rows, terms, alpha.expand(P * d1).contiguous(), (P, P * d1)),
                      self.offsets.reshape(-1), w.reshape(-1, 1))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(P, C) -> (P, C) in the values' dtype (builds the operator for this call; reuse ``operator``)."""
        return self.operator(values.dtype, values.shape[1]).filter(values)


def scale_factors(d: int) -> list[float]:
    """The diagonal of the elevation's scaling, sqrt(2/3) (d+1) / sqrt((i+1)(i+2)), rounded to float32."""
    inv_std = f32(math.sqrt(2.0 / 3.0) * (d + 1))
    return [f32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std) for i in range(d)]


def elevate(features: torch.Tensor) -> torch.Tensor:
    """(P, d) float32 features -> (P, d+1) float32 points on the plane x . 1 = 0 (scaled as the lattice needs)."""
    P, d = features.shape
    sf = scale_factors(d)
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
    inv = f32(1.0 / d1)
    q = torch.round(elevated * inv)  # round half to even, like SSE's default rounding mode
    rem0f = q * d1
    shift = q.sum(1, keepdim=True).long()
    diff = elevated - rem0f
    # rank_i = #{j: diff_j > diff_i} + #{j < i: diff_j == diff_i}
    above = diff[:, None, :] > diff[:, :, None]
    tie_before = (diff[:, None, :] == diff[:, :, None]) & torch.ones(d1, d1, dtype=torch.bool,
                                                                     device=elevated.device).tril(-1)
    rank = (above | tie_before).sum(2) + shift
    fix = d1 * ((rank < 0).long() - (rank >= d1).long())
    rank += fix
    rem0 = rem0f.long() + fix
    v = (elevated - rem0.to(torch.float32)) * inv
    bary = elevated.new_zeros(P, d + 2)
    bary.scatter_add_(1, d - rank, v)
    bary.scatter_add_(1, d - rank + 1, -v)
    bary[:, 0] += 1 + bary[:, d + 1]
    return rem0, rank, bary[:, :d1]


def build(features: torch.Tensor, groups: torch.Tensor | None = None, num_groups: int | None = None) -> Lattice:
    """The lattice of (P, d) features (float32; other dtypes are converted) on their device.

    ``groups`` (P,) int64 in [0, ``num_groups``) keeps points of different groups apart (an image index
    for a batch); without ``num_groups`` it is read from ``groups`` (one more host read).
    """
    if features.ndim != 2 or features.shape[1] < 1:
        raise ValueError(f"features must be (P, d) with d >= 1, got {tuple(features.shape)}")
    f = features.to(torch.float32)
    P, d = f.shape
    d1, dev = d + 1, f.device
    rem0, rank, bary = simplex(elevate(f))
    # Vertex r of a point: key_i = rem0_i + r on coordinates whose rank <= d - r, rem0_i + r - (d+1) on the
    # others; only the first d coordinates are keys (the last follows from the plane). Keys are packed into
    # one int64 (mixed radix, margins for the +-d of the vertices and of the blur neighbours), built as
    # base + r * sum(stride) - (d+1) * sum_i stride_i [rank_i > d - r] without a (P, d+1, d) array.
    key = rem0[:, :d]
    lo = key.amin(0) - 2 * d1
    radix = key.amax(0) - lo + 2 * d1 + 1
    stride = torch.cat([radix.new_ones(1), radix[:-1]]).cumprod(0)
    sizes = radix.tolist()  # host read 1: the packing must fit in an int64
    span = math.prod(sizes)
    ngroups = num_groups if num_groups is not None else 1 if groups is None else int(groups.max()) + 1
    if span * ngroups >= 2 ** 62 or P * d1 >= 2 ** 31:
        raise ValueError("too many points or features spanning too large a lattice to index; filter fewer "
                         "images at once or scale the features down (larger sxy/srgb)")
    base = ((key - lo) * stride).sum(1)
    if groups is not None:
        base += groups.to(dev, torch.long) * span
    # coordinate i moves down by d+1 from vertex r = d - rank_i + 1 on: scatter its stride there, then cumsum
    drop = torch.zeros(P, d1 + 1, dtype=torch.long, device=dev)
    drop.scatter_add_(1, d - rank[:, :d] + 1, stride.expand(P, d))
    r = torch.arange(d1, device=dev)
    packed = (base[:, None] + r * stride.sum() - d1 * drop.cumsum(1)[:, :d1]).reshape(-1)     # (P (d+1),)
    # one stable sort numbers the vertices by key and groups each vertex's (point, vertex) pairs in point order
    ordered, order = torch.sort(packed, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    starts = first.nonzero().squeeze(1)  # host read 2: the number of vertices
    table = ordered[starts]
    M = table.numel()
    offsets = torch.empty(P * d1, dtype=torch.int32, device=dev).scatter_(0, order, first.cumsum(0, dtype=torch.int32))
    splat_rows = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), P * d1)]).to(torch.int32)
    # Neighbours along direction j: every key coordinate -1 and coordinate j + d (j < d), or all -1 (j = d).
    step = torch.cat([d1 * stride, stride.new_zeros(1)]) - stride.sum()               # (d+1,)
    want = table + torch.stack([step, -step], 1)[:, :, None]                            # (d+1, 2, M)
    at = torch.searchsorted(table, want).clamp_(max=M - 1)
    blur = torch.zeros(d1, 2, M + 1, dtype=torch.int32, device=dev)
    blur[:, :, 1:] = torch.where(table[at] == want, at + 1, 0)
    return Lattice(offsets=offsets.view(P, d1), weights=bary, blur=blur, splat_rows=splat_rows,
                   splat_points=(order // d1).to(torch.int32), splat_weights=bary.reshape(-1)[order])
