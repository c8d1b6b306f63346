"""Segmentation models trained on pseudo labels: WeCLIP's decoder on frozen CLIP, ExCEL's calibrated
variant of it, WeCLIP+'s shared decoder on frozen CLIP and DINOv2, DeepLabV2/V3+.

``build_model(model_cfg, num_classes)`` is the one constructor the trainer, inference and
benchmarks use; every model maps normalised images (B, 3, H, W) to logits (B, C, H, W) in eval mode,
names the state-dict prefixes it never trains (``frozen_prefixes``) and provides its optimiser
``param_groups``. A model whose training outputs are not plain logits (DeepLab's multi-scale list)
provides ``training_loss(outputs, labels, loss_fn)``; ``family`` names the model kind for inference
settings that depend on it (stored in checkpoint meta as ``family``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .deeplab import LAYOUTS, RESNET101, DeepLab, LoadReport, load_pretrained, read_checkpoint_state
from .excel import ExcelSeg
from .weclip import WeCLIPDecoder, WeCLIPSeg, decoder_param_count

# The config keys each model reads besides model.name: names in the `model` section, dotted names in
# others (train.aff_weight: the model has the patch affinity the affinity loss trains). The training
# config check refuses a key the chosen model does not read, so a model plugs in by listing its keys
# here and building in ``build_model``.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "weclip": ("clip", "encoder_blocks", "width", "heads", "depth", "dropout", "train.aff_weight"),
    "excel": ("clip", "width", "heads", "depth", "dropout", "calibrated_blocks", "attention_layers", "pos_via",
              "eval_pos_via", "exact", "statistics", "relation_scale", "train.aff_weight"),
    "weclip-plus": ("clip", "dino", "branches", "width", "heads", "depth", "dropout", "train.aff_weight"),
    "deeplabv2": ("layers", "base_width", "layout", "msc_scales", "freeze_bn", "pretrained"),
    "deeplabv3plus": ("layers", "base_width", "layout", "msc_scales", "freeze_bn", "pretrained"),
}
MODELS = tuple(CONFIG_KEYS)
# The input convention each ResNet layout's pretrained files expect (segdata.NORMALIZATIONS keys).
LAYOUT_INPUTS = {"caffe": "caffe", "torchvision": "imagenet"}
__all__ = ["MODELS", "CONFIG_KEYS", "LAYOUT_INPUTS", "build_model", "check_model_config", "trainable_parameters", "DeepLab",
           "WeCLIPSeg", "WeCLIPDecoder", "ExcelSeg", "decoder_param_count", "load_pretrained", "LoadReport",
           "RESNET101"]


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(cfg: Mapping[str, Any], num_classes: int, clip: nn.Module | None = None,
                log=print, dino: nn.Module | None = None) -> nn.Module:
    """Model from the ``model:`` section of a training config, on the CPU in float32.

    weclip: ``clip`` (checkpoint path; or pass a CLIP module as ``clip``), ``encoder_blocks``, ``width``,
    ``heads``, ``depth``, ``dropout``. excel: the same but over all blocks, plus ``calibrated_blocks``,
    ``attention_layers``, ``pos_via``, ``exact``, ``statistics``, ``relation_scale`` (see
    ``excel.ExcelSeg``). weclip-plus: ``clip``, ``dino`` (DINOv2 backbone file), ``branches`` (both | clip |
    dino), ``width``, ``heads``, ``depth``, ``dropout`` (see ``weclip_plus``; or pass a DINOv2 module as
    ``dino``). deeplabv2 / deeplabv3plus: ``layers``, ``base_width``, ``layout``
    (caffe | torchvision), ``msc_scales`` (v2: extra input scales fused by max, [] = single scale),
    ``freeze_bn`` (auto = frozen when a pretrained file is given), ``pretrained`` (checkpoint path or null).
    """
    name = cfg.get("name")
    if name in ("weclip", "excel", "weclip-plus"):
        if clip is None:
            from ..clip.model import load_clip

            if not cfg.get("clip"):
                raise ValueError(f"model.clip: path to the CLIP checkpoint (ViT-B-16.pt) is required for {name}")
            clip = load_clip(cfg["clip"], "cpu", torch.float32)
        if name == "excel":
            from .excel import build

            return build(cfg, num_classes, clip)
        if name == "weclip-plus":
            from .weclip_plus import build

            return build(cfg, num_classes, clip, dino)
        return WeCLIPSeg(clip, num_classes, cfg.get("encoder_blocks"), int(cfg.get("width", 256)),
                         int(cfg.get("heads", 8)), int(cfg.get("depth", 3)), float(cfg.get("dropout", 0.1)))
    if name in ("deeplabv2", "deeplabv3plus"):
        freeze = cfg.get("freeze_bn", "auto")
        freeze = bool(cfg.get("pretrained")) if freeze == "auto" else bool(freeze)
        model = DeepLab(num_classes, "v2" if name == "deeplabv2" else "v3plus", tuple(cfg.get("layers", RESNET101)),
                        int(cfg.get("base_width", 64)), freeze, cfg.get("layout", "torchvision"),
                        cfg.get("msc_scales") or ())
        if cfg.get("pretrained"):
            report = load_pretrained(model, read_checkpoint_state(cfg["pretrained"]), str(cfg["pretrained"]))
            log(f"pretrained {cfg['pretrained']}: {report.summary()}")
        else:
            log("backbone: random initialisation (no model.pretrained checkpoint given); BatchNorm "
                f"{'frozen' if freeze else 'trained'}")
        return model
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def check_model_config(cfg: Mapping[str, Any], normalize: str) -> None:
    """Refuse settings that would train silently wrong (``ValueError`` naming the key and the fix).

    DeepLab: a known ``layout``; ``freeze_bn: true`` only with a pretrained file (frozen BatchNorm keeps
    the file's statistics; at random init they make the loss explode); and a pretrained file gets the
    input convention its layout was trained with (caffe files: BGR minus mean; torchvision: ImageNet).
    """
    if cfg.get("name") not in ("deeplabv2", "deeplabv3plus"):
        return
    layout = cfg.get("layout", "torchvision")
    if layout not in LAYOUTS:
        raise ValueError(f"model.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    freeze = cfg.get("freeze_bn", "auto")
    if freeze not in (True, False, "auto"):
        raise ValueError(f"model.freeze_bn must be auto, true or false, got {freeze!r}")
    if cfg.get("msc_scales") and cfg.get("name") != "deeplabv2":
        raise ValueError("model.msc_scales: multi-scale max fusion is DeepLabV2's (deeplab-pytorch); set it to []")
    if not cfg.get("pretrained"):
        if freeze is True:
            raise ValueError("model.freeze_bn=true needs model.pretrained (INIT=...): frozen BatchNorm keeps a "
                             "pretrained file's statistics, and at random initialisation the loss diverges; "
                             "train from scratch with model.freeze_bn=auto (or false)")
        return
    want = LAYOUT_INPUTS[layout]
    if normalize != want:
        raise ValueError(f"data.normalize={normalize!r} with a {layout}-layout pretrained file: its weights were "
                         f"trained on {want!r} inputs; set data.normalize={want}")
