"""Training configuration: every key with its default, YAML files and ``--set`` overrides merged onto
them, and the check that refuses unknown or contradictory keys.

    cfg = load_config("configs/weclip_voc.yaml", ["schedule.iters=1000", "data.root=~/data/VOC2012"])
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .losses import LOSSES

# Every key a config may set; YAML files and --set overrides are merged onto this.
DEFAULTS: dict[str, Any] = {
    "model": {"name": "weclip", "clip": None, "encoder_blocks": None, "width": 256, "heads": 8, "depth": 3,
              "dropout": 0.1, "layers": [3, 4, 23, 3], "base_width": 64, "layout": "torchvision", "msc_scales": [],
              "freeze_bn": "auto", "pretrained": None,
              "calibrated_blocks": 5, "attention_layers": 6, "pos_via": 20, "eval_pos_via": None, "exact": True,
              "statistics": "batch", "relation_scale": 3.0},
    "data": {"dataset": "voc", "root": None, "classes": None, "labels": None, "masks": None,
             "split": "train_aug", "supervision": "pseudo", "pseudo": None, "val_split": "val",
             "crop": 320, "scale_range": [0.5, 2.0], "scales": None, "flip": True, "normalize": "imagenet",
             "pad_image": "zero", "workers": 4},
    "optim": {"name": "adamw", "lr": 2.0e-4, "head_lr_mult": 10.0, "weight_decay": 0.01, "betas": [0.9, 0.999],
              "eps": 1.0e-8, "momentum": 0.9},
    "schedule": {"iters": 30000, "warmup_iters": 50, "warmup_ratio": 1.0e-6, "power": 1.0, "lr_step": 1},
    "train": {"batch_size": 4, "accum": 1, "seed": 1, "loss": "ce", "amp": "auto", "device": "auto",
              "ckpt_every": 2000, "keep_checkpoints": 2, "log_every": 20, "val_every": 2000,
              "val_max_images": None, "aff_weight": 0.0, "aff_radius": 8},
    # online pseudo labels (pipeline/train/online): method null = labels from data.pseudo / ground truth;
    # null settings take the method's own defaults (pipeline/train/online/<method>.py)
    "online": {"method": None, "refine": None, "layer_filter": None, "static_layers": None, "filter_layers": None,
               "switch_iter": None, "box_threshold": None, "exact_boxes": None, "par_iterations": None,
               # ExCEL only: diversity-loss targets from the segmentation, text enrichment
               "segmentation_targets_from": None, "tse": True, "descriptions": None, "attribute_bank": None},
    "infer": {"scales": [1.0, 0.75], "flip": True, "long_side": None, "square": None, "unflipped_scales": [],
              "window": None, "stride": None, "crf": False, "crf_preset": None, "crf_params": None,
              "crf_backend": "auto", "crf_max_pixels": 1_000_000, "average_at": "image"},
    "val": {"scales": [1.0], "flip": False, "long_side": None, "square": None, "window": None, "stride": None,
            "crf": False},
}
# Keys that may change between an interrupted run and its resumption without changing the result.
RESUME_FREE = {"data.workers", "train.ckpt_every", "train.keep_checkpoints", "train.log_every", "train.device",
               "train.val_every", "train.val_max_images", "data.root", "data.pseudo", "model.clip", "infer", "val"}


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def _merge(base: dict, new: Mapping, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        if k not in out:
            raise ConfigError(f"{where}: unknown key {k!r}; valid keys here: {', '.join(sorted(out))}")
        if isinstance(out[k], dict) and k not in ("crf_params",):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}: {k!r} must be a mapping")
            out[k] = _merge(out[k], v, f"{where}.{k}")
        elif isinstance(out[k], dict):
            out[k] = {**out[k], **dict(v)}
        else:
            out[k] = v
    return out


def apply_override(cfg: dict, item: str) -> dict:
    """'section.key=value' (value parsed as YAML: 1e-3, [1,2], null, true) -> new config."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    node: Any = value
    for part in reversed(key.strip().split(".")):
        node = {part: node}
    return _merge(cfg, node, "override")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict:
    """DEFAULTS <- YAML file <- overrides; unknown keys are errors."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from e
        cfg = _merge(cfg, doc, str(path))
    for item in overrides:
        cfg = apply_override(cfg, item)
    check_config(cfg)
    return cfg


def check_config(cfg: Mapping) -> None:
    t, s, d = cfg["train"], cfg["schedule"], cfg["data"]
    if t["loss"] not in LOSSES:
        raise ConfigError(f"train.loss must be one of {LOSSES}, got {t['loss']!r}")
    if t["amp"] not in ("auto", "none", "bf16", "fp16"):
        raise ConfigError(f"train.amp must be auto, none, bf16 or fp16, got {t['amp']!r}")
    if cfg["optim"]["name"] not in ("adamw", "sgd"):
        raise ConfigError(f"optim.name must be adamw or sgd, got {cfg['optim']['name']!r}")
    if d["supervision"] not in ("pseudo", "gt"):
        raise ConfigError(f"data.supervision must be pseudo (labels from data.pseudo) or gt, got {d['supervision']!r}")
    if cfg["model"]["statistics"] not in ("batch", "image"):
        raise ConfigError(f"model.statistics must be batch or image, got {cfg['model']['statistics']!r}")
    online = cfg["online"]["method"]
    if online is not None:
        from .online import METHODS

        if online not in METHODS:
            raise ConfigError(f"online.method must be one of {', '.join(METHODS)} or null, got {online!r}")
    model = cfg["model"]["name"]
    if online is not None and model != online:
        raise ConfigError(f"online.method={online} makes labels for model.name={online}, not {model}")
    if float(t["aff_weight"]) and model not in ("weclip", "excel"):
        raise ConfigError(f"the affinity loss (train.aff_weight) needs model.name weclip or excel, not {model}")
    for key, v in (("schedule.iters", s["iters"]), ("schedule.lr_step", s["lr_step"]),
                   ("train.batch_size", t["batch_size"]), ("train.accum", t["accum"])):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    from ..models import check_model_config

    try:
        check_model_config(cfg["model"], d["normalize"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and k not in ("crf_params",):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_differences(old: Mapping, new: Mapping) -> list[str]:
    """Config keys whose change would make a resumed run differ from an uninterrupted one."""
    a, b = flatten(old), flatten(new)
    free = lambda k: k in RESUME_FREE or k.split(".")[0] in RESUME_FREE  # noqa: E731
    return sorted(k for k in set(a) | set(b) if not free(k) and a.get(k) != b.get(k))
