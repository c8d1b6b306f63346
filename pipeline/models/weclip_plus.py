"""WeCLIP+'s segmentation model (Zhang et al., "Frozen CLIP-DINO: a strong backbone for weakly supervised
semantic segmentation", TPAMI 2025; the ``WeCLIP+`` folder of zbf1991/WeCLIP, model_attn_aff_voc.py).

Two frozen backbones side by side. CLIP runs blocks 1..L-1 without grad (as WeCLIP) and block L-1's
patch tokens go through the CLIP fusion head; DINOv2 sees the image resized (bilinear) to whole 14-pixel
patches and its final normalised patch tokens go through the DINO fusion head, whose map is resized
(bilinear) to the CLIP grid. A fusion head is WeCLIP's fusion with one input (token-wise MLP
D -> 256 -> 256, 1x1 conv, Dropout2d 0.1). One decoder shared by both branches (3 pre-LN transformer
blocks of width 256 with 8 heads, 1x1 classifier) predicts from each map; the prediction is the mean of
the two branches' logits.

``branches``: 'both' (the method), 'clip' or 'dino' (one branch only, the ablations of WeCLIP+'s
backbone study; CLIP is still needed for the CAMs). Trainable parameters for ViT-B/16 + ViT-S/14 and
21 classes: 328,448 (CLIP head) + 230,144 (DINO head) + 2,374,677 (decoder) = 2,933,269.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import CLIP, ResidualAttentionBlock
from ..dino.model import DinoVisionTransformer
from .weclip import LayerMLP, _init_clip_block, padded_logits

BRANCHES = ("both", "clip", "dino")


class FusionHead(nn.Module):
    """One backbone's tokens -> a fused map: token-wise MLP, 1x1 conv, Dropout2d."""

    def __init__(self, in_dim: int, width: int = 256, dropout: float = 0.1):
        super().__init__()
        self.mlp = LayerMLP(in_dim, width)
        self.fuse = nn.Conv2d(width, width, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens (B, h*w, D) row-major, grid (h, w) -> (B, width, h, w) float32."""
        B = tokens.shape[0]
        x = self.mlp(tokens.float()).transpose(1, 2).reshape(B, -1, *grid)
        return self.dropout(self.fuse(x))


class SharedDecoder(nn.Module):
    """Transformer refinement (no positional encoding) and a 1x1 classifier, applied to each branch."""

    def __init__(self, width: int = 256, heads: int = 8, depth: int = 3, num_classes: int = 21):
        super().__init__()
        self.transformer = nn.ModuleList(_init_clip_block(ResidualAttentionBlock(width, heads)) for _ in range(depth))
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, width, h, w) -> logits (B, C, h, w)."""
        B, _, h, w = fused.shape
        t = fused.flatten(2).transpose(1, 2)
        for blk in self.transformer:
            t = blk(t)[0]
        return self.classifier(t.transpose(1, 2).reshape(B, -1, h, w))


class WeCLIPPlusSeg(nn.Module):
    """Frozen CLIP image encoder + frozen DINOv2 + trainable fusion heads and shared decoder."""

    frozen_prefixes = ("encoder.", "dino.")  # not trained, not saved in training checkpoints

    def __init__(self, clip: CLIP, dino: DinoVisionTransformer | None, num_classes: int, branches: str = "both",
                 width: int = 256, heads: int = 8, depth: int = 3, dropout: float = 0.1):
        super().__init__()
        if branches not in BRANCHES:
            raise ValueError(f"model.branches must be one of {', '.join(BRANCHES)}, got {branches!r}")
        if branches != "clip" and dino is None:
            raise ValueError(f"model.branches={branches} needs a DINOv2 backbone")
        self.branches = branches
        self.patch = clip.arch.patch_size
        self.encoder_blocks = clip.arch.vision_layers - 1
        self.encoder = clip.visual.requires_grad_(False).eval()
        self.dino = dino.requires_grad_(False).eval() if branches != "clip" else None
        self.clip_head = FusionHead(clip.arch.vision_width, width, dropout) if branches != "dino" else None
        self.dino_head = FusionHead(dino.embed_dim, width, dropout) if branches != "clip" else None
        self.decoder = SharedDecoder(width, heads, depth, num_classes)

    def train(self, mode: bool = True) -> "WeCLIPPlusSeg":
        super().train(mode)
        self.encoder.eval()   # neither backbone has dropout or BatchNorm, but stay explicit: they never train
        if self.dino is not None:
            self.dino.eval()
        return self

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch, images.shape[-1] // self.patch

    @torch.no_grad()
    def encode_clip(self, images: torch.Tensor, attention_blocks: Sequence[int] = ()):
        """images (B, 3, H, W), multiples of the CLIP patch -> the frozen pass through blocks 1..L-1
        (``clip.Intermediates``) with every block's output and the head-averaged attention of
        ``attention_blocks``."""
        return self.encoder.forward_intermediates(images, n_blocks=self.encoder_blocks,
                                                  block_outputs=tuple(range(self.encoder_blocks)),
                                                  attention="mean" if attention_blocks else None,
                                                  attention_blocks=tuple(attention_blocks))

    @torch.no_grad()
    def encode_dino(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images (B, 3, H, W) -> DINOv2's normalised patch tokens (B, n, D) of the images resized to
        (H // 14 * 14, W // 14 * 14) (bilinear, align_corners=False, as the reference), and their grid."""
        p = self.dino.patch_size
        size = (images.shape[-2] // p * p, images.shape[-1] // p * p)
        resized = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        out = self.dino.forward_features(resized)
        return out.patch_tokens, out.grid

    def fused_maps(self, images: torch.Tensor, inter=None) -> list[torch.Tensor]:
        """images (B, 3, H, W), multiples of the CLIP patch -> the active branches' fused maps, each
        (B, width, h, w) on the CLIP grid, CLIP's first; ``inter``: a CLIP pass already run (``encode_clip``)."""
        grid = self.grid(images)
        maps = []
        if self.clip_head is not None:
            inter = self.encode_clip(images) if inter is None else inter
            maps.append(self.clip_head(inter.blocks[self.encoder_blocks - 1][:, 1:], grid))
        if self.dino_head is not None:
            tokens, dgrid = self.encode_dino(images)
            fd = self.dino_head(tokens, dgrid)
            maps.append(F.interpolate(fd, size=grid, mode="bilinear", align_corners=False))
        return maps

    def branch_logits(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Fused maps -> each branch's logits (B, C, h, w) from the shared decoder (one batched pass)."""
        return list(self.decoder(torch.cat(list(maps))).chunk(len(maps)))

    def forward_patch_logits(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), multiples of the CLIP patch -> mean of the branches' logits (B, C, H/p, W/p)."""
        return torch.stack(self.branch_logits(self.fused_maps(images))).mean(dim=0)

    def forward(self, images: torch.Tensor, outputs: str = "logits", attention_blocks: Sequence[int] = ()):
        """images (B, 3, H, W) normalised (ImageNet statistics), any size -> logits (B, C, H, W) float32.

        Sizes that are not multiples of the CLIP patch are zero-padded bottom/right and cropped back after
        the bilinear upsampling (``padded_logits``, as WeCLIP's model). ``outputs='train'`` returns
        ``_train_outputs``."""
        if outputs == "train":
            return self._train_outputs(images, attention_blocks)
        return padded_logits(self.forward_patch_logits, images, self.patch)

    def _train_outputs(self, images: torch.Tensor, attention_blocks: Sequence[int]) -> dict[str, Any]:
        """Crops whose sides are multiples of the CLIP patch -> {logits (B, C, H, W) the branches' mean,
        branch_logits [(B, C, H, W)] CLIP's first, patch_logits (B, C, h, w), affinity sigmoid(FᵀF)
        (B, n, n) of the branches' fused maps concatenated along channels, grid (h, w), intermediates
        (the CLIP pass, block outputs of blocks 1..L-1 and attention of ``attention_blocks``)}."""
        from ..labels.affinity import decoder_affinity

        H, W = images.shape[-2:]
        if H % self.patch or W % self.patch:
            raise ValueError(f"training crops must be multiples of the patch size {self.patch}, got {H}x{W}")
        inter = self.encode_clip(images, attention_blocks)
        maps = self.fused_maps(images, inter)
        patch = self.branch_logits(maps)
        up = [F.interpolate(b.float(), size=(H, W), mode="bilinear", align_corners=False) for b in patch]
        return {"logits": torch.stack(up).mean(dim=0), "branch_logits": up,
                "patch_logits": torch.stack(patch).mean(dim=0), "affinity": decoder_affinity(torch.cat(maps, dim=1)),
                "grid": self.grid(images), "intermediates": inter}

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        """One group: fusion heads and decoder at lr x ``head_lr_mult`` (WeCLIP+: 2e-5 x 10)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr * head_lr_mult,
                 "weight_decay": weight_decay, "name": "decoder"}]


def build(cfg: Mapping[str, Any], num_classes: int, clip: CLIP, dino: DinoVisionTransformer | None = None
          ) -> WeCLIPPlusSeg:
    """``WeCLIPPlusSeg`` from the ``model:`` section; the DINOv2 backbone comes from ``model.dino`` (a
    released file) unless given, and is not needed for ``branches: clip``."""
    branches = cfg.get("branches", "both")
    if dino is None and branches != "clip":
        if not cfg.get("dino"):
            raise ValueError("model.dino: path to the DINOv2 backbone (dinov2_vits14_pretrain.pth) is required for "
                             "weclip-plus (make train DINO=...)")
        from ..dino.model import load_dino

        dino = load_dino(cfg["dino"], "cpu", torch.float32)
    return WeCLIPPlusSeg(clip, dino, num_classes, branches, int(cfg.get("width", 256)), int(cfg.get("heads", 8)),
                         int(cfg.get("depth", 3)), float(cfg.get("dropout", 0.1)))
