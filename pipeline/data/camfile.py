"""The CAM file contract shared by the CAM stage (writer) and later stages (readers).

``<out>/<image_id>.npz`` holds:
  - ``keys``       int64 (K,)      0-based foreground class ids, in label order
  - ``cams``       float32 (K,h,w) refined CAMs at patch resolution, each min-max normalised
  - ``image_size`` int64 (2,)      original (H, W)
  - ``cams_init``  float32 (K,h,w) maps before refinement (only with ``--save-init``): GradCAM for
                                   CLIP-ES, the static patch-text CAMs for ExCEL
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from ..io import ERRORS, load_npz, save_npz

REQUIRED = ("keys", "cams", "image_size")


def save_cams(path: str | Path, keys: np.ndarray, cams: np.ndarray, image_size: tuple[int, int],
              cams_init: np.ndarray | None = None) -> None:
    arrays = {"keys": np.asarray(keys, np.int64), "cams": np.asarray(cams, np.float32),
              "image_size": np.asarray(image_size, np.int64)}
    if cams_init is not None:
        arrays["cams_init"] = np.asarray(cams_init, np.float32)
    save_npz(path, arrays)


def missing_message(path: str | Path) -> str:
    """Why the CAM file ``path`` is absent: the CAM stage's own failure for the image when its
    errors.json lists one (an unknown class, say), else that the stage has not run for it."""
    path = Path(path)
    try:
        errors = json.loads((path.parent / ERRORS).read_text())
    except (OSError, ValueError):
        errors = {}
    reason = errors.get(path.name.removesuffix(".npz")) if isinstance(errors, dict) else None
    if reason:
        return f"{path}: no CAM file, the CAM stage failed for this image ({reason}); fix that and re-run make cams"
    return f"{path}: CAM file not found; run the CAM stage for this image (make cams)"


def load_cams(path: str | Path) -> dict[str, np.ndarray]:
    """Read and validate a CAM file; ``ValueError`` names the file and what is wrong."""
    d = load_npz(path)
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ValueError(f"{path}: not a CAM file (missing {', '.join(missing)}); delete it and re-run make cams "
                         "(a re-run keeps the files it finds)")
    keys, cams, size = d["keys"], d["cams"], d["image_size"]
    if cams.ndim != 3 or keys.shape != (cams.shape[0],) or size.shape != (2,):
        raise ValueError(f"{path}: inconsistent shapes keys {keys.shape}, cams {cams.shape}, image_size {size.shape}")
    return d


def check_cams(d: dict[str, np.ndarray], path: str | Path, num_classes: int, grid: tuple[int, int]) -> None:
    """Check loaded CAMs against the dataset: class ids within ``0..num_classes-1``, finite maps, and
    the patch grid ``grid`` = (h, w) the CAM stage gives this image. ``ValueError`` names the file."""
    keys, cams = d["keys"], d["cams"]
    bad = sorted({int(k) for k in keys if not 0 <= k < num_classes})
    if bad:
        raise ValueError(f"{path}: class ids {bad} are outside this vocabulary's 0..{num_classes - 1}; the CAMs "
                         "were made with another class list: re-run make cams into another folder or with --overwrite")
    if not np.isfinite(cams).all():
        raise ValueError(f"{path}: CAMs contain NaN or infinite values; delete the file and re-run make cams")
    if tuple(cams.shape[1:]) != tuple(grid):
        raise ValueError(f"{path}: CAMs have a {cams.shape[1]}x{cams.shape[2]} patch grid, this image gives "
                         f"{grid[0]}x{grid[1]}; the CAMs are stale or from another setting: re-run make cams into another "
                         "folder or with --overwrite")


def upsample_cams(cams: np.ndarray, image_size: tuple[int, int], dtype=np.float16) -> np.ndarray:
    """Patch-resolution CAMs (K, h, w) -> original resolution (K, H, W) as CLIP-ES's generate_cams_*.py does it:
    OpenCV INTER_LINEAR resize (half-pixel centres) of each normalised map, stacked and cast to
    ``dtype`` (float16 like the reference's files; pass np.float32 to skip that rounding)."""
    H, W = (int(v) for v in image_size)
    out = np.empty((cams.shape[0], H, W), np.float32)
    for k, cam in enumerate(np.asarray(cams, np.float32)):
        out[k] = cv2.resize(cam, (W, H), interpolation=cv2.INTER_LINEAR)
    return out.astype(dtype, copy=False)
