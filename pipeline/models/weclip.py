"""WeCLIP's segmentation decoder on a frozen CLIP ViT image encoder (WeCLIP's segformer_head.py).

The encoder runs blocks 1..L-1 (11 of ViT-B/16's 12, as the reference code) under ``no_grad``; the
decoder maps each block's patch tokens through its own MLP, fuses them with a 1x1 conv, refines
them with 3 pre-LN transformer blocks (no positional encoding) and predicts classes at 1/16
resolution. Only the decoder has trainable parameters (5,985,045 for ViT-B/16 and 21 classes).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.model import CLIP, ResidualAttentionBlock


def _init_clip_block(block: ResidualAttentionBlock) -> ResidualAttentionBlock:
    """PyTorch's defaults for a freshly built nn.MultiheadAttention block (as WeCLIP's decoder): in-projection
    xavier-uniform with zero bias, out-projection bias zero; Linear/LayerNorm layers keep theirs."""
    nn.init.xavier_uniform_(block.attn.in_proj_weight)
    nn.init.zeros_(block.attn.in_proj_bias)
    nn.init.zeros_(block.attn.out_proj.bias)
    return block


def padded_logits(patch_logits: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  patch: int) -> torch.Tensor:
    """images (B, 3, H, W), any size -> logits (B, C, H, W) float32: the images zero-padded bottom/right
    to whole ``patch``-pixel patches, ``patch_logits`` of them (B, C, Hp/p, Wp/p), bilinear upsampling
    to the padded size (align_corners=False, as the reference), the padding cropped off."""
    H, W = images.shape[-2:]
    Hp, Wp = math.ceil(H / patch) * patch, math.ceil(W / patch) * patch
    if (Hp, Wp) != (H, W):
        images = F.pad(images, (0, Wp - W, 0, Hp - H))
    logits = F.interpolate(patch_logits(images).float(), size=(Hp, Wp), mode="bilinear", align_corners=False)
    return logits[..., :H, :W]


class LayerMLP(nn.Module):
    """Token-wise Linear(in, width) -> ReLU -> Linear(width, width) for one encoder block's tokens."""

    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, in_dim) -> (B, n, width)."""
        return self.fc2(F.relu(self.fc1(x)))


class WeCLIPDecoder(nn.Module):
    """Per-block MLPs, 1x1 fusion conv, Dropout2d, transformer refinement, 1x1 classifier."""

    def __init__(self, in_dim: int = 768, num_blocks: int = 11, num_classes: int = 21, width: int = 256,
                 heads: int = 8, depth: int = 3, dropout: float = 0.1):
        super().__init__()
        self.mlps = nn.ModuleList(LayerMLP(in_dim, width) for _ in range(num_blocks))
        self.fuse = nn.Conv2d(num_blocks * width, width, kernel_size=1, bias=True)
        self.dropout = nn.Dropout2d(dropout)
        self.transformer = nn.ModuleList(_init_clip_block(ResidualAttentionBlock(width, heads)) for _ in range(depth))
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def fused(self, feats: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """feats: ``num_blocks`` patch-token maps (B, n, in_dim), n = h*w row-major; grid (h, w)
        -> fused features F_u (B, width, h, w) float32, after the dropout."""
        h, w = grid
        B = feats[0].shape[0]
        x = torch.cat([mlp(f.float()) for mlp, f in zip(self.mlps, feats)], dim=-1)   # (B, n, L*width)
        x = x.transpose(1, 2).reshape(B, -1, h, w)
        return self.dropout(self.fuse(x))

    def head(self, fused: torch.Tensor) -> torch.Tensor:
        """F_u (B, width, h, w) -> logits (B, C, h, w): transformer refinement, 1x1 classifier."""
        B, _, h, w = fused.shape
        t = fused.flatten(2).transpose(1, 2)                                          # (B, n, width)
        for blk in self.transformer:
            t = blk(t)[0]
        return self.classifier(t.transpose(1, 2).reshape(B, -1, h, w))

    def forward(self, feats: Sequence[torch.Tensor], grid: tuple[int, int], return_features: bool = False):
        """feats as ``fused`` -> logits (B, C, h, w) at patch resolution; with ``return_features`` also
        the fused map F_u (B, width, h, w) after dropout, before the transformer (WeCLIP's affinity is
        built on it)."""
        fused = self.fused(feats, grid)
        logits = self.head(fused)
        return (logits, fused) if return_features else logits


class WeCLIPSeg(nn.Module):
    """Frozen CLIP image encoder + trainable ``WeCLIPDecoder``; ``forward`` returns full-size logits.

    ``encoder_blocks``: how many leading CLIP blocks feed the decoder (reference: all but the last).
    """

    frozen_prefixes = ("encoder.",)  # not trained, not saved in training checkpoints

    def __init__(self, clip: CLIP, num_classes: int, encoder_blocks: int | None = None, width: int = 256,
                 heads: int = 8, depth: int = 3, dropout: float = 0.1):
        super().__init__()
        arch = clip.arch
        self.encoder_blocks = arch.vision_layers - 1 if encoder_blocks is None else int(encoder_blocks)
        if not 1 <= self.encoder_blocks <= arch.vision_layers:
            raise ValueError(f"encoder_blocks must be in 1..{arch.vision_layers}, got {self.encoder_blocks}")
        self.patch = arch.patch_size
        self.encoder = clip.visual.requires_grad_(False).eval()
        self.decoder = WeCLIPDecoder(arch.vision_width, self.encoder_blocks, num_classes, width, heads, depth, dropout)

    def train(self, mode: bool = True) -> "WeCLIPSeg":
        super().train(mode)
        self.encoder.eval()  # CLIP has no dropout/BN, but stay explicit: the encoder never trains
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W), multiples of the patch size -> ``encoder_blocks`` maps (B, n, D), CLS dropped."""
        idx = range(self.encoder_blocks)
        inter = self.encoder.forward_intermediates(images, n_blocks=self.encoder_blocks, block_outputs=tuple(idx))
        return [inter.blocks[i][:, 1:] for i in idx]

    def forward_patch_logits(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), multiples of the patch size -> logits (B, C, H/p, W/p)."""
        feats = self.encode(images)
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        return self.decoder(feats, grid)

    def forward(self, images: torch.Tensor, outputs: str = "logits", attention_blocks: Sequence[int] = ()):
        """images (B, 3, H, W) normalised, any size -> logits (B, C, H, W) float32.

        ``outputs='train'`` (crops whose sides are multiples of the patch size) returns a dict instead:
        logits (B, C, H, W), affinity sigmoid(F_uᵀF_u) (B, n, n) float32, grid (h, w), and
        intermediates, the frozen pass (``clip.Intermediates``: tokens entering the last block run,
        block outputs, head-averaged attention of ``attention_blocks``) for online label makers. Going
        through ``forward`` keeps DistributedDataParallel's gradient hooks in play.

        Sizes that are not multiples of the patch size are zero-padded bottom/right (the padding is
        cropped off again after the bilinear upsampling, align_corners=False as the reference)."""
        if outputs == "train":
            return self._train_outputs(images, attention_blocks)
        return padded_logits(self.forward_patch_logits, images, self.patch)

    def _train_outputs(self, images: torch.Tensor, attention_blocks: Sequence[int]) -> dict:
        from ..labels.affinity import decoder_affinity

        H, W = images.shape[-2:]
        if H % self.patch or W % self.patch:
            raise ValueError(f"training crops must be multiples of the patch size {self.patch}, got {H}x{W}")
        grid = (H // self.patch, W // self.patch)
        idx = tuple(range(self.encoder_blocks))
        with torch.no_grad():
            inter = self.encoder.forward_intermediates(images, n_blocks=self.encoder_blocks, block_outputs=idx,
                                                       attention="mean" if attention_blocks else None,
                                                       attention_blocks=tuple(attention_blocks))
        logits, fu = self.decoder([inter.blocks[i][:, 1:] for i in idx], grid, return_features=True)
        logits = F.interpolate(logits.float(), size=(H, W), mode="bilinear", align_corners=False)
        return {"logits": logits, "affinity": decoder_affinity(fu), "grid": grid, "intermediates": inter}

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        """Optimiser groups: only decoder parameters, all at lr x ``head_lr_mult`` (WeCLIP: 2e-4 x 10)."""
        return [{"params": [p for p in self.decoder.parameters() if p.requires_grad], "lr": lr * head_lr_mult,
                 "weight_decay": weight_decay, "name": "decoder"}]


def decoder_param_count(in_dim: int = 768, num_blocks: int = 11, num_classes: int = 21, width: int = 256,
                        depth: int = 3) -> int:
    """Closed form of the WeCLIP decoder's size: blocks x MLP + fusion + depth x transformer block + classifier."""
    mlp = in_dim * width + width + width * width + width
    fuse = num_blocks * width * width + width
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) \
        + (width * 4 * width + 4 * width) + (4 * width * width + width)
    return num_blocks * mlp + fuse + depth * block + width * num_classes + num_classes
