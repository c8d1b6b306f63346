"""CLIP-ES CAMs (its generate_cams_voc12.py): Softmax-GradCAM over present labels + background set refined
by CAA, for every class of every image of a batch in one forward and one backward.

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

from ..labels.affinity import box_masks, mean_attention, minmax, refine, transition_matrix
from ..classes import ClassList
from ..clip.model import CLIP, Intermediates, acc_dtype, attention_weights
from ..clip.text import text_variants


@dataclass(frozen=True)
class CAMConfig:
    """Settings of GradCAM, CAA and prompts; the defaults are CLIP-ES's.

    exact: reproduce quirks of CLIP-ES's code: fp16 host arithmetic of GradCAM when
        the model runs in fp16, block 12 run twice for an image of exactly 76 patches, and box masks
        that never include the grid's last row and column (``affinity.box_masks``).
    Ablations (CLIP-ES Tables 2, 6, 8): ``softmax`` False differentiates the raw logit instead of the
    post-softmax score; ``softmax_set`` 'present' is the image's labels + background set, 'all' every
    foreground class (+ background set); ``background`` False drops the background set;
    ``synonyms`` False prompts with bare class names; ``fusion`` 'sentence' | 'feature' | 'cam'
    (see ``text.text_variants``); ``affinity`` 'caa' (default), 'mhsa' (mean attention of the last
    blocks used as is, no Sinkhorn or boxes) or 'none' (GradCAM maps as they are).
    template: prompt template (None: the class list's).
    """

    box_threshold: float = 0.4
    attention_layers: int = 8
    sinkhorn_rounds: int = 3
    power: int = 2
    exact: bool = True
    template: str | None = None
    softmax: bool = True
    softmax_set: str = "present"
    background: bool = True
    synonyms: bool = True
    fusion: str = "sentence"
    affinity: str = "caa"

    def __post_init__(self) -> None:
        if self.softmax_set not in ("present", "all"):
            raise ValueError(f"softmax_set must be 'present' or 'all', got {self.softmax_set!r}")
        if self.affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {', '.join(AFFINITIES)}, got {self.affinity!r}")


AFFINITIES = ("caa", "mhsa", "none")


@dataclass
class CAMResult:
    """One image's maps at patch resolution: ``cams`` CAA-refined and ``init`` GradCAM, (K, h, w)."""

    cams: np.ndarray
    init: np.ndarray


def numpy_pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the first axis of float32 ``x`` (N, ...) in exactly numpy's pairwise order: blocks of
    at most 128 summed with 8 interleaved accumulators, larger ranges split in halves (multiple of 8).
    Equal halves are summed side by side (same order, one set of operations for both)."""
    n = x.shape[0]
    if n < 8:
        out = torch.zeros_like(x[0])
        for row in x.unbind(0):
            out = out + row
        return out
    if n <= 128:
        full = n - n % 8
        blocks = x[:full].unflatten(0, (full // 8, 8)).unbind(0)
        acc = blocks[0]
        for block in blocks[1:]:
            acc = acc + block
        while acc.shape[0] > 1:                     # ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
            acc = acc[0::2] + acc[1::2]
        out = acc[0]
        for row in x[full:].unbind(0):
            out = out + row
        return out
    half = n // 2
    half -= half % 8
    if 2 * half == n:
        both = numpy_pairwise_sum(x.unflatten(0, (2, half)).transpose(0, 1))     # (2, ...)
        return both[0] + both[1]
    return numpy_pairwise_sum(x[:half]) + numpy_pairwise_sum(x[half:])


def gradcam(acts: torch.Tensor, grads: torch.Tensor, grid: tuple[int, int], exact: bool = True) -> torch.Tensor:
    """GradCAM maps from hooked tokens and per-class gradients (CLIP-ES's pytorch_grad_cam), for one image or a batch.

    acts (..., n, D), grads (K, ..., n, D), patch tokens row-major on ``grid`` = (h, w)
    -> (K, ..., h, w) float32:
    α = spatial mean of the gradient, ReLU(Σ_c α_c A_c), min-max normalised twice (the reference's
    per-layer scaling followed by its one-layer aggregation).

    With ``exact`` and fp16 inputs the numpy host arithmetic of CLIP-ES's pytorch_grad_cam/base_cam.py
    is emulated bit for bit. Its arrays keep the channel axis innermost in memory, so numpy computes
    α as a sequential float32 sum over tokens divided in float32 and rounded to fp16, the products
    in fp16, and the channel sum as a float32 pairwise sum rounded once to fp16 (checked against
    numpy in the tests; a sequential fp16 channel sum would need a channel-outer layout).
    """
    if exact and acts.dtype == torch.float16:
        tokens = grads.float().unbind(-2)
        total = torch.zeros_like(tokens[0])
        for t in tokens:                 # sequential: float32 rounding at every step, as numpy's loop
            total = total + t
        alpha = (total / len(tokens)).half()                                   # (K, ..., D)
        prod = (alpha.unsqueeze(-2) * acts[None]).float()                      # fp16 products (K, ..., n, D)
        cam = numpy_pairwise_sum(prod.movedim(-1, 0)).half().float()           # (K, ..., n)
    else:
        dt = acc_dtype(acts.dtype)
        alpha = grads.to(dt).mean(dim=-2)
        cam = (acts.to(dt)[None] @ alpha.unsqueeze(-1)).squeeze(-1)
    cam = cam.clamp_min(0).unflatten(-1, grid)
    return minmax(minmax(cam))


def label_slots(labels: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image label lists -> their padded batch form on ``device`` in one host-to-device copy:
    classes (B, K) int64 (0 in unused slots) and valid (B, K) bool, K = most labels of an image."""
    k = max(len(lab) for lab in labels)
    host = torch.tensor([list(lab) + [-1] * (k - len(lab)) for lab in labels], dtype=torch.long, device="cpu")
    # from pinned memory the copy is queued like a kernel; a pageable one makes the host wait for the GPU
    padded = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    valid = padded >= 0
    return padded.clamp_min(0), valid


def class_scores(logits: torch.Tensor, labels: Sequence[Sequence[int]], num_classes: int, softmax: bool = True,
                 all_classes: bool = False) -> torch.Tensor:
    """Scores of each image's present classes, the GradCAM targets (the CLIP-ES paper, Eq. 3-4).

    logits (B, C + M) against [C foreground rows, M background rows]. The softmax runs over the
    image's K_b present classes (label order) plus the M background rows, or over every row when
    ``all_classes``; ``softmax=False`` returns the raw logits. Returns (B, Kmax), zero where image b
    has fewer than Kmax labels.
    """
    B, total = logits.shape
    fg, valid = label_slots(labels, logits.device)
    if all_classes or not softmax:
        probs = logits.softmax(dim=-1) if softmax else logits
        return probs.gather(1, fg).masked_fill(~valid, 0)
    bg = torch.arange(num_classes, total, device=logits.device).expand(B, -1)
    chosen = torch.cat([logits.gather(1, fg).masked_fill(~valid, float("-inf")), logits.gather(1, bg)], dim=1)
    return chosen.softmax(dim=-1)[:, :fg.shape[1]]


class CAMEngine:
    """Frozen CLIP + a vocabulary's text embeddings -> CAMs for batches of same-size images."""

    def __init__(self, model: CLIP, classes: ClassList, config: CAMConfig | None = None):
        self.model = model
        self.classes = classes
        self.config = cfg = config or CAMConfig(box_threshold=classes.box_threshold)
        # (S, C + M, E): S = 1 except for CAM-level synonym fusion
        self.text = text_variants(model, classes, cfg.template, cfg.fusion, cfg.synonyms, cfg.background)
        self.logit_scale = float(model.logit_scale.exp())

    def encode(self, images: torch.Tensor, extra_attention: int = 0) -> Intermediates:
        """The frozen no-grad pass ``initial_cams`` starts from: blocks 1..L-1 (all L for the reference's
        76-patch quirk) with the head-averaged attention of the blocks CAA uses, plus ``extra_attention``
        earlier blocks (callers that want more maps, e.g. WeCLIP's layer filter)."""
        visual = self.model.visual
        p = visual.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        n_blocks = len(visual.blocks)
        # CLIP-ES's clip/model.py runs every block iff there are 77 tokens (a test meant for text).
        first = n_blocks if self.config.exact and grid[0] * grid[1] + 1 == self.model.arch.context_length else n_blocks - 1
        keep = self.config.attention_layers - 1 + extra_attention  # the last block's map comes from initial_cams
        with torch.no_grad():
            return visual.forward_intermediates(images, n_blocks=first, attention="mean",
                                                attention_blocks=range(max(first - keep, 0), first))

    def text_on(self, device: torch.device) -> torch.Tensor:
        """The text embeddings (S, C + M, E) on ``device``, moved once when the model has moved since."""
        if self.text.device != device:
            self.text = self.text.to(device)
        return self.text

    def initial_maps(self, inter: Intermediates, labels: Sequence[Sequence[int]], grid: tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax-GradCAM of every label of every image from a finished frozen pass.

        inter: ``forward_intermediates`` output whose ``tokens`` enter the last block (from ``encode``,
        or from a model that already ran blocks 1..L-1 for its own use); grid (h, w) patches.
        Returns (maps (B, K, h, w) float in label order, K = most labels of an image, zero in unused
        slots (their score is a constant 0); the last block's head-averaged attention (B, 1+n, 1+n)
        computed without grad). One backward covers all images and classes.
        """
        if any(len(lab) == 0 for lab in labels):
            raise ValueError("every image needs at least one label")
        visual = self.model.visual
        cfg = self.config
        last = visual.blocks[-1]
        variants = len(self.text)
        maps = None
        with torch.enable_grad():
            h = last.ln_1(inter.tokens).detach().requires_grad_(True)
            # the fused kernel differentiates faster; block 12's map for CAA is recomputed without grad
            x, _, (q, k, _) = last(inter.tokens, ln1_out=h, return_qkv=True)
            emb = visual.pool(x, "patch_mean")
            emb = emb.to(acc_dtype(emb.dtype))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            texts = self.text_on(emb.device).to(emb.dtype)
            for v in range(variants):
                scores = class_scores(self.logit_scale * emb @ texts[v].t(), labels, self.classes.num_classes,
                                      cfg.softmax, cfg.softmax_set == "all")
                kmax = scores.shape[1]
                onehot = torch.eye(kmax, dtype=scores.dtype, device=scores.device)[:, None, :].expand(kmax, len(labels), kmax)
                # every class of every image in one backward: one batched gradient output per class slot
                (grads,) = torch.autograd.grad(scores, h, grad_outputs=onehot, is_grads_batched=True,
                                               retain_graph=v + 1 < variants)
                m = gradcam(h.detach()[:, 1:], grads[:, :, 1:], grid, cfg.exact)       # (K, B, h, w)
                maps = m if maps is None else maps + m
        if variants > 1:  # CAM-level synonym fusion: mean of the per-synonym maps
            maps = minmax(maps / variants)
        with torch.no_grad():
            attn_last = attention_weights(q.detach(), k.detach()).mean(dim=1)
        return maps.transpose(0, 1), attn_last

    def __call__(self, images: torch.Tensor, labels: Sequence[Sequence[int]]) -> list[CAMResult]:
        """images (B, 3, H', W') normalised, H', W' multiples of the patch size; labels[b] the 0-based
        foreground ids of image b (non-empty, label order). Returns one ``CAMResult`` per image."""
        if any(len(lab) == 0 for lab in labels):
            raise ValueError("every image needs at least one label")
        cfg = self.config
        p = self.model.visual.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        inter = self.encode(images)
        init, attn_last = self.initial_maps(inter, labels, grid)                       # (B, K, h, w)
        attns = [inter.attentions[i] for i in sorted(inter.attentions)] + [attn_last]
        attn = mean_attention(attns, cfg.attention_layers)
        trans = transition_matrix(attn, cfg.sinkhorn_rounds, cfg.power) if cfg.affinity == "caa" else attn
        if cfg.affinity == "none":
            cams = init
        else:
            masks = torch.ones_like(init) if cfg.affinity == "mhsa" else box_masks(init, cfg.box_threshold, cfg.exact)
            cams = refine(trans, init, masks)
        return batch_results(cams, init, labels)


def batch_results(cams: torch.Tensor, init: torch.Tensor, labels: Sequence[Sequence[int]]) -> list[CAMResult]:
    """Refined and initial maps (B, K, h, w) -> one ``CAMResult`` per image (its K_b labels), read back
    to the host in one transfer."""
    both = torch.stack([cams, init]).cpu().numpy()
    return [CAMResult(cams=both[0, b, : len(lab)], init=both[1, b, : len(lab)]) for b, lab in enumerate(labels)]
