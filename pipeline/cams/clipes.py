"""CLIP-ES (CVPR 2023) as a CAM method: Softmax-GradCAM refined by class-aware attention affinity
(``pipeline.cams.gradcam``), on PIL-bicubic resized images at their own aspect ratio."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from .gradcam import CAMConfig, CAMEngine
from ..classes import ClassList
from ..clip.model import CLIP
from ..data.image import load_for_model

CUDA_PRECISION = "fp16"


def make_config(dataset: str, classes: ClassList, exact: bool, box_threshold: float | None,
                options: dict[str, Any]) -> CAMConfig:
    return CAMConfig(box_threshold=classes.box_threshold if box_threshold is None else box_threshold, exact=exact,
                     **options)


def manifest(config: CAMConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def image_loader(config: CAMConfig, max_patches: int, exif_transpose: bool):
    return functools.partial(load_for_model, max_patches=max_patches, exact=config.exact, exif_transpose=exif_transpose)


def build_engine(model: CLIP, classes: ClassList, config: CAMConfig) -> CAMEngine:
    return CAMEngine(model, classes, config)
