"""CAA, class-aware attention-based affinity (CLIP-ES's generate_cams_voc12.py, utils.py): attention ->
Sinkhorn -> symmetric square transition matrix; box masks from CAMs; column-masked refinement."""
from __future__ import annotations

import cv2
import numpy as np
import torch


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


def box_mask(cam: np.ndarray, threshold: float, exact: bool = True) -> np.ndarray:
    """Box mask (h, w) float32 in {0, 1} from one CAM (h, w) at patch resolution (CLIP-ES's scoremap2bbox).

    u = uint8(255 * cam) (truncation), binary where u > int(threshold * max u), one box per contour
    (RETR_TREE, nested ones too); no contour gives an empty mask. ``exact``: as the reference, the box
    end is clipped to size - 1 and filled half-open, so the last row and column are never inside (a
    bug that weighs more the smaller the grid); False: each box covers its contour's whole extent.
    """
    h, w = cam.shape
    end_h, end_w = (h - 1, w - 1) if exact else (h, w)
    u = (cam * 255).astype(np.uint8)
    _, binary = cv2.threshold(u, int(threshold * u.max()), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    mask = np.zeros((h, w), np.float32)
    for contour in contours:
        x, y, bw, bh = cv2.boundingRect(contour)
        mask[y:min(y + bh, end_h), x:min(x + bw, end_w)] = 1
    return mask


def box_masks(cams: np.ndarray, threshold: float, exact: bool = True) -> np.ndarray:
    """(K, h, w) CAMs -> (K, h, w) box masks (``box_mask``)."""
    return np.stack([box_mask(c, threshold, exact) for c in cams]) if len(cams) else np.zeros_like(cams)


def minmax(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-map (x - min) / (eps + max(x - min)) over the last two dims of (..., h, w)."""
    x = x - x.amin(dim=(-2, -1), keepdim=True)
    return x / (eps + x.amax(dim=(-2, -1), keepdim=True))


def refine(trans: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Column-masked propagation R_i = Σ_k A_ik B_k M_k per class, then min-max (the CLIP-ES paper, Eq. 7).

    trans (n, n), cams (K, h, w), masks (K, h, w) -> (K, h, w) float32 in [0, 1].
    """
    K, h, w = cams.shape
    r = (trans @ (masks * cams).reshape(K, h * w).t()).t().reshape(K, h, w)
    return minmax(r)


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
    """Batched ``refine``: trans (B, n, n), cams and masks (B, K, h, w) -> (B, K, h, w), each map
    R_i = Σ_k A_ik B_k M_k then min-max."""
    x = (masks * cams).flatten(-2)                                   # (B, K, n)
    r = (x @ trans.transpose(-2, -1)).reshape(cams.shape)
    return minmax(r)
