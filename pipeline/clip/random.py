"""Random CLIP ViTs in OpenAI's layout, written to disk the way OpenAI ships them.

No pretrained weights exist on the machines this project is tested on, so tests, the demo and
the benchmarks build random models of real (or tiny) shapes and load them through the real
checkpoint path of ``pipeline.clip.model``.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from .model import CLIP, CLIPArch
from ..io import atomic_open

VIT_B_16 = CLIPArch(embed_dim=512, vision_width=768, vision_layers=12, patch_size=16, grid=14,
                    context_length=77, vocab_size=49408, text_width=512, text_layers=12)
VIT_B_32 = CLIPArch(embed_dim=512, vision_width=768, vision_layers=12, patch_size=32, grid=7,
                    context_length=77, vocab_size=49408, text_width=512, text_layers=12)
VIT_L_14 = CLIPArch(embed_dim=768, vision_width=1024, vision_layers=24, patch_size=14, grid=16,
                    context_length=77, vocab_size=49408, text_width=768, text_layers=12)
# Small enough for CPU tests, yet 12 blocks so "last 8 attention maps" and "block 12" keep their meaning.
TINY = CLIPArch(embed_dim=32, vision_width=64, vision_layers=12, patch_size=16, grid=14,
                context_length=77, vocab_size=49408, text_width=64, text_layers=2)


def random_clip(arch: CLIPArch = TINY, seed: int = 0) -> CLIP:
    """A CLIP with OpenAI's initialisation scheme (normal, std scaled by width) and logit scale 100."""
    g = torch.Generator().manual_seed(seed)
    model = CLIP(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            elif "ln_" in name:  # LayerNorm gains near 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan = p.shape[-1] if p.ndim > 1 else p.shape[0]
                p.normal_(0.0, fan ** -0.5, generator=g)
    return model.requires_grad_(False).eval()


class _Archive(nn.Module):
    """Holds CLIP's modules under OpenAI's names so a traced archive has OpenAI's state_dict keys."""

    def __init__(self, model: CLIP):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        arch = model.arch
        self.register_buffer("input_resolution", torch.tensor(arch.patch_size * arch.grid))
        self.register_buffer("context_length", torch.tensor(arch.context_length))
        self.register_buffer("vocab_size", torch.tensor(arch.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * sum(p.sum() for p in self.parameters())


def save_clip(model: CLIP, path: str | Path, torchscript: bool = True, half: bool = True) -> Path:
    """Write ``model`` as OpenAI distributes CLIP (a TorchScript archive, fp16 weights) or as a plain
    state_dict file (``torchscript=False``). Written atomically."""
    path = Path(path)
    archive = _Archive(copy.deepcopy(model).float())
    with atomic_open(path, "wb") as f:
        if torchscript:
            with warnings.catch_warnings():  # torch.jit is deprecated, but it is OpenAI's format
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(archive, torch.ones(1), check_trace=False)
                torch.jit.save(traced.half() if half else traced, f)
        else:
            torch.save((archive.half() if half else archive).state_dict(), f)
    return path
