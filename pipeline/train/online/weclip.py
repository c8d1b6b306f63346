"""WeCLIP's online labels (WeCLIP, CVPR 2024): initial CAMs from the frozen CLIP, refined by its
refinement module (RFM), then background, PAR and argmax; every pixel gets a label (no threshold,
no ignore region, padding included, as the reference).

RFM per crop: an attention matrix W over the patches, then CAA's Sinkhorn / symmetrise / square,
box masks from the initial CAMs and column-masked propagation (``affinity``).
- Before ``switch_iter`` ("static" phase): W = mean of the last 8 attention maps (blocks 5..12).
- From ``switch_iter`` on: W = Ā ⊙ A_f, with A_f = sigmoid(F_uᵀF_u) the decoder's affinity (detached)
  and Ā the mean of the last 6 (VOC) / 10 (COCO) attention maps that pass the layer filter G_e.

Ablations (WeCLIP Tables 4 and 6) by ``refine``: 'both' (the method), 'attention' (A_s only: the
static map for the whole run), 'decoder' (A_f only after the switch, static before it, when the
decoder is still untrained), 'none' (decoder only: initial CAMs straight to PAR); ``layer_filter``
False averages the last maps without G_e.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ...labels.affinity import box_masks, layer_filter, refine_batch, transition_matrix
from ...labels.par import par
from . import CAMSource, InitialCAMs, LabelMaker, OnlineBatch, OnlineLabels, OnlineSettings

REFINE = ("both", "attention", "decoder", "none")


@dataclass(frozen=True)
class WeCLIPConfig(OnlineSettings):
    """switch_iter: first (0-based) training iteration of the second phase. The reference switches
    when a forward counter passes 15000 (VOC) / 40000 (COCO), but on VOC that counter also counts its
    validation forwards (1464 images after every 2000 iterations), so it switches at 0-based training
    iteration 9144; the paper's value is the nominal 15000. Its COCO script never validates: 40000 there
    is exact. exact_boxes: RFM's box masks as the
    reference draws them, never including the grid's last row and column (False: whole boxes)."""

    refine: str = "both"
    layer_filter: bool = True
    static_layers: int = 8
    filter_layers: int = 6
    switch_iter: int = 9144
    box_threshold: float = 0.4
    exact_boxes: bool = True
    sinkhorn_rounds: int = 3
    power: int = 2
    par_iterations: int = 20

    def __post_init__(self) -> None:
        if self.refine not in REFINE:
            raise ValueError(f"online.refine must be one of {', '.join(REFINE)}, got {self.refine!r}")
        if self.static_layers < 1 or self.filter_layers < 1:
            raise ValueError("online.static_layers and online.filter_layers must be >= 1")


def rfm_attention(attentions: torch.Tensor, affinity: torch.Tensor | None, cfg: WeCLIPConfig,
                  iteration: int) -> torch.Tensor:
    """attentions (B, L, n, n) of consecutive blocks ending with the last one (CLS dropped), decoder
    affinity (B, n, n) -> RFM's attention W (B, n, n) float32 for ``iteration`` (see module doc)."""
    late = iteration >= cfg.switch_iter and cfg.refine in ("both", "decoder")
    if not late:
        return attentions[:, -cfg.static_layers:].float().mean(dim=1)
    a_f = affinity.detach().float()
    if cfg.refine == "decoder":
        return a_f
    last = attentions[:, -cfg.filter_layers:]
    mean = layer_filter(last, a_f) if cfg.layer_filter else last.float().mean(dim=1)
    return mean * a_f


def online_labels(images: torch.Tensor, cams: torch.Tensor, valid: torch.Tensor, classes: torch.Tensor,
                  par_iterations: int = 20) -> torch.Tensor:
    """Refined CAMs -> label maps (WeCLIP's online labels).

    images (B, 3, H, W) normalised crops; cams (B, K, H, W) in [0, 1]; valid / classes (B, K) ->
    int64 (B, H, W), 0 background, c + 1 class c: background score 1 - max_k cam_k, PAR over
    [background, cams], argmax over the background and the crop's own classes.
    """
    cams = cams.float().masked_fill(~valid[:, :, None, None], 0)
    bg = 1 - cams.amax(dim=1, keepdim=True)
    scores = par(images.float(), torch.cat([bg, cams], dim=1), par_iterations)
    keep = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
    idx = scores.masked_fill(~keep[:, :, None, None], float("-inf")).argmax(dim=1)     # (B, H, W)
    ids = torch.cat([torch.zeros_like(classes[:, :1]), classes + 1], dim=1)             # (B, 1 + K)
    return ids.gather(1, idx.flatten(1)).view_as(idx)


class WeCLIPLabels(LabelMaker):
    """WeCLIP's label maker; ``vision_layers`` = blocks of the CLIP image encoder (12 for ViT-B/16)."""

    def __init__(self, cfg: WeCLIPConfig, cams: CAMSource, vision_layers: int):
        self.cfg = cfg
        self.cams = cams
        self.vision_layers = vision_layers
        n_maps = max(cfg.static_layers, cfg.filter_layers)
        if n_maps > vision_layers:
            raise ValueError(f"online.static_layers / filter_layers ({n_maps}) exceed the encoder's {vision_layers} blocks")
        # the last block's map comes with the CAMs; the others from the model's frozen pass
        self.attention_blocks = tuple(range(vision_layers - n_maps, vision_layers - 1)) if cfg.refine != "none" else ()

    def refine(self, initial: InitialCAMs, outputs: Mapping[str, Any], iteration: int) -> torch.Tensor:
        """Initial CAMs -> RFM-refined CAMs at patch resolution (B, K, h, w) float32."""
        inter = outputs["intermediates"]
        maps = [inter.attentions[i] for i in self.attention_blocks] + [initial.attention_last]
        attn = torch.stack(maps, dim=1)[..., 1:, 1:]                                      # (B, L, n, n)
        w = rfm_attention(attn, outputs["affinity"], self.cfg, iteration)
        trans = transition_matrix(w, self.cfg.sinkhorn_rounds, self.cfg.power)
        init = initial.cams.float()
        return refine_batch(trans, init, box_masks(init, self.cfg.box_threshold, self.cfg.exact_boxes))

    @torch.no_grad()
    def __call__(self, batch: OnlineBatch, outputs: Mapping[str, Any], iteration: int) -> OnlineLabels:
        initial = self.cams(batch, outputs["intermediates"], outputs["grid"])
        device = batch.images.device.type
        # RFM and PAR in float32 (devices without autocast, such as 'meta' in tests, have nothing to turn off)
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            cams = initial.cams.float() if self.cfg.refine == "none" else self.refine(initial, outputs, iteration)
            cams = F.interpolate(cams, size=batch.images.shape[-2:], mode="bilinear", align_corners=False)
            labels = online_labels(batch.images, cams, initial.valid, initial.classes, self.cfg.par_iterations)
        return OnlineLabels(labels, initial, cams)
