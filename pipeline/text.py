"""Text side: class strings x templates -> normalised text embeddings (SPEC 1.6), in one batch."""
from __future__ import annotations

from typing import Sequence

import torch

from .clip import CLIP, acc_dtype
from .tokenizer import tokenize


@torch.no_grad()
def encode_prompts(model: CLIP, class_strings: Sequence[str], templates: Sequence[str],
                   batch_size: int = 512) -> torch.Tensor:
    """Embeddings (C, E), float32 (float64 for a float64 model): every ``template.format(s)`` embedded in batches, L2-normalised per
    template, averaged over templates, normalised again (open_clip's zero-shot classifier)."""
    sentences = [t.format(s) for s in class_strings for t in templates]
    device = model.token_embedding.weight.device
    tokens = tokenize(sentences, model.arch.context_length)
    feats = torch.cat([model.encode_text(tokens[i:i + batch_size].to(device))
                       for i in range(0, len(sentences), batch_size)])
    feats = feats.to(acc_dtype(feats.dtype))
    feats = feats / feats.norm(dim=-1, keepdim=True)
    feats = feats.view(len(class_strings), len(templates), -1).mean(dim=1)
    return feats / feats.norm(dim=-1, keepdim=True)
