"""Online pseudo labels: label makers that turn each training batch into label maps while the
segmentation model learns (single-stage training, as WeCLIP CVPR 2024 and ExCEL CVPR 2025 train).

The training loop (``pipeline.train.step_online``) runs the model's training forward, which also returns the
frozen encoder pass and the decoder's patch affinity, then asks the label maker for the batch's labels:

    maker = build_label_maker(cfg["online"], clip, classes)
    out = model(batch.images, outputs="train", attention_blocks=maker.attention_blocks)
    labels = maker(batch, out, iteration).labels       # (B, H, W) int64, 0 background, c + 1 class c

Each method is one module (``weclip``, ``excel``, ``weclip_plus``); its initial CAMs come from a ``CAMSource`` (the CAM stage's
batched Softmax-GradCAM by default, ``GradCAMSource``), so a method can swap in its own CAMs (ExCEL's
calibrated CLIP pass) or a test can inject CAMs with known errors through the same call. A method with
losses of its own besides the loop's (WeCLIP+'s Dice and cross-branch terms) adds them through
``extra_loss(outputs, made, pool)``, which the loop adds to the step's loss.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Mapping, Protocol, Sequence

import torch

from ...cams.gradcam import label_slots
from ...clip.model import Intermediates

METHODS = ("weclip", "excel", "weclip-plus")
# The `online` keys each method reads besides `method`. The training config check refuses the others,
# so a method plugs in by listing its keys here (and its settings' own check in ``check_settings``).
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "weclip": ("refine", "layer_filter", "static_layers", "filter_layers", "switch_iter", "box_threshold",
               "exact_boxes", "par_iterations"),
    "excel": ("refine", "layer_filter", "static_layers", "filter_layers", "switch_iter", "box_threshold",
              "exact_boxes", "par_iterations", "segmentation_targets_from", "tse", "descriptions", "attribute_bank"),
    "weclip-plus": ("layer_filter", "filter_layers", "box_threshold", "exact_boxes", "par_iterations",
                    "cam_input_block", "seg_weighting", "box_masks", "replace_from", "replace_threshold",
                    "dice_weight", "cross_weight"),
}


@dataclass
class OnlineBatch:
    """images (B, 3, H, W) normalised crops on the device; labels[b] the image-level classes of crop b
    (0-based, ascending, non-empty); keys[b] = (sample index, global sample counter), which identify
    the crop (its augmentation is a function of the counter)."""

    images: torch.Tensor
    labels: list[list[int]]
    keys: list[tuple[int, int]]


@dataclass
class InitialCAMs:
    """cams (B, K, h, w) float32 in [0, 1] at patch resolution, K = most labels in the batch, zero in
    unused slots; valid (B, K) bool; classes (B, K) int64 0-based ids (0 in unused slots);
    attention_last (B, 1+n, 1+n) head-averaged attention of the encoder's last block, or None."""

    cams: torch.Tensor
    valid: torch.Tensor
    classes: torch.Tensor
    attention_last: torch.Tensor | None = None


@dataclass
class OnlineLabels:
    """labels (B, H, W) int64 (0 background, c + 1 class c, 255 ignore) and what they came from."""

    labels: torch.Tensor
    initial: InitialCAMs
    refined: torch.Tensor | None = None   # (B, K, H, W) refined CAMs before background and PAR
    # (B, H, W) label map the affinity loss takes its pair targets from, when not ``labels``
    affinity_targets: torch.Tensor | None = None


class CAMSource(Protocol):
    """Initial CAMs of a batch, given the frozen encoder pass the model already ran."""

    def __call__(self, batch: OnlineBatch, intermediates: Intermediates, grid: tuple[int, int]) -> InitialCAMs:
        ...


def pad_maps(maps: Sequence[torch.Tensor], labels: Sequence[Sequence[int]]) -> InitialCAMs:
    """Per-image (K_b, h, w) maps -> the padded batch form of ``InitialCAMs`` (for CAMs injected per crop)."""
    cams = torch.nn.utils.rnn.pad_sequence(list(maps), batch_first=True).float()
    classes, valid = label_slots(labels, cams.device)
    return InitialCAMs(cams, valid, classes)


class GradCAMSource:
    """The CAM stage's Softmax-GradCAM (``cams.gradcam.CAMEngine``) on the model's own frozen pass: only the
    last encoder block runs again (with grad), every class of every crop in one backward."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, batch: OnlineBatch, intermediates: Intermediates, grid: tuple[int, int]) -> InitialCAMs:
        maps, attn_last = self.engine.initial_maps(intermediates, batch.labels, grid)
        classes, valid = label_slots(batch.labels, maps.device)
        return InitialCAMs(maps.float(), valid, classes, attn_last)


class OnlineSettings:
    """Base of a method's settings (a frozen dataclass), read from the ``online`` config section."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], box_threshold: float) -> OnlineSettings:
        """The section's keys that are fields here (null ones keep the defaults); ``box_threshold`` where
        the section sets none."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        kw.setdefault("box_threshold", box_threshold)
        return cls(**kw)


class LabelMaker(ABC):
    """Makes a batch's labels from the model's training outputs (``outputs='train'``) at ``iteration``."""

    #: encoder blocks (0-based) whose head-averaged attention the model's frozen pass must record
    attention_blocks: tuple[int, ...] = ()

    @abstractmethod
    def __call__(self, batch: OnlineBatch, outputs: Mapping[str, Any], iteration: int) -> OnlineLabels:
        ...


def check_settings(cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> None:
    """Refuse ``online`` settings the method cannot run with the ``model`` section's, before anything
    is loaded (``ValueError`` naming the keys): the label config's own checks, and for ExCEL no more
    attention maps than its calibrated pass records (``model.attention_layers``)."""
    method = cfg.get("method")
    if method == "excel":
        from .excel import ExcelLabelConfig

        ecfg = ExcelLabelConfig.from_dict(cfg, ExcelLabelConfig.box_threshold)
        n_maps, recorded = max(ecfg.static_layers, ecfg.filter_layers), int(model_cfg.get("attention_layers", 6))
        if ecfg.refine != "none" and n_maps > recorded:
            raise ValueError(f"online.static_layers / filter_layers ({ecfg.static_layers} / {ecfg.filter_layers}) "
                             f"exceed model.attention_layers ({recorded}), the blocks whose attention ExCEL's pass "
                             "records: raise model.attention_layers or lower them")
    elif method == "weclip":
        from .weclip import WeCLIPConfig

        WeCLIPConfig.from_dict(cfg, WeCLIPConfig.box_threshold)
    elif method == "weclip-plus":
        from .weclip_plus import PlusConfig

        PlusConfig.from_dict(cfg, PlusConfig.box_threshold)


def build_label_maker(cfg: Mapping[str, Any], clip, classes, cams: CAMSource | None = None,
                      model_cfg: Mapping[str, Any] | None = None, dataset: str = "voc") -> LabelMaker:
    """Label maker from the ``online`` config section; ``clip`` the frozen CLIP (its text encoder
    gives the CAM prompts), ``classes`` the dataset's ``ClassList``; ``cams`` replaces the GradCAM
    source (tests inject CAMs with known errors). ExCEL also reads the ``model`` section (its
    calibrated pass and relations) and the dataset name (its text descriptions)."""
    method = cfg.get("method")
    if method == "excel":
        from ...cams.excel import ExcelEngine
        from .excel import ExcelCAMSource, ExcelLabelConfig, ExcelLabels, engine_config

        ecfg = ExcelLabelConfig.from_dict(cfg, ExcelLabelConfig.box_threshold)
        mcfg = dict(model_cfg or {})
        engine = ExcelEngine(clip, classes, engine_config(mcfg, classes, ecfg.box_threshold, dataset, cfg))
        return ExcelLabels(ecfg, cams or ExcelCAMSource(engine), engine, clip.arch.vision_layers,
                           mcfg.get("statistics", "batch"), float(mcfg.get("relation_scale", 3.0)))
    if method in ("weclip", "weclip-plus"):
        if method == "weclip":
            from .weclip import WeCLIPConfig as Config, WeCLIPLabels as Labels
        else:
            from .weclip_plus import PlusConfig as Config, WeCLIPPlusLabels as Labels
        wcfg = Config.from_dict(cfg, classes.box_threshold)
        if cams is None:
            from ...cams.gradcam import CAMConfig, CAMEngine

            # no CAA inside the engine: RFM refines the GradCAM maps; fp32/bf16 arithmetic, no fp16 emulation
            cams = GradCAMSource(CAMEngine(clip, classes, CAMConfig(box_threshold=wcfg.box_threshold, exact=False)))
        return Labels(wcfg, cams, clip.arch.vision_layers)
    raise ValueError(f"online.method must be one of {', '.join(METHODS)} (or null for offline labels), got {method!r}")
