"""Label PNGs: 0 background, c + 1 class c, 255 ignore; encoded in memory, written atomically.

'palette' writes P-mode PNGs with the VOC colour map (255 shown white): PIL and mmsegmentation read
the indices back, OpenCV reads the colours. 'gray' writes single-channel 8-bit PNGs like the
reference's ``cv2.imwrite``.
"""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..classes import palette
from ..io import write_bytes

FORMATS = ("palette", "gray")


def encode_label(label: np.ndarray, fmt: str = "palette") -> bytes:
    """uint8 (H, W) label map -> PNG bytes in ``fmt`` ('palette' | 'gray')."""
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"a label map must be uint8 (H, W), got {label.dtype} {label.shape}")
    if fmt == "palette":
        im = Image.fromarray(np.ascontiguousarray(label))  # mode L; putpalette turns it into P
        im.putpalette(palette().reshape(-1).tolist())
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()
    if fmt == "gray":
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(label))
        if not ok:
            raise RuntimeError("OpenCV failed to encode a PNG")
        return buf.tobytes()
    raise ValueError(f"unknown label format {fmt!r}; choose one of {FORMATS}")


def write_label(path: str | Path, label: np.ndarray, fmt: str = "palette") -> None:
    """Encode ``label`` (uint8 (H, W)) and write it to ``path`` atomically."""
    write_bytes(path, encode_label(label, fmt))


def read_label(path: str | Path) -> np.ndarray:
    """A label PNG (P or L mode) -> uint8 (H, W) indices; ``ValueError`` naming the file otherwise."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"{path}: label PNG has mode {im.mode}; expected P (palette) or L (gray)")
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot decode label PNG ({e})") from e
