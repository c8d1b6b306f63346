"""Random DINOv2 ViTs of the released shapes, written to disk the way Meta ships them (a plain float32
state dict), so tests, the demo and the benchmarks load them through the real checkpoint path."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import atomic_open
from .model import DinoArch, DinoVisionTransformer

# The released backbones: 518-pixel training, so a 37 x 37 positional table (dinov2/hub/backbones.py).
VIT_S_14 = DinoArch(embed_dim=384, depth=12, patch_size=14, grid=37)
VIT_B_14 = DinoArch(embed_dim=768, depth=12, patch_size=14, grid=37)
VIT_L_14 = DinoArch(embed_dim=1024, depth=24, patch_size=14, grid=37)
VIT_S_14_REG = DinoArch(embed_dim=384, depth=12, patch_size=14, grid=37, registers=4)
VIT_B_14_REG = DinoArch(embed_dim=768, depth=12, patch_size=14, grid=37, registers=4)
VIT_L_14_REG = DinoArch(embed_dim=1024, depth=24, patch_size=14, grid=37, registers=4)
# Small enough for CPU tests: two heads, two blocks, the released table and patch.
TINY = DinoArch(embed_dim=128, depth=2, patch_size=14, grid=37)
TINY_REG = DinoArch(embed_dim=128, depth=2, patch_size=14, grid=37, registers=4)


def random_dino(arch: DinoArch = TINY, seed: int = 0) -> DinoVisionTransformer:
    """A frozen DINOv2 with random weights: matrices normal with std fan_in^-0.5 (patch embeddings of
    unit scale), biases 0.02, LayerNorm gains near 1, LayerScale near 0.1 (the trained models' order),
    CLS and register tokens at unit scale, and the positional table at 0.1: large enough for every
    detail of its resizing to show in the outputs, small enough that the features do not depend mostly
    on where a patch sits (a model trained on one grid would not carry over to another)."""
    g = torch.Generator().manual_seed(seed)
    model = DinoVisionTransformer(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                p.normal_(0.0, 0.1, generator=g)
            elif name in ("cls_token", "register_tokens", "mask_token"):
                p.normal_(0.0, 1.0, generator=g)
            elif name.endswith("gamma"):
                p.copy_(0.1 + 0.02 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
    return model.requires_grad_(False).eval()


def save_dino(model: DinoVisionTransformer, path: str | Path) -> Path:
    """Write ``model`` as Meta distributes DINOv2 backbones (``torch.save`` of the float32 state dict),
    atomically."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save({k: v.float().clone() for k, v in model.state_dict().items()}, f)
    return path
