"""CAM methods of the CAM stage, one module per method, all with the same interface.

A method module provides:

- ``CUDA_PRECISION``: the dtype its reference runs CLIP in on CUDA ('fp16' CLIP-ES, 'fp32' ExCEL);
- ``make_config(dataset, classes, exact, box_threshold, options) -> config``: a frozen dataclass of
  every setting that changes the numbers; bad option values and unreadable side files (descriptions,
  attribute banks) raise ``ValueError`` naming the file, before any model is loaded;
- ``manifest(config) -> dict``: what the stage's manifest records about it;
- ``image_loader(config, max_patches, exif_transpose)``: a picklable ``path -> (float32 (3, h', w')
  tensor, original (H, W))`` used by the stage's decoding workers;
- ``build_engine(model, classes, config)``: a callable ``(images (B, 3, h', w'), labels) ->
  list[gradcam.CAMResult]`` (refined CAMs and initial CAMs, (K, h, w) each, at patch resolution).
"""
from __future__ import annotations

import importlib
from types import ModuleType

METHODS = ("clipes", "excel")


def get_method(name: str) -> ModuleType:
    """The module of CAM method ``name`` ('clipes' or 'excel')."""
    if name not in METHODS:
        raise ValueError(f"unknown CAM method {name!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"{__name__}.{name}")
