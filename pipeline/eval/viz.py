"""Visual checks: one panel per image and a static HTML gallery, worst images first.

Panel (left to right, each tile scaled to ``tile_h`` rows with a caption strip above):
image | one CAM heat-map per class | pseudo-label overlay | ground truth (when present).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..classes import IGNORE_INDEX, palette
from ..io import write_bytes

CAPTION_H = 20
HEAT_ALPHA = 0.5
LABEL_ALPHA = 0.55


# ------------------------------------------------------------------------------ pure drawing
def tile_size(image_size: tuple[int, int], tile_h: int) -> tuple[int, int]:
    """(H, W) -> (tile_h, tile_w) keeping the aspect ratio."""
    H, W = image_size
    return tile_h, max(1, round(W * tile_h / H))


def colorize(label: np.ndarray) -> np.ndarray:
    """uint8 (H, W) label -> (H, W, 3) uint8 RGB with the VOC palette (255 white)."""
    return palette()[label]


def heatmap(cam: np.ndarray, image_rgb: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """CAM (H, W) in [0, 1] over RGB (H, W, 3) uint8 -> (H, W, 3) uint8: JET colours blended with the image."""
    u8 = np.clip(np.asarray(cam, np.float32) * 255, 0, 255).astype(np.uint8)
    jet = cv2.applyColorMap(u8, cv2.COLORMAP_JET)[..., ::-1]
    return (alpha * jet + (1 - alpha) * image_rgb).astype(np.uint8)


def overlay(label: np.ndarray, image_rgb: np.ndarray, alpha: float = LABEL_ALPHA) -> np.ndarray:
    """Label (H, W) over RGB (H, W, 3) -> (H, W, 3) uint8; background keeps the image, 255 is white."""
    col = colorize(label).astype(np.float32)
    out = np.where((label > 0)[..., None], alpha * col + (1 - alpha) * image_rgb, image_rgb)
    out[label == IGNORE_INDEX] = 255
    return out.astype(np.uint8)


def captioned(tile: np.ndarray, text: str) -> np.ndarray:
    """(h, w, 3) tile -> (CAPTION_H + h, w, 3) with ``text`` on a white strip above it."""
    strip = np.full((CAPTION_H, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (3, CAPTION_H - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, tile], axis=0)


def make_panel(image_rgb: np.ndarray, *, keys: Sequence[int] = (), cams: np.ndarray | None = None,
               label: np.ndarray | None = None, gt: np.ndarray | None = None,
               names: Sequence[str] = (), tile_h: int = 192, banner: str = "") -> np.ndarray:
    """Image (H, W, 3) uint8, CAMs (K, H, W) at image size with their keys, label (H, W), GT (H, W) ->
    panel (CAPTION_H + tile_h, n_tiles * tile_w, 3) uint8 RGB. Missing parts are left out. A ``banner``
    (e.g. that the weights are random) is written in red on a strip above the panel."""
    th, tw = tile_size(image_rgb.shape[:2], tile_h)
    small = lambda a, interp: cv2.resize(a, (tw, th), interpolation=interp)  # noqa: E731
    img = small(image_rgb, cv2.INTER_AREA)
    name = lambda k: names[k] if 0 <= k < len(names) else str(k)  # noqa: E731
    tiles = [captioned(img, "image")]
    if cams is not None:
        for k, cam in zip(keys, cams):
            tiles.append(captioned(heatmap(small(np.asarray(cam, np.float32), cv2.INTER_LINEAR), img), f"CAM {name(int(k))}"))
    if label is not None:
        tiles.append(captioned(overlay(small(label, cv2.INTER_NEAREST), img), "pseudo label"))
    if gt is not None:
        tiles.append(captioned(colorize(small(gt, cv2.INTER_NEAREST)), "ground truth"))
    panel = np.concatenate(tiles, axis=1)
    if banner:
        strip = np.full((CAPTION_H, panel.shape[1], 3), 255, np.uint8)
        cv2.putText(strip, banner, (3, CAPTION_H - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (200, 0, 0), 1, cv2.LINE_AA)
        panel = np.concatenate([strip, panel], axis=0)
    return panel


def gallery_html(entries: Sequence[dict], title: str = "pseudo labels", banner: str = "") -> str:
    """Entries {id, panel (relative path), iou (0..1 or None)} -> static HTML, lowest IoU first
    (images without a score last); ``banner`` is shown as a warning above everything."""
    order = sorted(entries, key=lambda e: (e.get("iou") is None, e.get("iou") if e.get("iou") is not None else 0, e["id"]))
    rows = []
    for e in order:
        iou = "n/a" if e.get("iou") is None else f"{100 * e['iou']:.1f}"
        src = html.escape(str(e["panel"]), quote=True)
        rows.append(f'<figure><figcaption>{html.escape(e["id"])} &mdash; IoU {iou}</figcaption>'
                    f'<a href="{src}"><img src="{src}" loading="lazy" alt="{html.escape(e["id"])}"></a></figure>')
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif}}"
            "figure{margin:0 0 16px 0}img{max-width:100%}</style></head><body>\n"
            + (f'<p style="color:#c00;font-weight:bold;font-size:1.3em">{html.escape(banner)}</p>\n' if banner else "")
            + f"<h1>{html.escape(title)}</h1><p>{len(order)} images, sorted by per-image mIoU "
            "(pseudo label vs ground truth, 255 read as background), worst first.</p>\n"
            + "\n".join(rows) + "\n</body></html>\n")


# ------------------------------------------------------------------------------------- runner
@dataclass(frozen=True)
class VizTask:
    image_id: str
    image: str
    out: str
    cams: str | None = None
    label: str | None = None
    gt: str | None = None


def panel_one(task: VizTask, names: Sequence[str], tile_h: int,
              banner: str = "") -> tuple[str, float | None, str | None]:
    """Worker: read what exists for one image, write its panel PNG. Returns (id, IoU or None, error)."""
    from ..data.camfile import load_cams, upsample_cams
    from ..data.datasets import read_mask
    from ..data.labelio import read_label
    from .metrics import confusion_matrix, mean_iou
    from ..data.image import load_rgb

    try:
        image = load_rgb(task.image)
        size = image.shape[:2]
        keys, cams = (), None
        if task.cams and Path(task.cams).is_file():
            d = load_cams(task.cams)
            if tuple(int(v) for v in d["image_size"]) != size:
                raise ValueError(f"{task.cams}: CAMs are for size {tuple(d['image_size'])}, image is {size}")
            keys, cams = d["keys"].tolist(), upsample_cams(d["cams"], size, np.float32)
        label = read_label(task.label) if task.label and Path(task.label).is_file() else None
        gt = read_mask(Path(task.gt), len(names)) if task.gt and Path(task.gt).is_file() else None
        if cams is None and label is None:
            raise FileNotFoundError(f"image {task.image_id}: neither a CAM file nor a pseudo label to show")
        for what, a in (("pseudo label", label), ("ground truth", gt)):
            if a is not None and a.shape != size:
                raise ValueError(f"image {task.image_id}: {what} size {a.shape} differs from the image {size}")
        iou = None
        if label is not None and gt is not None:
            v = mean_iou(confusion_matrix(np.where(label == IGNORE_INDEX, 0, label), gt, len(names) + 1))
            iou = None if math.isnan(v) else v
        panel = make_panel(image, keys=keys, cams=cams, label=label, gt=gt, names=names, tile_h=tile_h, banner=banner)
        ok, png = cv2.imencode(".png", np.ascontiguousarray(panel[..., ::-1]))
        if not ok:
            raise RuntimeError("OpenCV failed to encode the panel")
        write_bytes(task.out, png.tobytes())
        return task.image_id, iou, None
    except Exception as e:
        return task.image_id, None, str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"


def run_viz(dataset, ids: Sequence[str], out_dir: str | Path, *, cams_dir: str | Path | None = None,
            pseudo_dir: str | Path | None = None, tile_h: int = 192, n_jobs: int | None = None,
            progress: bool = True, banner: str = "") -> dict:
    """Write ``<out_dir>/<id>.png`` panels and ``<out_dir>/index.html``; returns {done, failed, errors, index}.
    ``banner``: a warning printed on every panel and atop the page (the demo's random weights)."""
    from ..io import write_errors
    from ..labels.pseudo import run_tasks

    out_dir = Path(out_dir)
    tasks = []
    for i in ids:
        gt = dataset.mask_path(i)
        tasks.append(VizTask(i, str(dataset.image_path(i)), str(out_dir / f"{i}.png"),
                             str(Path(cams_dir) / f"{i}.npz") if cams_dir else None,
                             str(Path(pseudo_dir) / f"{i}.png") if pseudo_dir else None,
                             None if gt is None else str(gt)))
    entries, errors = [], {}
    for image_id, iou, err in run_tasks(panel_one, tasks, (list(dataset.classes.names), tile_h, banner), n_jobs,
                                        desc="viz", progress=progress):
        if err:
            errors[image_id] = err
        else:
            entries.append({"id": image_id, "panel": f"{image_id}.png", "iou": iou})
    index = out_dir / "index.html"
    write_bytes(index, gallery_html(entries, f"{dataset.name} pseudo labels", banner).encode())
    write_errors(out_dir, errors)
    return {"done": len(entries), "failed": len(errors), "errors": errors, "index": str(index)}
