"""WeCLIP+'s online labels and its extra losses (Zhang et al., TPAMI 2025; the ``WeCLIP+`` folder of
zbf1991/WeCLIP: WeCLIP_Plus/model_attn_aff_{voc,coco}.py, clip/clip_tool.py, scripts/dist_clip_{voc,coco}.py).

Labels, per crop and the same recipe from the first iteration on (no phase switch):
1. Softmax-GradCAM of the crop's classes, CLIP's last block run again on the output of block
   ``cam_input_block`` (the reference: block 10 on VOC, skipping block 11; block 11 on COCO and in WeCLIP);
2. RFM with the layer filter from the start: the last ``filter_layers`` head-averaged attention maps
   (6 VOC, 8 COCO; the last one from GradCAM's rerun) filtered against the model's affinity
   A = sigmoid(FᵀF) of the CLIP and DINO fused maps concatenated, their mean times A (detached); then
   Sinkhorn / symmetrise / square;
3. each CAM times the detached softmax of the branches' mean logits for its class (``seg_weighting``);
4. propagation with no box masks (VOC) or CLIP-ES box masks of the unweighted CAMs (``box_masks``,
   COCO, threshold 0.7), min-max, then background 1 - max, PAR and argmax as WeCLIP's labels.
From iteration ``replace_from`` on (the reference's ``n_iter > 18000`` on VOC, ``> 40000`` on COCO) the
pixels where the segmentation's softmax exceeds ``replace_threshold`` take its argmax, whatever the
crop's classes; the affinity loss keeps the labels from before (``affinity_targets``).

Losses beside the loop's balanced CE and affinity loss (``extra_loss``): ``dice_weight`` x Dice of the
branches' mean logits against the labels and ``cross_weight`` x each branch's balanced CE against the
other branch's argmax.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ...classes import IGNORE_INDEX
from ...labels.affinity import box_masks, layer_filter, refine_batch, transition_matrix
from ..losses import ONE, Pool, segmentation_loss
from . import CAMSource, InitialCAMs, LabelMaker, OnlineBatch, OnlineLabels, OnlineSettings
from .weclip import online_labels


@dataclass(frozen=True)
class PlusConfig(OnlineSettings):
    """The ``online`` settings of WeCLIP+ (VOC values of the reference code by default).

    cam_input_block: 1-based CLIP block whose output GradCAM's rerun of the last block takes (None: the
    block before the last, as WeCLIP and the reference's COCO code; its VOC code takes block 10 of 12).
    replace_from: first (0-based) iteration of the confident-pixel replacement (None: never; the
    reference's VOC code: 18001). Null keys of the ``online`` section keep these defaults."""

    filter_layers: int = 6
    layer_filter: bool = True
    cam_input_block: int | None = None
    seg_weighting: bool = True
    box_masks: bool = False
    box_threshold: float = 0.4
    exact_boxes: bool = True
    replace_from: int | None = None
    replace_threshold: float = 0.75
    dice_weight: float = 1.0
    cross_weight: float = 0.1
    sinkhorn_rounds: int = 3
    power: int = 2
    par_iterations: int = 20

    def __post_init__(self) -> None:
        if self.filter_layers < 1:
            raise ValueError("online.filter_layers must be >= 1")
        if not 0 < self.replace_threshold < 1:
            raise ValueError(f"online.replace_threshold must be in (0, 1), got {self.replace_threshold}")
        if self.dice_weight < 0 or self.cross_weight < 0:
            raise ValueError("online.dice_weight and online.cross_weight must be >= 0")


# ------------------------------------------------------------------------------------- maths
def rfm_plus_attention(attentions: torch.Tensor, affinity: torch.Tensor, use_filter: bool = True) -> torch.Tensor:
    """attentions (B, L, n, n) of the last blocks (CLS dropped), model affinity (B, n, n) -> the RFM
    attention (B, n, n) float32: (layer-filtered, or plain, mean of the maps) x affinity."""
    a = affinity.detach().float()
    mean = layer_filter(attentions, a) if use_filter else attentions.float().mean(dim=1)
    return mean * a


def class_probabilities(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """logits (B, C, h, w), classes (B, K) 0-based -> softmax probabilities of classes + 1 (B, K, h, w)
    float32, detached (index 0 is background)."""
    p = logits.detach().float().softmax(dim=1)
    B, K = classes.shape
    return p.gather(1, (classes + 1)[:, :, None, None].expand(B, K, *p.shape[-2:]))


def confident_replacement(logits: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """logits (B, C, H, W), labels (B, H, W) int64 -> labels with every pixel whose softmax maximum
    exceeds ``threshold`` replaced by the argmax (any class)."""
    top, arg = logits.detach().float().softmax(dim=1).max(dim=1)
    return torch.where(top > threshold, arg, labels)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, pool: Pool = ONE, eps: float = 1e-7) -> torch.Tensor:
    """logits (B, C, H, W), labels (B, H, W) int64 with 255 = ignore -> scalar
    1 - mean_c 2 Σ p_c y_c / (Σ p_c + Σ y_c + eps), softmax p, one-hot y, sums over the whole batch's
    non-ignored pixels, every class in the mean (a class neither present nor predicted adds 0).

    ``pool``: under DDP the sums are the processes' totals; the value is the pooled Dice and the gradient
    with respect to this process's sums is ``world`` times the pooled one (DDP averages gradients)."""
    C = logits.shape[1]
    valid = (labels != IGNORE_INDEX)[:, None].float()
    p = logits.float().softmax(dim=1) * valid
    y = F.one_hot(labels.masked_fill(labels == IGNORE_INDEX, 0), C).permute(0, 3, 1, 2).float() * valid
    inter = (p * y).sum(dim=(0, 2, 3))
    union = p.sum(dim=(0, 2, 3)) + y.sum(dim=(0, 2, 3))
    inter = pool.total(inter.detach().clone()) + pool.world * (inter - inter.detach())
    union = pool.total(union.detach().clone()) + pool.world * (union - union.detach())
    return 1 - (2 * inter / (union + eps)).mean()


# ---------------------------------------------------------------------------------- label maker
class WeCLIPPlusLabels(LabelMaker):
    """WeCLIP+'s label maker; ``vision_layers`` = blocks of the CLIP image encoder (12 for ViT-B/16)."""

    def __init__(self, cfg: PlusConfig, cams: CAMSource, vision_layers: int):
        L = vision_layers
        self.cfg, self.cams = cfg, cams
        self.cam_block = L - 1 if cfg.cam_input_block is None else int(cfg.cam_input_block)
        if not 1 <= self.cam_block <= L - 1:
            raise ValueError(f"online.cam_input_block must be in 1..{L - 1} (the blocks before the last), "
                             f"got {self.cam_block}")
        if cfg.filter_layers > L:
            raise ValueError(f"online.filter_layers ({cfg.filter_layers}) exceeds the encoder's {L} blocks")
        # the last block's map comes with the CAMs (GradCAM's rerun); the others from the model's frozen pass
        self.attention_blocks = tuple(range(L - cfg.filter_layers, L - 1))

    def refine(self, initial: InitialCAMs, attentions: Mapping[int, torch.Tensor], outputs: Mapping[str, Any]
               ) -> torch.Tensor:
        """Initial CAMs -> refined CAMs at patch resolution (B, K, h, w) float32 in [0, 1]."""
        cfg = self.cfg
        maps = [attentions[i] for i in self.attention_blocks] + [initial.attention_last]
        attn = torch.stack(maps, dim=1)[..., 1:, 1:]                                       # (B, L, n, n)
        trans = transition_matrix(rfm_plus_attention(attn, outputs["affinity"], cfg.layer_filter),
                                  cfg.sinkhorn_rounds, cfg.power)
        init = initial.cams.float()
        masks = box_masks(init, cfg.box_threshold, cfg.exact_boxes) if cfg.box_masks else torch.ones_like(init)
        if cfg.seg_weighting:
            init = init * class_probabilities(outputs["patch_logits"], initial.classes)
        return refine_batch(trans, init, masks)

    @torch.no_grad()
    def __call__(self, batch: OnlineBatch, outputs: Mapping[str, Any], iteration: int) -> OnlineLabels:
        inter = outputs["intermediates"]
        # GradCAM reruns the last block on the chosen block's output; the attention maps stay the pass's
        cam_in = replace(inter, tokens=inter.blocks[self.cam_block - 1])
        initial = self.cams(batch, cam_in, outputs["grid"])
        with torch.autocast(batch.images.device.type, enabled=False):   # RFM, PAR, replacement in float32
            cams = self.refine(initial, cam_in.attentions, outputs)
            cams = F.interpolate(cams, size=batch.images.shape[-2:], mode="bilinear", align_corners=False)
            labels = online_labels(batch.images, cams, initial.valid, initial.classes, self.cfg.par_iterations)
            made = OnlineLabels(labels, initial, cams)
            if self.cfg.replace_from is not None and iteration >= self.cfg.replace_from:
                made.labels = confident_replacement(outputs["logits"], labels, self.cfg.replace_threshold)
                made.affinity_targets = labels
        return made

    def extra_loss(self, outputs: Mapping[str, Any], made: OnlineLabels, pool: Pool = ONE) -> torch.Tensor:
        """Dice and cross-branch losses of the model's training outputs against ``made.labels``, weighted."""
        logits = outputs["logits"]
        total = logits.new_zeros((), dtype=torch.float32)
        if self.cfg.dice_weight:
            total = total + self.cfg.dice_weight * dice_loss(logits, made.labels, pool)
        branches = outputs["branch_logits"]
        if self.cfg.cross_weight and len(branches) == 2:
            a, b = branches
            total = total + self.cfg.cross_weight * (
                segmentation_loss(a, b.detach().argmax(dim=1), "bgfg", pool)
                + segmentation_loss(b, a.detach().argmax(dim=1), "bgfg", pool))
        return total
