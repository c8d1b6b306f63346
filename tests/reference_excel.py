"""An independent restatement of ExCEL's training-free CAMs and of the RFM step its and WeCLIP's
online labels share, for parity tests of the defaults (ExCEL's clip/clip_surgery_model.py, clip/clip.py,
utils/affutils.py; WeCLIP's clip/clip_tool.py).

Written the way the references are, not the way ``pipeline`` is: the weights of ``reference.ReferenceCLIP``
(sequence-first blocks on ``nn.MultiheadAttention``, head-averaged weights) for the plain blocks, the
dual-path blocks with one fused qkv projection cut into heads, the positional table resized as a
square grid, the feature surgery as element-wise products, one box mask and one product per class,
numpy/OpenCV for the upsampling. Every constant is typed here, none is imported from ``pipeline``.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from reference import ReferenceCLIP, scoremap2bbox


def _resize_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """Positional table (1 + s*s, D) -> (1 + side*side, D), the grid resized bilinearly (as the reference's
    F.upsample / interpolate with default corners) and the CLS row kept."""
    first, grid = table[:1], table[1:]
    old = int(round(grid.shape[0] ** 0.5))
    if old == side:
        return table
    g = grid.reshape(-1, old, old, grid.shape[-1]).permute(0, 3, 1, 2)
    g = F.interpolate(g, (side, side), mode="bilinear")
    g = g.reshape(-1, table.shape[-1], side * side).transpose(1, 2)
    return torch.cat([first, g[0]], 0)


def _dual_attention(attn, x: torch.Tensor, head_reduce: str, relation: torch.Tensor | None):
    """ExCEL's Attention.forward: x (B, N, C) -> (new-path output, original-path output, attention reduced
    over heads). ``relation`` (B, n, n): the learnable calibration's softmaxed relations, added to every
    head's patch-patch part before the head sum."""
    B, N, C = x.shape
    H = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = (C // H) ** -0.5
    attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    s = (((q @ q.transpose(-2, -1)) * scale).softmax(dim=-1) + ((k @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
         + ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)) / 3
    if relation is not None:
        s = s.clone()
        s[:, :, 1:, 1:] = s[:, :, 1:, 1:] + relation[:, None]
    s = torch.sum(s, dim=1, keepdim=True)
    new = (s @ v).transpose(1, 2).reshape(B, N, C)
    ori = (attn_ori @ v).transpose(1, 2).reshape(B, N, C)
    proj = lambda t: F.linear(t, attn.out_proj.weight, attn.out_proj.bias)  # noqa: E731
    reduced = torch.sum(attn_ori, dim=1) if head_reduce == "sum" else torch.mean(attn_ori, dim=1)
    return proj(new), proj(ori), reduced


@torch.no_grad()
def surgery_forward(ref: ReferenceCLIP, images: torch.Tensor, calibrated: int = 5, pos_via: int | None = 20,
                    head_reduce: str = "sum", relation: torch.Tensor | None = None):
    """images (B, 3, S, S) -> (tokens (B, L, D) before ln_post: the new path with the original CLS,
    projected features (B, L, E), one attention map (B, L, L) per block). The plain blocks report the
    head mean, the last ``calibrated`` ones ``head_reduce`` ('sum' as the reference) of theirs."""
    B, _, Hs, Ws = images.shape
    assert Hs == Ws, "the reference infers a square grid"
    side = Hs // ref.patch
    x = ref.conv1(images)
    D = x.shape[1]
    x = x.reshape(B, D, -1).permute(0, 2, 1)
    x = torch.cat([ref.class_embedding + torch.zeros(B, 1, D, dtype=x.dtype), x], dim=1)
    table = ref.vpos if pos_via is None else _resize_table(ref.vpos, pos_via)   # 'train' construction
    x = ref.ln_pre(x + _resize_table(table, side))
    x = x.permute(1, 0, 2)
    first = len(ref.vblocks) - calibrated
    attns = []
    for blk in ref.vblocks[:first]:
        x, a = blk(x)
        attns.append(a)
    z = x.permute(1, 0, 2)   # the original path
    p = z                    # the new path starts from it
    for blk in ref.vblocks[first:]:
        new, ori, a = _dual_attention(blk.attn, blk.ln_1(z), head_reduce, relation)
        z = z + ori
        z = z + blk.mlp(blk.ln_2(z))
        p = p + new          # no MLP on the new path
        attns.append(a)
    tokens = torch.cat([z[:, :1], p[:, 1:]], dim=1)
    return tokens, ref.ln_post(tokens) @ ref.proj, attns


def feature_surgery(features: torch.Tensor, text: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """clip_feature_surgery: features (B, L, E), text (C, E) -> (B, L, C) min-max over the L tokens."""
    prob = ((features[:, :1, :] @ text.t()) * t).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    b, n_t, n_i, c = features.shape[0], text.shape[0], features.shape[1], features.shape[2]
    feats = features.reshape(b, n_i, 1, c) * text.reshape(1, 1, n_t, c)
    feats = feats * w.unsqueeze(-1)
    feats = feats - feats.mean(2, keepdim=True)
    sim = feats.sum(-1)
    lo, hi = sim.min(1, keepdim=True)[0], sim.max(1, keepdim=True)[0]
    return (sim - lo) / (hi - lo)


def static_cams(projected: torch.Tensor, text: torch.Tensor, num_classes: int, token_axis: bool = True) -> torch.Tensor:
    """Projected features (B, L, E), text rows (C_all, E) -> CAMs (B, num_classes, h, w) of a square grid.
    ``token_axis``: the reference divides by the norm over tokens (dim 1); False: each token's norm."""
    x = projected / projected.norm(dim=1 if token_axis else -1, keepdim=True)
    cams = feature_surgery(x, text)[:, 1:, :num_classes]
    side = int(round(cams.shape[1] ** 0.5))
    return cams.transpose(1, 2).reshape(cams.shape[0], num_classes, side, side)


def compute_trans_mat(attn_weight: torch.Tensor) -> torch.Tensor:
    """(n, n) -> Sinkhorn (columns, then rows; three rounds), symmetrised, squared."""
    t = attn_weight / torch.sum(attn_weight, dim=0, keepdim=True)
    t = t / torch.sum(t, dim=1, keepdim=True)
    for _ in range(2):
        t = t / torch.sum(t, dim=0, keepdim=True)
        t = t / torch.sum(t, dim=1, keepdim=True)
    t = (t + t.transpose(1, 0)) / 2
    return torch.matmul(t, t)


def static_attention(attns: list[torch.Tensor], b: int, layers: int) -> torch.Tensor:
    """Image b's mean of the last ``layers`` maps, CLS row and column dropped -> (n, n)."""
    return torch.stack([a[b] for a in attns])[:, 1:, 1:][-layers:].mean(dim=0)


def filtered_attention(attns: list[torch.Tensor], b: int, layers: int, seg_attn: torch.Tensor) -> torch.Tensor:
    """WeCLIP's layer filter as its code has it (signed gap, <= the mean, eps 1e-5), times the decoder's
    affinity ``seg_attn`` (n, n)."""
    w = torch.stack([a[b] for a in attns])[:, 1:, 1:][-layers:]
    diff = torch.sum((seg_attn - w).flatten(1), dim=1)
    mask = torch.zeros_like(diff)
    mask[diff <= torch.mean(diff)] = 1
    mask = mask.reshape(-1, 1, 1).expand_as(w)
    return torch.sum(mask * w, dim=0) / (torch.sum(mask, dim=0) + 1e-5) * seg_attn


def scale_cam_image(cam: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """pytorch_grad_cam's: min-max with 1e-7, then OpenCV's default (bilinear) resize to ``size`` = (H, W)."""
    cam = cam - np.min(cam)
    cam = cam / (1e-7 + np.max(cam))
    if size is not None:
        cam = cv2.resize(cam, (size[1], size[0]))
    return np.float32(cam)


def refine_with_boxes(trans: torch.Tensor, cam: np.ndarray, threshold: float, clip_boxes: bool = True) -> np.ndarray:
    """One class: transition (n, n), CAM (h, w) -> the column-masked product (h, w) (not normalised);
    ``clip_boxes`` False: whole boxes (see ``reference.scoremap2bbox``)."""
    h, w = cam.shape
    box, cnt = scoremap2bbox(cam, threshold, clip_boxes)
    mask = torch.zeros(h, w)
    for x0, y0, x1, y1 in box[:cnt]:
        mask[y0:y1, x0:x1] = 1
    t = trans.float() * mask.view(1, h * w)
    return torch.matmul(t, torch.from_numpy(np.asarray(cam, np.float32)).view(-1, 1)).reshape(h, w).numpy()


def refined_maps(trans: torch.Tensor, cams: np.ndarray, threshold: float, size=None, clip_boxes: bool = True) -> np.ndarray:
    """Per class (K, h, w) -> refined, min-max normalised, optionally resized to ``size`` (K, H, W)."""
    return np.stack([scale_cam_image(refine_with_boxes(trans, c, threshold, clip_boxes), size) for c in cams])


def dynamic_relation(fused: torch.Tensor) -> torch.Tensor:
    """ExCEL's relations from the adapter's features F_d (B, c, h, w): cosines of the patches' channel
    vectors, minus the mean over the whole batch tensor, times 3, negatives to -inf, softmax over rows."""
    q_k = F.normalize(fused.flatten(2, 3), dim=1)
    sim = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    sim = (sim - torch.mean(sim) * 1.0) * 3.0
    sim[sim < 0.0] = float("-inf")
    return F.softmax(sim, dim=-1)


def feature_affinity(fused: torch.Tensor) -> torch.Tensor:
    """ExCEL's attn_pred: sigmoid(3 (cos - batch mean)) of F_d's patch vectors (B, n, n)."""
    b, c, h, w = fused.shape
    f = F.normalize(fused.reshape(b, c, h * w), dim=1)
    a = f.transpose(2, 1).bmm(f)
    return torch.sigmoid((a - torch.mean(a) * 1.0) * 3.0)
