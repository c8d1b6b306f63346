"""Synthetic scenes with known answers, for tests and benchmarks (no dataset download needed).

``make_scenes`` draws coloured shapes (ellipses, rectangles, triangles) on textured backgrounds and
writes them in the VOC layout::

    <root>/JPEGImages/<id>.jpg              the image
    <root>/SegmentationClass/<id>.png       palette PNG: 0 background, c + 1 class c, 255 object borders
    <root>/Annotations/<id>.xml             <size> and one <object><name> per visible shape
    <root>/ImageSets/Segmentation/<split>.txt

so ``datasets.build_dataset('voc', root)`` reads it with ``split=<root>/ImageSets/Segmentation/<split>.txt``.
``make_noisy_cams`` turns the ground truth into CAM files (camfile contract) the way real CAMs are
wrong: shifted, blurred, noisy, with spurious blobs, at patch resolution, and optionally with the
CAMs of two co-occurring classes traded (``swap_cooccurring``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .camfile import save_cams
from ..classes import IGNORE_INDEX, ClassList, builtin
from .datasets import VOCDataset, read_id_list, read_mask
from ..io import write_bytes
from .labelio import write_label

PATCH = 16
SHAPES = ("ellipse", "rectangle", "triangle")


def split_file(root: str | Path, split: str = "train") -> Path:
    """Where ``make_scenes`` writes the id list of ``split``."""
    return Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"


# ------------------------------------------------------------------------------ pure generators
def class_colour(c: int, num_classes: int) -> np.ndarray:
    """A saturated RGB colour (3,) uint8 for class ``c``: hues spread evenly over the classes."""
    hsv = np.array([[[int(180 * c / num_classes), 220, 230]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]


def textured_background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a dull base colour, a low-frequency shading field, stripes and grain."""
    H, W = size
    base = rng.uniform(60, 170, 3) * rng.uniform(0.6, 1.0, 3)
    low = cv2.resize(rng.normal(0, 1, (max(2, H // 24), max(2, W // 24), 3)).astype(np.float32), (W, H),
                     interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 18)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)[..., None]
    img = base + 18 * low + 10 * stripes + rng.normal(0, 6, (H, W, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_shape(mask: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Fill one random shape of ``kind`` with 1 in ``mask`` (H, W) uint8, in place."""
    H, W = mask.shape
    s = min(H, W)
    cy, cx = rng.uniform(0.2, 0.8) * H, rng.uniform(0.2, 0.8) * W
    ry, rx = rng.uniform(0.12, 0.3) * s, rng.uniform(0.12, 0.3) * s
    if kind == "ellipse":
        cv2.ellipse(mask, (int(cx), int(cy)), (int(rx), int(ry)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == "rectangle":
        cv2.rectangle(mask, (int(cx - rx), int(cy - ry)), (int(cx + rx), int(cy + ry)), 1, -1)
    elif kind == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + rx * 1.3 * math.cos(a + k * 2 * math.pi / 3), cy + ry * 1.3 * math.sin(a + k * 2 * math.pi / 3))
               for k in range(3)]
        cv2.fillPoly(mask, [np.array(pts, np.int32)], 1)
    else:
        raise ValueError(f"unknown shape {kind!r}; choose one of {SHAPES}")


def render_scene(rng: np.random.Generator, size: tuple[int, int], num_classes: int, max_objects: int = 3,
                 min_pixels: int = 40, border: int = 1) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One scene -> (image (H, W, 3) uint8 RGB, GT (H, W) uint8, visible classes in drawing order).

    Objects are drawn over each other (later ones occlude); a class counts as present when at least
    ``min_pixels`` of it stay visible. GT pixels within ``border`` of a class edge are 255, as in VOC.
    """
    H, W = size
    for _ in range(100):
        img = textured_background(rng, size).astype(np.float32)
        gt = np.zeros((H, W), np.uint8)
        n_obj = int(rng.integers(1, max_objects + 1))
        classes = rng.choice(num_classes, size=n_obj, replace=False)
        for c in classes:
            m = np.zeros((H, W), np.uint8)
            draw_shape(m, SHAPES[int(rng.integers(len(SHAPES)))], rng)
            colour = class_colour(int(c), num_classes).astype(np.float32) * rng.uniform(0.85, 1.0)
            # Shading and grain so objects are not flat: the CRF must work with colour similarity.
            grain = rng.normal(0, 1, (H, W)).astype(np.float32)
            shade = 1 + 0.12 * cv2.GaussianBlur(grain, (0, 0), min(H, W) / 8)[..., None]
            obj = np.clip(colour * shade + rng.normal(0, 5, (H, W, 3)), 0, 255)
            sel = m.astype(bool)
            img[sel] = obj[sel]
            gt[sel] = c + 1
        present = [int(c) for c in classes if (gt == c + 1).sum() >= min_pixels]
        if present:
            break
    else:  # pragma: no cover - 100 failed draws are practically impossible at sane sizes
        raise RuntimeError(f"could not draw a scene of size {size}")
    for c in np.setdiff1d(np.unique(gt), [0] + [p + 1 for p in present]):
        gt[gt == c] = 0  # a class hidden below min_pixels reads as background, like an unlabelled object
    if border:
        k = np.ones((2 * border + 1, 2 * border + 1), np.uint8)
        edge = cv2.dilate(gt, k) != cv2.erode(gt, k)
        gt[edge] = IGNORE_INDEX
    return np.clip(img, 0, 255).astype(np.uint8), gt, present


def annotation_xml(image_id: str, size: tuple[int, int], names: Sequence[str]) -> str:
    """VOC-style annotation with <size> and one <object><name> per entry of ``names`` (in order)."""
    H, W = size
    objs = "".join(f"  <object>\n    <name>{n}</name>\n    <difficult>0</difficult>\n  </object>\n" for n in names)
    return (f"<annotation>\n  <filename>{image_id}.jpg</filename>\n  <size>\n    <width>{W}</width>\n"
            f"    <height>{H}</height>\n    <depth>3</depth>\n  </size>\n{objs}</annotation>\n")


def noisy_cam(mask: np.ndarray, rng: np.random.Generator, blur: float, offset: float, noise: float,
              spurious: float) -> np.ndarray:
    """Binary mask (H, W) -> float32 (h, w) CAM at patch resolution, min-max normalised.

    Shifted by up to ``offset`` * min(H, W) pixels, Gaussian-blurred with sigma ``blur`` * min(H, W),
    plus a spurious blob (probability ``spurious``), averaged to the 16-pixel patch grid, plus
    Gaussian noise of std ``noise``; then min-max normalised like the CAM stage's output.
    """
    H, W = mask.shape
    s = min(H, W)
    dy, dx = (rng.uniform(-offset, offset, 2) * s).round()
    shifted = cv2.warpAffine(mask.astype(np.float32), np.float32([[1, 0, dx], [0, 1, dy]]), (W, H),
                             flags=cv2.INTER_NEAREST, borderValue=0)
    cam = cv2.GaussianBlur(shifted, (0, 0), max(blur * s, 0.5))
    if rng.random() < spurious:
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(0.05, 0.12) * s
        cam += rng.uniform(0.3, 0.6) * cam.max() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    h, w = math.ceil(H / PATCH), math.ceil(W / PATCH)
    cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_AREA)
    cam = np.maximum(cam + rng.normal(0, noise, cam.shape).astype(np.float32) * cam.max(), 0)
    return ((cam - cam.min()) / (cam.max() - cam.min() + 1e-7)).astype(np.float32)


def swap_cooccurring(cams: np.ndarray, visible: Sequence[bool], rng: np.random.Generator, p: float) -> np.ndarray:
    """(K, h, w) CAMs of one image -> a copy in which, with probability ``p``, the CAMs of two classes
    visible in the image (``visible`` (K,)) trade places: the classifier fires for each class on the
    other's object, the confusion of co-occurring classes that no affinity or colour refinement of
    one image can undo (its regions are right, their classes wrong), while a model trained on many
    images sees each class on the right object most of the time.

    No random number is drawn when ``p`` is 0 or fewer than two classes are visible, so the default
    leaves every other draw of the caller's generator as it was.
    """
    seen = np.flatnonzero(np.asarray(visible, bool))
    out = cams.copy()
    if p <= 0 or len(seen) < 2 or rng.random() >= p:
        return out
    a, b = rng.choice(seen, 2, replace=False)
    out[[a, b]] = cams[[b, a]]
    return out


# -------------------------------------------------------------------------------------- writers
def make_scenes(root: str | Path, n: int, size: tuple[int, int] = (96, 128), seed: int = 0, *,
                classes: ClassList | None = None, max_objects: int = 3, split: str = "train",
                prefix: str = "syn", jpeg_quality: int = 95) -> list[str]:
    """Write ``n`` scenes of ``size`` = (H, W) in the VOC layout under ``root``; returns their ids.

    Deterministic for a given seed. Class names come from ``classes`` (default: the VOC list).
    """
    root = Path(root)
    classes = classes or builtin("voc")
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        image_id = f"{prefix}_{i:05d}"
        img, gt, present = render_scene(rng, size, classes.num_classes, max_objects)
        ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise RuntimeError("OpenCV failed to encode a JPEG")
        write_bytes(root / "JPEGImages" / f"{image_id}.jpg", jpg.tobytes())
        write_label(root / "SegmentationClass" / f"{image_id}.png", gt, "palette")
        xml = annotation_xml(image_id, size, [classes.names[c] for c in present])
        write_bytes(root / "Annotations" / f"{image_id}.xml", xml.encode())
        ids.append(image_id)
    write_bytes(split_file(root, split), ("\n".join(ids) + "\n").encode())
    return ids


def make_noisy_cams(root: str | Path, out_dir: str | Path, ids: Sequence[str] | None = None, *,
                    split: str = "train", seed: int = 0, blur: float = 0.04, offset: float = 0.03,
                    noise: float = 0.05, spurious: float = 0.3, swap: float = 0.0,
                    classes: ClassList | None = None) -> list[str]:
    """For each scene id (default: the ``split`` list), write ``<out_dir>/<id>.npz`` CAMs made from its GT.

    Keys follow the annotation order (as the CAM stage reads them); each class's CAM is ``noisy_cam``
    of its GT mask, then ``swap_cooccurring`` with probability ``swap``. Returns the ids written.
    """
    root, out_dir = Path(root), Path(out_dir)
    ds = VOCDataset(root, classes)
    ids = list(ids) if ids is not None else read_id_list(split_file(root, split))
    rng = np.random.default_rng(seed)
    for image_id in ids:
        gt = read_mask(ds.mask_path(image_id), ds.classes.num_classes)
        keys = np.asarray(ds.labels(image_id), np.int64)
        cams = np.stack([noisy_cam((gt == k + 1).astype(np.uint8), rng, blur, offset, noise, spurious) for k in keys])
        cams = swap_cooccurring(cams, [(gt == k + 1).any() for k in keys], rng, swap)
        save_cams(out_dir / f"{image_id}.npz", keys, cams, gt.shape)
    return ids


def scene_with_cams(rng: np.random.Generator, size: tuple[int, int], num_labels: int, num_classes: int = 20,
                    **noise) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An in-memory scene with ``num_labels`` (1..num_classes) image labels -> (image (H, W, 3) uint8 RGB,
    keys (K,) int64, patch-resolution CAMs (K, h, w) float32), for CRF comparisons.

    Up to three labels are drawn objects; the others are labels without a visible object, whose CAMs
    are ``noisy_cam`` of a random shape (a false positive of the classifier). ``noise``: ``noisy_cam``
    arguments (defaults as ``make_noisy_cams``).
    """
    if not 1 <= num_labels <= num_classes:
        raise ValueError(f"num_labels must be in 1..{num_classes}, got {num_labels}")
    args = {"blur": 0.04, "offset": 0.03, "noise": 0.05, "spurious": 0.3, **noise}
    img, gt, present = render_scene(rng, size, num_classes, min(3, num_labels))
    others = [c for c in rng.permutation(num_classes).tolist() if c not in present]
    keys = (list(present) + others)[:num_labels]
    cams = []
    for k in keys:
        mask = (gt == k + 1).astype(np.uint8)
        if k not in present:
            draw_shape(mask, SHAPES[int(rng.integers(len(SHAPES)))], rng)
        cams.append(noisy_cam(mask, rng, **args))
    return img, np.asarray(keys, np.int64), np.stack(cams)
