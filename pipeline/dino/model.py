"""Frozen DINOv2 ViT backbone (Oquab et al., "DINOv2: Learning robust visual features without
supervision", TMLR 2024) in the parameter layout of Meta's released backbone files.

Loads those files as distributed (``dinov2_vits14_pretrain.pth``, ``dinov2_vitb14_reg4_pretrain.pth``, ...:
plain state dicts), reads the architecture off the weights (width, depth, patch, pretrained grid,
register tokens, LayerScale), never downloads, and runs any grid of whole patches with the positional
table resized the way DINOv2's hub models do it. ``forward_features`` returns the final normalised
tokens (CLS, registers, patches) and, on request, block outputs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..io import UnreadableWeights, torch_load

HEAD_DIM = 64        # every DINOv2 ViT (S/B/L/g) uses 64-dim heads
LN_EPS = 1e-6
MLP_RATIO = 4
FILES = "dinov2_vits14_pretrain.pth, dinov2_vitb14_pretrain.pth, dinov2_vitl14_pretrain.pth or their _reg4 versions"


class CheckpointError(ValueError):
    """The file is not a usable DINOv2 backbone checkpoint; the message names it and the fix."""


@dataclass(frozen=True)
class DinoArch:
    """Architecture read off a state dict. ``grid``: side of the pretrained positional table (37 for
    the released 518-pixel models); ``registers``: extra tokens after CLS (4 in the ``_reg4`` files)."""

    embed_dim: int
    depth: int
    patch_size: int
    grid: int
    registers: int = 0
    layer_scale: bool = True

    @property
    def heads(self) -> int:
        return self.embed_dim // HEAD_DIM

    # The hub builds the register models with antialiased resizing and no offset, the others with a
    # 0.1 offset on the scale factor and no antialiasing (dinov2/hub/backbones.py).
    @property
    def antialias(self) -> bool:
        return self.registers > 0

    @property
    def offset(self) -> float:
        return 0.0 if self.registers else 0.1

    @property
    def name(self) -> str:
        size = {384: "S", 768: "B", 1024: "L", 1536: "g"}.get(self.embed_dim, f"w{self.embed_dim}")
        return f"ViT-{size}/{self.patch_size}" + (f" + {self.registers} registers" if self.registers else "")

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> "DinoArch":
        if any(k.startswith("visual.") for k in sd):
            raise CheckpointError(f"{source}: this is a CLIP checkpoint; DINO= takes a DINOv2 backbone file ({FILES})")
        if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
            raise CheckpointError(f"{source}: a DINOv2 training checkpoint with chunked blocks; use a released "
                                  f"backbone file ({FILES})")
        if "blocks.0.mlp.w12.weight" in sd:
            raise CheckpointError(f"{source}: a SwiGLU DINOv2 (ViT-g/14), which is not supported; use ViT-S/14, "
                                  "B/14 or L/14, with or without registers")
        required = ["patch_embed.proj.weight", "pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.weight"]
        missing = [k for k in required if k not in sd]
        if missing:
            raise CheckpointError(f"{source}: not a DINOv2 backbone checkpoint (missing {', '.join(missing)}); "
                                  f"use one of the files Meta distributes ({FILES})")
        conv, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = math.isqrt(pos.shape[1] - 1)
        if conv.shape[1] != 3 or conv.shape[-2] != patch or grid * grid != pos.shape[1] - 1 or width % HEAD_DIM:
            raise CheckpointError(f"{source}: patch embedding {tuple(conv.shape)} / positional table "
                                  f"{tuple(pos.shape)} do not describe a DINOv2 ViT")
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
        return cls(width, depth, patch, grid, regs, "blocks.0.ls1.gamma" in sd)


@dataclass
class DinoFeatures:
    """What ``DinoVisionTransformer.forward_features`` returns (after the final LayerNorm unless said).

    patch_tokens (B, h*w, D) row-major; cls_token (B, D); register_tokens (B, R, D); prenorm (B, 1+R+n, D)
    the last block's output; blocks: requested block outputs (B, 1+R+n, D), un-normalised, keyed by
    0-based index; grid (h, w)."""

    patch_tokens: torch.Tensor
    cls_token: torch.Tensor
    register_tokens: torch.Tensor
    prenorm: torch.Tensor
    grid: tuple[int, int]
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int], offset: float, antialias: bool) -> torch.Tensor:
    """(1 + g*g, D) pretrained table -> (1 + h*w, D) for grid (h, w), as DINOv2's
    ``interpolate_pos_encoding``: unchanged for the pretrained grid; otherwise the g x g rows as an image,
    bicubic in float32, to the scale factors ((h + offset) / g, (w + offset) / g) when ``offset`` is set
    (the factors, not the sizes, place the samples) or straight to (h, w); CLS row kept."""
    g = math.isqrt(pos.shape[0] - 1)
    h, w = grid
    if (h, w) == (g, g):
        return pos
    rows = pos[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    size = {"scale_factor": ((h + offset) / g, (w + offset) / g)} if offset else {"size": (h, w)}
    rows = F.interpolate(rows, mode="bicubic", antialias=antialias, **size)
    if rows.shape[-2:] != (h, w):
        raise ValueError(f"positional table resized to {tuple(rows.shape[-2:])}, not the grid {grid}")
    return torch.cat([pos[:1].float(), rows.permute(0, 2, 3, 1).reshape(h * w, -1)]).to(pos.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)


class Attention(nn.Module):
    """Multi-head self-attention with DINOv2's parameter names (``qkv``, ``proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, MLP_RATIO * width)
        self.fc2 = nn.Linear(MLP_RATIO * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """x <- x + ls1(attn(norm1(x))); x <- x + ls2(mlp(norm2(x)))."""

    def __init__(self, width: int, heads: int, layer_scale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.ls1 = LayerScale(width) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width)
        self.ls2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2's ViT with the released files' state-dict keys (``mask_token`` is kept for them; masking
    is a training-time feature and never applied here)."""

    def __init__(self, arch: DinoArch):
        super().__init__()
        self.arch = arch
        D = arch.embed_dim
        self.patch_size = arch.patch_size
        self.patch_embed = PatchEmbed(D, arch.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.grid * arch.grid + 1, D))
        self.register_tokens = nn.Parameter(torch.zeros(1, arch.registers, D)) if arch.registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        self.blocks = nn.ModuleList(Block(D, arch.heads, arch.layer_scale) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1 + h*w, D) positional table for grid (h, w), cached per grid (the weights are frozen)."""
        key = (grid, self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._pos_cache:
            with torch.no_grad():
                self._pos_cache[key] = interpolate_pos_embed(self.pos_embed[0], grid, self.arch.offset,
                                                             self.arch.antialias)
        return self._pos_cache[key]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), sides multiples of the patch -> tokens (B, 1 + R + h*w, D): CLS, registers,
        patches; the positional table is added to CLS and patches, not to the registers."""
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the DINOv2 patch size {p}")
        x = self.patch_embed.proj(images.to(self.patch_embed.proj.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.to(x.dtype).expand(B, -1, -1), x], dim=1)
        x = x + self.pos_embed_for((H // p, W // p)).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.to(x.dtype).expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, images: torch.Tensor, block_outputs: Sequence[int] = ()) -> DinoFeatures:
        """images (B, 3, H, W) normalised with ImageNet statistics, sides multiples of the patch ->
        ``DinoFeatures``; ``block_outputs``: 0-based blocks whose raw outputs to keep."""
        p = self.patch_size
        x = self.embed(images)
        kept = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in block_outputs:
                kept[i] = x
        y = self.norm(x)
        r = self.arch.registers
        return DinoFeatures(patch_tokens=y[:, 1 + r:], cls_token=y[:, 0], register_tokens=y[:, 1:1 + r],
                            prenorm=x, grid=(images.shape[-2] // p, images.shape[-1] // p), blocks=kept)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised patch tokens (B, h*w, D)."""
        return self.forward_features(images).patch_tokens


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a released DINOv2 backbone file (a plain state dict, possibly under ``state_dict`` /
    ``model`` or with a ``module.`` prefix)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: DINOv2 checkpoint not found. Download dinov2_vits14_pretrain.pth (see README: "
                              "Weights) and pass DINO=/path/to/dinov2_vits14_pretrain.pth")
    try:
        sd = torch_load(path, "download it again")
    except UnreadableWeights as e:
        raise CheckpointError(str(e)) from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: does not hold a state_dict of tensors; not a DINOv2 checkpoint")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_dino(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
              ) -> DinoVisionTransformer:
    """A frozen, eval-mode DINOv2 from a backbone file; the architecture comes from the weights."""
    sd = read_state_dict(path)
    arch = DinoArch.from_state_dict(sd, str(path))
    model = DinoVisionTransformer(arch)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit a DINOv2 {arch.name} ({str(e)[:300]})") from None
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype)
