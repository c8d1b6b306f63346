"""ExCEL's online labels (Yang et al., CVPR 2025): patch-text CAMs of the calibrated CLIP pass,
refined with the pass's own attention, then background, PAR and argmax, as WeCLIP's labels are made.

Two phases, switched at ``switch_iter`` (reference: 14,000 VOC, 30,000 COCO):
- static: the static CAMs of the pass the model already ran; RFM attention = mean of the last 6
  maps (the plain block 7 and the head-summed calibrated blocks 8-12, mixed scales as the reference);
- dynamic: a second, gradient-free pass adds the model's dynamic relations (from its fused features
  F_d) to every calibrated head, and its CAMs replace the static ones; RFM attention = WeCLIP's
  layer filter over the last 6 maps, times the adapter's affinity A_f.

From ``segmentation_targets_from`` (reference: 24,000 on VOC, never on COCO) the diversity loss
compares A_f with the current segmentation's argmax instead of the labels (``affinity_targets``).
The original path of the calibrated blocks never sees the relations, so the attention is the
same in both passes and the static one is reused, and so are the calibrated blocks' q, k, v: the
second pass recomputes the calibrated path alone (``recalibrate``), the same numbers as a full pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...cams.excel import ExcelEngine, select_classes
from ...models.excel import dynamic_relation
from . import InitialCAMs, OnlineBatch, OnlineLabels
from .weclip import WeCLIPConfig, WeCLIPLabels


@dataclass(frozen=True)
class ExcelLabelConfig(WeCLIPConfig):
    """WeCLIP's label settings with ExCEL's values (6 maps in both phases, VOC's switch and box
    threshold; COCO: 30,000 and 0.88) plus ``segmentation_targets_from`` (None: never, as on COCO;
    VOC: 24,000). (The reference also makes labels of validation images, with box threshold 0.75, to
    log their mIoU; our validation scores the segmentation model only.)"""

    static_layers: int = 6
    filter_layers: int = 6
    switch_iter: int = 14000
    box_threshold: float = 0.79
    segmentation_targets_from: int | None = None

    def dynamic(self, iteration: int) -> bool:
        return iteration >= self.switch_iter and self.refine in ("both", "decoder")

    def segmentation_targets(self, iteration: int) -> bool:
        return self.segmentation_targets_from is not None and iteration >= self.segmentation_targets_from


class ExcelCAMSource:
    """Static or dynamic patch-text CAMs of the crops' classes from a calibrated pass (``Calibrated``),
    with the last block's attention; the ``CAMSource`` interface, so tests can inject CAMs instead."""

    def __init__(self, engine: ExcelEngine):
        self.engine = engine

    def __call__(self, batch: OnlineBatch, encoded, grid: tuple[int, int]) -> InitialCAMs:
        maps, classes, valid = select_classes(self.engine.cams_from(encoded, grid), batch.labels)
        return InitialCAMs(maps, valid, classes, encoded.attentions[max(encoded.attentions)])


class ExcelLabels(WeCLIPLabels):
    """ExCEL's label maker. ``engine``: the frozen CLIP with the enriched class text, its calibrated
    pass set up as the model's (``engine_config``); ``statistics`` / ``relation_scale``: the model's."""

    def __init__(self, cfg: ExcelLabelConfig, cams, engine: ExcelEngine, vision_layers: int,
                 statistics: str = "batch", relation_scale: float = 3.0):
        super().__init__(cfg, cams, vision_layers)
        self.engine, self.statistics, self.relation_scale = engine, statistics, float(relation_scale)

    @torch.no_grad()
    def __call__(self, batch: OnlineBatch, outputs: Mapping[str, Any], iteration: int) -> OnlineLabels:
        if self.cfg.dynamic(iteration):
            relation = dynamic_relation(outputs["fused"].detach(), self.statistics, self.relation_scale)
            # the model's pass kept its calibrated blocks' q, k, v: only the calibrated path is redone
            outputs = {**outputs, "intermediates": self.engine.recalibrate(outputs["intermediates"], relation)}
        made = super().__call__(batch, outputs, iteration)
        if self.cfg.segmentation_targets(iteration):
            made.affinity_targets = outputs["logits"].detach().argmax(dim=1)
        return made


def engine_config(model_cfg: Mapping[str, Any], classes, box_threshold: float, dataset: str,
                  online: Mapping[str, Any]):
    """The CAM method's settings that make its calibrated pass the model's training pass; the text
    enrichment from the ``online`` section (``tse``, ``descriptions``, ``attribute_bank``)."""
    from ...cams.excel import make_config

    options = {"calibrated_blocks": int(model_cfg.get("calibrated_blocks", 5)),
               "attention_layers": int(model_cfg.get("attention_layers", 6)), "pos_via": model_cfg.get("pos_via", 20),
               "tse": bool(online.get("tse", True))}
    for key in ("descriptions", "attribute_bank"):
        if online.get(key):
            options[key] = online[key]
    return make_config(dataset, classes, bool(model_cfg.get("exact", True)), box_threshold, options)
