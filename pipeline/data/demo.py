"""A small VOC-layout dataset of real photos from scikit-image's bundled samples, for ``make demo``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..io import atomic_open

# sample name -> VOC classes present (first-appearance order, as an annotation would list them)
SAMPLES = {
    "astronaut": ["person"],
    "camera": ["person"],            # grayscale photo: exercises the L-mode path
    "chelsea": ["cat"],
    "horse": ["horse"],              # binary silhouette
    "stereo_motorcycle": ["motorbike"],
    "coffee": ["diningtable"],
}


def _sample(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo pairs: take the left view
        img = img[0]
    if img.dtype == bool:
        img = np.where(img, 0, 255).astype(np.uint8)  # dark horse on white
    return img


def make_demo_voc(root: str | Path) -> Path:
    """Write JPEGImages/, Annotations/ and demo.txt under ``root``; returns the split list path."""
    root = Path(root)
    for image_id, names in SAMPLES.items():
        img = _sample(image_id)
        path = root / "JPEGImages" / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            Image.fromarray(img).save(f, format="JPEG", quality=92)
        h, w = img.shape[:2]
        objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
        xml = (f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
               f"<depth>{3 if img.ndim == 3 else 1}</depth></size>{objs}</annotation>\n")
        xml_path = root / "Annotations" / f"{image_id}.xml"
        xml_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(xml_path) as f:
            f.write(xml.encode())
    split = root / "demo.txt"
    with atomic_open(split) as f:
        f.write("".join(f"{i}\n" for i in SAMPLES).encode())
    return split
