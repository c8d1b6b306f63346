"""Segmentation models trained on pseudo labels: WeCLIP's decoder on frozen CLIP, ExCEL's calibrated
variant of it, DeepLabV2/V3+.

``build_model(model_cfg, num_classes)`` is the one constructor the trainer, inference and
benchmarks use; every model maps normalised images (B, 3, H, W) to logits (B, C, H, W), names the
state-dict prefixes it never trains (``frozen_prefixes``) and provides its optimiser ``param_groups``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .deeplab import RESNET101, DeepLab, LoadReport, load_backbone, read_checkpoint_state
from .excel import ExcelSeg
from .weclip import WeCLIPDecoder, WeCLIPSeg, decoder_param_count

MODELS = ("weclip", "excel", "deeplabv2", "deeplabv3plus")
__all__ = ["MODELS", "build_model", "trainable_parameters", "DeepLab", "WeCLIPSeg", "WeCLIPDecoder", "ExcelSeg",
           "decoder_param_count", "load_backbone", "LoadReport", "RESNET101"]


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(cfg: Mapping[str, Any], num_classes: int, clip: nn.Module | None = None,
                log=print) -> nn.Module:
    """Model from the ``model:`` section of a training config, on the CPU in float32.

    weclip: ``clip`` (checkpoint path; or pass a CLIP module as ``clip``), ``encoder_blocks``, ``width``,
    ``heads``, ``depth``, ``dropout``. excel: the same but over all blocks, plus ``calibrated_blocks``,
    ``attention_layers``, ``pos_via``, ``exact``, ``statistics``, ``relation_scale`` (see
    ``excel.ExcelSeg``). deeplabv2 / deeplabv3plus: ``layers``, ``base_width``, ``freeze_bn``,
    ``pretrained`` (ResNet checkpoint path or null = from scratch).
    """
    name = cfg.get("name")
    if name in ("weclip", "excel"):
        if clip is None:
            from ..clip import load_clip

            if not cfg.get("clip"):
                raise ValueError(f"model.clip: path to the CLIP checkpoint (ViT-B-16.pt) is required for {name}")
            clip = load_clip(cfg["clip"], "cpu", torch.float32)
        if name == "excel":
            from .excel import build

            return build(cfg, num_classes, clip)
        return WeCLIPSeg(clip, num_classes, cfg.get("encoder_blocks"), int(cfg.get("width", 256)),
                         int(cfg.get("heads", 8)), int(cfg.get("depth", 3)), float(cfg.get("dropout", 0.1)))
    if name in ("deeplabv2", "deeplabv3plus"):
        model = DeepLab(num_classes, "v2" if name == "deeplabv2" else "v3plus", tuple(cfg.get("layers", RESNET101)),
                        int(cfg.get("base_width", 64)), bool(cfg.get("freeze_bn", True)))
        if cfg.get("pretrained"):
            report = load_backbone(model.backbone, read_checkpoint_state(cfg["pretrained"]), str(cfg["pretrained"]))
            log(f"backbone {cfg['pretrained']}: {report.summary()}")
        else:
            log("backbone: random initialisation (no model.pretrained checkpoint given)")
        return model
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
