"""An independent re-statement of facebookresearch/dinov2's ``DinoVisionTransformer.forward_features`` as
its hub backbones run it (``dinov2/models/vision_transformer.py``, ``dinov2/layers``,
``dinov2/hub/backbones.py``), for parity tests of ``pipeline.dino``.

Deliberately written apart from ``pipeline``: a function over the raw state dict in float64, the
sequence first, attention as an explicit softmax per head, LayerNorm and GELU from their formulas, and
the positional-table resize done in numpy from PyTorch's published resampling rules (bicubic with
A = -0.75 and clamped taps placed by the given scale factor; antialiased bicubic with A = -0.5 and
normalised, widened taps, as PIL) instead of calling ``F.interpolate``.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) resampling matrix of PyTorch's bicubic (align_corners=False): source coordinate
    scale * (i + 0.5) - 0.5, four taps around its floor, indices clamped to the border."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = scale * (i + 0.5) - 0.5
        x0 = math.floor(x)
        t = x - x0
        for k, d in enumerate((-1, 0, 1, 2)):
            m[i, min(max(x0 + d, 0), n_in - 1)] += _cubic(np.array(t - d), -0.75)
    return m


def _bicubic_aa_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) resampling matrix of PyTorch's antialiased bicubic: the kernel (A = -0.5) stretched
    by the scale when shrinking, taps within the support around centre scale * (i + 0.5), weights
    normalised to sum 1."""
    support = 2.0 * scale if scale >= 1 else 2.0
    inv = 1.0 / scale if scale >= 1 else 1.0
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        w = _cubic((np.arange(lo, hi) - centre + 0.5) * inv, -0.5)
        m[i, lo:hi] = w / w.sum()
    return m


def resized_pos_table(pos: np.ndarray, h: int, w: int, registers: int) -> np.ndarray:
    """(1 + g*g, D) -> (1 + h*w, D) as the hub model of that kind resizes it: kept as is on the g x g
    grid; register models antialiased to the sizes, the others to scale factors (h + 0.1) / g, (w + 0.1) / g."""
    g = int(round(math.sqrt(pos.shape[0] - 1)))
    if (h, w) == (g, g):
        return pos
    grid = pos[1:].reshape(g, g, -1)
    if registers:
        rows, cols = _bicubic_aa_matrix(g, h, g / h), _bicubic_aa_matrix(g, w, g / w)
    else:
        rows, cols = _bicubic_matrix(g, h, g / (h + 0.1)), _bicubic_matrix(g, w, g / (w + 0.1))
    out = np.einsum("ia,jb,abd->ijd", rows, cols, grid)
    return np.concatenate([pos[:1], out.reshape(h * w, -1)])


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * weight + bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def reference_patch_tokens(sd: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """A released-layout state dict and one normalised image (3, H, W) -> the final normalised patch
    tokens (h*w, D) in float64 (``x_norm_patchtokens`` of ``forward_features``)."""
    s = {k: v.double() for k, v in sd.items()}
    conv = s["patch_embed.proj.weight"]
    D, p = conv.shape[0], conv.shape[-1]
    heads = D // 64
    H, W = image.shape[-2:]
    h, w = H // p, W // p
    regs = s["register_tokens"][0] if "register_tokens" in s else s["cls_token"][0, :0]
    # patches as a matrix product over flattened p x p pixels (row-major patches)
    px = image.double().reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, 3 * p * p)
    patches = px @ conv.reshape(D, -1).T + s["patch_embed.proj.bias"]
    pos = torch.from_numpy(resized_pos_table(s["pos_embed"][0].numpy(), h, w, len(regs)))
    x = torch.cat([s["cls_token"][0] + pos[:1], regs, patches + pos[1:]])          # (L, D)
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        b = lambda name: s[f"blocks.{i}.{name}"]  # noqa: E731
        y = _layer_norm(x, b("norm1.weight"), b("norm1.bias"))
        qkv = y @ b("attn.qkv.weight").T + b("attn.qkv.bias")
        q, k, v = qkv.split(D, dim=-1)
        outs = []
        for hd in range(heads):
            sl = slice(64 * hd, 64 * (hd + 1))
            a = torch.softmax(q[:, sl] @ k[:, sl].T / 8.0, dim=-1)
            outs.append(a @ v[:, sl])
        attn = torch.cat(outs, dim=-1) @ b("attn.proj.weight").T + b("attn.proj.bias")
        x = x + attn * b("ls1.gamma")
        y = _layer_norm(x, b("norm2.weight"), b("norm2.bias"))
        mlp = _gelu(y @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")) @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
        x = x + mlp * b("ls2.gamma")
    x = _layer_norm(x, s["norm.weight"], s["norm.bias"])
    return x[1 + len(regs):]
