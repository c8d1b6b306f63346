"""Text side: class strings x templates -> normalised text embeddings (as CLIP-ES), in one batch."""
from __future__ import annotations

from typing import Sequence

import torch

from ..classes import ClassList
from .model import CLIP, acc_dtype
from .tokenizer import tokenize


@torch.no_grad()
def encode_grid(model: CLIP, strings: Sequence[str], templates: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """Every ``template.format(s)`` embedded in one batched pass and L2-normalised -> (T, S, E),
    float32 (float64 for a float64 model)."""
    sentences = [t.format(s) for t in templates for s in strings]
    device = model.token_embedding.weight.device
    tokens = tokenize(sentences, model.arch.context_length)
    feats = torch.cat([model.encode_text(tokens[i:i + batch_size].to(device))
                       for i in range(0, len(sentences), batch_size)])
    feats = feats.to(acc_dtype(feats.dtype))
    return (feats / feats.norm(dim=-1, keepdim=True)).view(len(templates), len(strings), -1)


def encode_prompts(model: CLIP, class_strings: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Class embeddings (C, E): normalised per template, averaged over templates, normalised again
    (CLIP-ES's zeroshot_classifier, as open_clip's)."""
    feats = encode_grid(model, class_strings, templates).mean(dim=0)
    return feats / feats.norm(dim=-1, keepdim=True)


FUSIONS = ("sentence", "feature", "cam")


@torch.no_grad()
def text_variants(model: CLIP, classes: ClassList, template: str | None = None, fusion: str = "sentence",
                  synonyms: bool = True, background: bool = True) -> torch.Tensor:
    """Text rows [C foreground classes, M background words] for the CAM softmax, (S, C + M, E).

    fusion (the CLIP-ES paper's synonym-fusion ablations): 'sentence' embeds each class's prompt
    string as one sentence (the reference; S = 1); 'feature' averages the normalised embeddings of its
    comma-separated synonyms (S = 1); 'cam' gives one variant per synonym position (S = most synonyms
    of a class; a class with fewer repeats its last), whose CAMs the caller averages.
    synonyms=False uses the bare class names; background=False drops the background rows (M = 0).
    """
    if fusion not in FUSIONS:
        raise ValueError(f"unknown synonym fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    template = template or classes.template
    bg = list(classes.background) if background else []
    bg_rows = encode_prompts(model, bg, [template]) if bg else None
    if not synonyms or fusion == "sentence":
        strings = classes.names if not synonyms else classes.prompts
        variants = [encode_prompts(model, list(strings), [template])]
    else:
        groups = [classes.synonyms(c) or [classes.names[c]] for c in range(classes.num_classes)]
        flat = encode_prompts(model, [s for g in groups for s in g], [template])
        rows = list(flat.split([len(g) for g in groups]))
        if fusion == "feature":
            fused = torch.stack([r.mean(dim=0) for r in rows])
            variants = [fused / fused.norm(dim=-1, keepdim=True)]
        else:
            depth = max(len(g) for g in groups)
            variants = [torch.stack([r[min(s, len(r) - 1)] for r in rows]) for s in range(depth)]
    if bg_rows is not None:
        variants = [torch.cat([v, bg_rows]) for v in variants]
    return torch.stack(variants)
