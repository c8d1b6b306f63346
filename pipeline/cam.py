"""CLIP-ES CAMs: Softmax-GradCAM over present labels + background set (SPEC 1.5, 2) refined by
CAA (SPEC 4), for every class of every image of a batch in one forward and one backward.

Usage (encode the vocabulary once, then ask for many images)::

    engine = CAMEngine(model, classes)
    results = engine(images, [[14, 8], [2]])     # images (B, 3, H', W') of one size
    results[0].cams                              # (K, h, w) float32, CAA-refined
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .affinity import box_masks, mean_attention, minmax, refine, transition_matrix
from .classes import ClassList
from .clip import CLIP, acc_dtype
from .text import encode_prompts


@dataclass(frozen=True)
class CAMConfig:
    """Algorithm constants (SPEC 2, 4). ``exact`` reproduces the reference's quirks (SPEC 10.4-10.5):
    fp16 host arithmetic of GradCAM when the model runs in fp16, and block 12 run twice for an
    image of exactly 76 patches. ``exact=False`` fixes both."""

    box_threshold: float = 0.4
    attention_layers: int = 8
    sinkhorn_rounds: int = 3
    power: int = 2
    exact: bool = True


@dataclass
class CAMResult:
    """One image's maps at patch resolution: ``cams`` CAA-refined and ``init`` GradCAM, (K, h, w)."""

    cams: np.ndarray
    init: np.ndarray


def numpy_pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the first axis of float32 ``x`` (N, ...) in exactly numpy's pairwise order: blocks of
    at most 128 summed with 8 interleaved accumulators, larger ranges split in halves (multiple of 8)."""
    n = x.shape[0]
    if n < 8:
        out = torch.zeros_like(x[0])
        for i in range(n):
            out = out + x[i]
        return out
    if n <= 128:
        full = n - n % 8
        r = x[:full].reshape(full // 8, 8, *x.shape[1:])
        acc = r[0]
        for i in range(1, r.shape[0]):
            acc = acc + r[i]
        out = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
        for i in range(full, n):
            out = out + x[i]
        return out
    half = n // 2
    half -= half % 8
    return numpy_pairwise_sum(x[:half]) + numpy_pairwise_sum(x[half:])


def gradcam(acts: torch.Tensor, grads: torch.Tensor, grid: tuple[int, int], exact: bool = True) -> torch.Tensor:
    """GradCAM maps from one image's hooked tokens and per-class gradients (SPEC 2.3-2.8).

    acts (n, D), grads (K, n, D), patch tokens row-major on ``grid`` = (h, w) -> (K, h, w) float32:
    α = spatial mean of the gradient, ReLU(Σ_c α_c A_c), min-max normalised twice (the reference's
    per-layer scaling followed by its one-layer aggregation).

    With ``exact`` and fp16 inputs the reference's numpy host arithmetic is emulated bit for bit
    (SPEC 2.4-2.5, 10.5). Its arrays keep the channel axis innermost in memory, so numpy computes
    α as a sequential float32 sum over tokens divided in float32 and rounded to fp16, the products
    in fp16, and the channel sum as a float32 pairwise sum rounded once to fp16 (checked against
    numpy in the tests; SPEC 2.5's "sequential fp16" holds only for a channel-outer layout).
    """
    K = grads.shape[0]
    if exact and acts.dtype == torch.float16:
        g = grads.float()
        total = torch.zeros_like(g[:, 0])
        for t in range(g.shape[1]):
            total = total + g[:, t]
        alpha = (total / g.shape[1]).half()                                   # (K, D)
        prod = (alpha[:, None, :] * acts[None]).float()                       # fp16 products (K, n, D)
        cam = numpy_pairwise_sum(prod.permute(2, 0, 1)).half().float()        # (K, n)
    else:
        dt = acc_dtype(acts.dtype)
        alpha = grads.to(dt).mean(dim=1)
        cam = torch.einsum("kd,nd->kn", alpha, acts.to(dt))
    cam = cam.clamp_min(0).view(K, *grid)
    return minmax(minmax(cam))


def softmax_targets(logits: torch.Tensor, labels: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """Post-softmax scores of each image's present classes (SPEC 1.5, 2.1).

    logits (B, C + M) against [C foreground rows, M background rows]; for image b the softmax runs
    over its K_b present classes (in label order) plus all M background rows. Returns (B, Kmax),
    zero where b has fewer than Kmax labels.
    """
    B, total = logits.shape
    kmax = max(len(lab) for lab in labels)
    fg = torch.zeros(B, kmax, dtype=torch.long, device=logits.device)
    valid = torch.zeros(B, kmax, dtype=torch.bool, device=logits.device)
    for b, lab in enumerate(labels):
        fg[b, : len(lab)] = torch.as_tensor(list(lab), device=logits.device)
        valid[b, : len(lab)] = True
    bg = torch.arange(num_classes, total, device=logits.device).expand(B, -1)
    chosen = torch.cat([logits.gather(1, fg).masked_fill(~valid, float("-inf")), logits.gather(1, bg)], dim=1)
    return chosen.softmax(dim=-1)[:, :kmax]


class CAMEngine:
    """Frozen CLIP + a vocabulary's text embeddings -> CAMs for batches of same-size images."""

    def __init__(self, model: CLIP, classes: ClassList, config: CAMConfig | None = None):
        self.model = model
        self.classes = classes
        self.config = config or CAMConfig(box_threshold=classes.box_threshold)
        prompts = list(classes.prompts) + list(classes.background)
        self.text = encode_prompts(model, prompts, [classes.template])   # (C + M, E) float32
        self.logit_scale = float(model.logit_scale.exp())

    def __call__(self, images: torch.Tensor, labels: Sequence[Sequence[int]]) -> list[CAMResult]:
        """images (B, 3, H', W') normalised, H', W' multiples of the patch size; labels[b] the 0-based
        foreground ids of image b (non-empty, label order). Returns one ``CAMResult`` per image."""
        if any(len(lab) == 0 for lab in labels):
            raise ValueError("every image needs at least one label")
        visual = self.model.visual
        cfg = self.config
        p = visual.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        n_blocks = len(visual.blocks)
        # SPEC 10.4: the reference's "run every block iff there are 77 tokens" test, meant for text.
        first = n_blocks if cfg.exact and grid[0] * grid[1] + 1 == self.model.arch.context_length else n_blocks - 1
        keep = cfg.attention_layers - 1  # the last block's map is added below
        with torch.no_grad():
            inter = visual.forward_intermediates(images, n_blocks=first, attention="mean",
                                                 attention_blocks=range(first - keep, first))
        last = visual.blocks[-1]
        with torch.enable_grad():
            h = last.ln_1(inter.tokens).detach().requires_grad_(True)
            x, attn_last, _ = last(inter.tokens, weights="mean", ln1_out=h)
            emb = visual.pool(x, "patch_mean")
            emb = emb.to(acc_dtype(emb.dtype))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            text = self.text.to(emb.device, emb.dtype)
            scores = softmax_targets(self.logit_scale * emb @ text.t(), labels, self.classes.num_classes)
            kmax = scores.shape[1]
            onehot = torch.eye(kmax, dtype=scores.dtype, device=scores.device)[:, None, :].expand(kmax, len(labels), kmax)
            (grads,) = torch.autograd.grad(scores, h, grad_outputs=onehot, is_grads_batched=True)
        acts = h.detach()[:, 1:]                 # (B, n, D)
        grads = grads[:, :, 1:]                  # (Kmax, B, n, D)
        attns = [inter.attentions[i] for i in sorted(inter.attentions)] + [attn_last.detach()]
        trans = transition_matrix(mean_attention(attns, cfg.attention_layers), cfg.sinkhorn_rounds, cfg.power)
        results = []
        for b, lab in enumerate(labels):
            init = gradcam(acts[b], grads[: len(lab), b], grid, cfg.exact)
            init_np = init.cpu().numpy()
            masks = torch.from_numpy(box_masks(init_np, cfg.box_threshold)).to(trans.device)
            cams = refine(trans[b], init, masks)
            results.append(CAMResult(cams=cams.cpu().numpy(), init=init_np))
        return results
