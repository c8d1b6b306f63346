"""CAA, class-aware attention-based affinity (CLIP-ES's generate_cams_voc12.py, utils.py): attention ->
Sinkhorn -> symmetric square transition matrix; box masks from CAMs; column-masked refinement.
Everything works on batched tensors on their own device."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mean_attention(attentions: list[torch.Tensor], last: int = 8) -> torch.Tensor:
    """Head-averaged maps, each (B, 1+n, 1+n), of consecutive blocks -> mean of the ``last`` ones with
    the CLS row and column dropped, float32 (B, n, n)."""
    w = torch.stack(attentions[-last:])
    return w.to(torch.float64 if w.dtype == torch.float64 else torch.float32).mean(dim=0)[:, 1:, 1:]


def sinkhorn(w: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """(..., n, n) -> same shape: ``rounds`` times divide each column by its sum, then each row."""
    for _ in range(rounds):
        w = w / w.sum(dim=-2, keepdim=True)
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def transition_matrix(w: torch.Tensor, rounds: int = 3, power: int = 2) -> torch.Tensor:
    """Attention (..., n, n) -> CAA transition A = ((D + Dᵀ)/2)^power with D = sinkhorn(w)."""
    d = sinkhorn(w, rounds)
    a = (d + d.transpose(-2, -1)) / 2
    out = a
    for _ in range(power - 1):
        out = out @ a
    return out


def _jumps_per_round(n: int) -> list[int]:
    """Pointer jumps of each hooking round of ``_components`` on n pixels: round r starts with at most
    n / 2^(r // 2) trees per component, so ⌈log2⌉ of that many jumps flatten its longest chain, and after
    2·⌈log2 n⌉ rounds one tree is left."""
    depth = max(math.ceil(math.log2(n)), 0)
    return [max(math.ceil(math.log2(max(n >> (r // 2), 1))), 0) for r in range(2 * depth)]


def _components(binary: torch.Tensor) -> torch.Tensor:
    """binary (M, h, w) bool -> int64 (M, h, w): each 8-connected component of True pixels labelled with
    the largest of its 1-based flat indices, 0 elsewhere, in a number of steps fixed by the grid size, so
    the device never waits for a convergence check on the host.

    Trees of parent pointers inside the components, each labelled by its root (initially every pixel
    its own). A round hooks every tree's root onto the largest root 8-adjacent to the tree when larger
    (roots only grow, so a component's largest index ends up its label), then pointer jumping makes
    every tree a star again. A tree that neither hooks nor is hooked onto in a round hooks in the next
    (its neighbours then all have larger roots), so two rounds at least halve a component's trees
    (Shiloach and Vishkin's argument for conditional hooking); ``_jumps_per_round`` has the counts.
    """
    M, h, w = binary.shape
    n = h * w
    fg = binary.reshape(M, n)
    slots = torch.arange(n + 1, device=binary.device)                                 # 0: background
    root = torch.where(fg, slots[1:], 0)                                              # (M, n)
    identity = slots.expand(M, n + 1).contiguous()
    for jumps in _jumps_per_round(n):
        # labels <= h·w are exact in float32, which max pooling needs
        adjacent = F.max_pool2d(root.view(M, 1, h, w).float(), 3, 1, 1).view(M, n).long() * fg
        parent = identity.scatter_reduce(1, root, adjacent, "amax")                   # root -> largest neighbour
        for _ in range(jumps):
            parent = parent.gather(1, parent)
        root = parent.gather(1, root)
    return root.view(M, h, w)


def box_masks(cams: torch.Tensor, threshold: float, exact: bool = True) -> torch.Tensor:
    """CAMs (..., h, w) in [0, 1] at patch resolution -> box masks float32 (..., h, w) in {0, 1}, batched on
    the CAMs' device (CLIP-ES's scoremap2bbox, one map at a time on the host in the reference).

    Per map: u = uint8(255 * cam) (truncation), binary where u > int(threshold * max u), one box per
    OpenCV contour: the bounding boxes of the 8-connected components (the boxes of nested contours lie
    inside their component's, so the union is the same); no component gives an empty mask. ``exact``: as
    the reference, a box's end is clipped to size - 1 and filled half-open, so the last row and column
    are never inside (a bug that weighs more the smaller the grid); False: whole boxes.
    """
    shape, (h, w), dev = cams.shape, cams.shape[-2:], cams.device
    x = cams.reshape(-1, h, w)
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    u = (x * 255).to(torch.uint8).long()
    limit = (u.flatten(1).amax(dim=1).double() * threshold).floor().long()          # int(threshold * max u)
    lab = _components(u > limit[:, None, None]).flatten(1)                           # (M, n)
    M, n = lab.shape
    flat = torch.arange(n, device=dev)
    rows, cols = (flat // w).expand(M, n), (flat % w).expand(M, n)
    y0 = torch.full((M, n + 1), h, device=dev).scatter_reduce(1, lab, rows, "amin")
    x0 = torch.full((M, n + 1), w, device=dev).scatter_reduce(1, lab, cols, "amin")
    y1 = torch.zeros((M, n + 1), dtype=torch.long, device=dev).scatter_reduce(1, lab, rows + 1, "amax")
    x1 = torch.zeros((M, n + 1), dtype=torch.long, device=dev).scatter_reduce(1, lab, cols + 1, "amax")
    y0, x0, y1, x1 = y0[:, 1:], x0[:, 1:], y1[:, 1:], x1[:, 1:]                        # slot 0: no component
    if exact:
        y1, x1 = y1.clamp(max=h - 1), x1.clamp(max=w - 1)
    box = ((y1 > y0) & (x1 > x0)).float()                                            # unused slots: y0 = h > y1
    # each box adds 1 inside itself through a 2-D difference table and its cumulative sums
    diff = torch.zeros((M, (h + 1) * (w + 1)), device=dev)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        at = ys.clamp(max=h) * (w + 1) + xs.clamp(max=w)
        diff.scatter_add_(1, at, sign * box)
    cover = diff.view(M, h + 1, w + 1).cumsum(1).cumsum(2)[:, :h, :w]
    return (cover > 0.5).float().reshape(shape)


def minmax(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-map (x - min) / (eps + max(x - min)) over the last two dims of (..., h, w)."""
    x = x - x.amin(dim=(-2, -1), keepdim=True)
    return x / (eps + x.amax(dim=(-2, -1), keepdim=True))


def refine(trans: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Column-masked propagation R_i = Σ_k A_ik B_k M_k per class, then min-max (the CLIP-ES paper, Eq. 7).

    trans (..., n, n), cams (..., K, h, w), masks (..., K, h, w) -> (..., K, h, w) float32 in [0, 1]; leading
    dims (a batch) broadcast.
    """
    x = (masks * cams).flatten(-2)                                   # (..., K, n)
    r = (trans @ x.transpose(-2, -1)).transpose(-2, -1)
    return minmax(r.reshape(r.shape[:-1] + cams.shape[-2:]))


# ------------------------------------------------------------- WeCLIP's refinement module (RFM)
def decoder_affinity(features: torch.Tensor) -> torch.Tensor:
    """Decoder feature map F_u (B, D, h, w) -> its patch affinity sigmoid(F_uᵀ F_u), float32 (B, n, n)
    on raw dot products (WeCLIP Eq. 4)."""
    f = features.float().flatten(2)                                  # (B, D, n)
    return torch.sigmoid(f.transpose(1, 2) @ f)


def layer_filter(attentions: torch.Tensor, affinity: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """WeCLIP's layer filter G_e as its code has it: attentions (B, L, n, n), affinity (B, n, n) ->
    the mean of the maps kept, (B, n, n).

    Per image, d_l = Σ_ij (affinity - A_l)_ij (signed, not absolute), τ = mean_l d_l, map l is kept
    when d_l <= τ; mean = Σ_l g_l A_l / (Σ_l g_l + eps). (The paper writes "<" and an absolute gap.)
    """
    a = attentions.float()
    d = (affinity.float()[:, None] - a).sum(dim=(-2, -1))            # (B, L)
    keep = (d <= d.mean(dim=1, keepdim=True)).to(a.dtype)
    return (keep[:, :, None, None] * a).sum(dim=1) / (keep.sum(dim=1)[:, None, None] + eps)


def refine_batch(trans: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``refine`` with WeCLIP's operand order (x Aᵀ, the float32 rounding its online labels are made with):
    trans (B, n, n), cams and masks (B, K, h, w) -> (B, K, h, w), each map R_i = Σ_k A_ik B_k M_k then min-max."""
    x = (masks * cams).flatten(-2)                                   # (B, K, n)
    r = (x @ trans.transpose(-2, -1)).reshape(cams.shape)
    return minmax(r)
