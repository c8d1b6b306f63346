"""Segmentation metrics as the field computes them (CLIP-ES's eval_cam.py), and the tables that report them.

One core: a confusion matrix over ``n`` classes (rows = ground truth, columns = prediction) from
pixels whose ground truth is in [0, n) (255 ignored). IoU, precision and recall all come from it,
the mmsegmentation way (``intersect_and_union``). mIoU is the nanmean over classes whose GT row
sum is > 0, so classes absent from the ground truth do not count.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..classes import IGNORE_INDEX
from ..io import write_bytes

BG_MODES = ("power", "const")
# eval_cam.py's sweeps: power tau for CAA-refined ('attn') maps, wider for raw GradCAM, constant planes.
TAUS_REFINED = (1.0, 2.0)
TAUS_RAW = tuple(float(t) for t in range(1, 11))
TAUS_CONST = tuple(round(0.05 * i, 2) for i in range(1, 13))


# --------------------------------------------------------------------------------------------- core
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """pred, gt (H, W) integer maps -> int64 (n, n) counts, rows GT class, columns predicted class.

    Pixels with GT outside [0, n) (the 255 ignore region included) are skipped. Every remaining pixel
    must have a prediction in [0, n); callers decide what a 255 prediction means (see ``pseudo_confusions``).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    keep = (gt >= 0) & (gt < num_classes) & (gt != ignore_index)
    gt, pred = gt[keep], pred[keep]
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        bad = np.unique(pred[(pred < 0) | (pred >= num_classes)])
        raise ValueError(f"prediction values {bad.tolist()} outside 0..{num_classes - 1} on evaluated pixels")
    return np.bincount(num_classes * gt + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def intersect_and_union(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Confusion (n, n) -> (intersect, union, pred_area, label_area), each int64 (n,) (mmseg's four areas)."""
    conf = np.asarray(conf, np.int64)
    intersect = np.diag(conf).copy()
    pred_area = conf.sum(axis=0)
    label_area = conf.sum(axis=1)
    return intersect, pred_area + label_area - intersect, pred_area, label_area


def class_metrics(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Confusion (n, n) -> float64 (n,) arrays 'iou', 'precision', 'recall' plus the four areas.

    IoU and recall are NaN for classes absent from the GT; precision is NaN where nothing was predicted.
    """
    inter, union, pred_area, label_area = intersect_and_union(conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(label_area > 0, inter / np.maximum(union, 1), np.nan)
        precision = np.where(pred_area > 0, inter / np.maximum(pred_area, 1), np.nan)
        recall = np.where(label_area > 0, inter / np.maximum(label_area, 1), np.nan)
    return {"iou": iou, "precision": precision, "recall": recall, "intersect": inter, "union": union,
            "pred_area": pred_area, "label_area": label_area}


def mean_iou(conf: np.ndarray) -> float:
    """Confusion (n, n) -> mIoU in [0, 1] over classes present in the GT (NaN if there are none)."""
    iou = class_metrics(conf)["iou"]
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    """Share of evaluated pixels predicted correctly (NaN when none were evaluated)."""
    total = int(np.asarray(conf).sum())
    return float(np.trace(conf) / total) if total else float("nan")


# ------------------------------------------------------------------------------------- CAM sweep
def default_taus(bg: str = "power", refined: bool = True) -> tuple[float, ...]:
    """eval_cam.py's sweep: power tau in {1, 2} for refined ('attn') CAMs, {1..10} for raw GradCAM,
    constant background planes 0.05..0.60 step 0.05."""
    if bg == "const":
        return TAUS_CONST
    if bg == "power":
        return TAUS_REFINED if refined else TAUS_RAW
    raise ValueError(f"unknown background mode {bg!r}; choose one of {BG_MODES}")


def cam_scores(cams: np.ndarray, tau: float, bg: str = "power") -> np.ndarray:
    """CAMs (K, H, W) -> scores (K+1, H, W) in the CAMs' dtype, background row first:
    (1 - max_k cam_k) ** tau ('power') or a constant tau plane ('const')."""
    if bg == "power":
        b = 1 - np.max(cams, axis=0, keepdims=True)
        b = b if tau == 1 else np.power(b, tau)
    elif bg == "const":
        b = np.full((1,) + cams.shape[1:], tau)
    else:
        raise ValueError(f"unknown background mode {bg!r}; choose one of {BG_MODES}")
    return np.concatenate([b.astype(cams.dtype, copy=False), cams], axis=0)


def cam_labels(cams: np.ndarray, keys: np.ndarray, tau: float, bg: str = "power") -> np.ndarray:
    """CAMs (K, H, W), keys (K,) -> uint8 (H, W) keys_ext[argmax]; ties go to the lowest index (background)."""
    ext = np.concatenate([[0], np.asarray(keys, np.int64) + 1])
    return ext[np.argmax(cam_scores(cams, tau, bg), axis=0)].astype(np.uint8)


def cam_sweep_confusions(cams: np.ndarray, keys: np.ndarray, gt: np.ndarray, num_classes: int,
                         taus: Sequence[float], bg: str = "power") -> np.ndarray:
    """One image: CAMs (K, H, W), GT (H, W) -> int64 (T, n, n), one confusion matrix per tau."""
    return np.stack([confusion_matrix(cam_labels(cams, keys, t, bg), gt, num_classes) for t in taus])


# ---------------------------------------------------------------------------------- pseudo labels
def pseudo_confusions(label: np.ndarray, gt: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """One pseudo label (H, W) with 255 = ignored vs GT (H, W) ->
    'confident': confusion on pixels the label keeps; 'as_bg': confusion with 255 read as background;
    'counts': int64 [pixels not 255, all pixels]."""
    if label.shape != gt.shape:
        raise ValueError(f"pseudo label {label.shape} and ground truth {gt.shape} differ in size")
    ignored = label == IGNORE_INDEX
    gt_kept = np.where(ignored, IGNORE_INDEX, gt)
    return {"confident": confusion_matrix(np.where(ignored, 0, label), gt_kept, num_classes),
            "as_bg": confusion_matrix(np.where(ignored, 0, label), gt, num_classes),
            "counts": np.array([int((~ignored).sum()), int(label.size)], np.int64)}


# ------------------------------------------------------------------------------------------ tables
def per_class_rows(conf: np.ndarray, names: Sequence[str]) -> list[dict]:
    """Confusion (n, n) and n class names -> rows {class, iou, precision, recall, gt_pixels, pred_pixels}
    with percentages (None where undefined)."""
    m = class_metrics(conf)
    pct = lambda v: None if not np.isfinite(v) else float(100.0 * v)  # noqa: E731
    return [{"class": names[c], "iou": pct(m["iou"][c]), "precision": pct(m["precision"][c]),
             "recall": pct(m["recall"][c]), "gt_pixels": int(m["label_area"][c]),
             "pred_pixels": int(m["pred_area"][c])} for c in range(len(names))]


def _cell(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts -> aligned plain-text table (for the terminal)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    cells = [[c for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(s.rjust(w) if j else s.ljust(w) for j, (s, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out) + "\n"


def csv_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else r[c]) for c in columns])
    return buf.getvalue()


def write_tables(out_dir: str | Path, stem: str, rows: Sequence[Mapping], summary: Mapping | None = None,
                 title: str = "") -> list[Path]:
    """Write ``<stem>.csv``, ``<stem>.json`` ({summary, per_class}) and ``<stem>.md`` atomically; returns the paths."""
    out_dir = Path(out_dir)
    columns = list(rows[0].keys()) if rows else []
    md = (f"# {title}\n\n" if title else "")
    if summary:
        md += "".join(f"- **{k}**: {_cell(v) if not isinstance(v, (list, dict)) else json.dumps(v)}\n"
                      for k, v in summary.items()) + "\n"
    md += markdown_table(rows, columns)
    paths = [out_dir / f"{stem}.csv", out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_bytes(paths[0], csv_table(rows, columns).encode())
    write_bytes(paths[1], (json.dumps({"summary": dict(summary or {}), "per_class": list(rows)},
                                      indent=2, allow_nan=False) + "\n").encode())
    write_bytes(paths[2], md.encode())
    return paths


def nan_to_none(values: Iterable[float]) -> list:
    """For JSON: NaN -> None."""
    return [None if not np.isfinite(v) else float(v) for v in values]


# ------------------------------------------------------------------------------- split runners
# Workers get paths, read their own files and send back small confusion matrices.
def _cam_task(task: tuple, cam_key: str, taus: Sequence[float], bg: str, num_classes: int):
    from ..data.camfile import load_cams, missing_message, upsample_cams
    from ..labels.pseudo import read_gt

    image_id, cam_path, gt_path = task
    try:
        if not Path(cam_path).is_file():
            raise FileNotFoundError(missing_message(cam_path))
        d = load_cams(cam_path)
        if cam_key not in d:
            raise ValueError(f"{cam_path}: has no {cam_key!r} array (CAM stage run without --save-init?)")
        size = tuple(int(v) for v in d["image_size"])
        gt = read_gt(gt_path, image_id, num_classes - 1, size)
        cams = upsample_cams(d[cam_key], size)  # float16, as the reference's files
        return image_id, cam_sweep_confusions(cams, d["keys"], gt, num_classes, taus, bg), None
    except Exception as e:  # one bad image must not stop the evaluation
        return image_id, None, str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"


def _pseudo_task(task: tuple, num_classes: int):
    from ..data.labelio import read_label
    from ..labels.pseudo import read_gt

    image_id, label_path, gt_path = task
    try:
        if not Path(label_path).is_file():
            raise FileNotFoundError(f"{label_path}: pseudo label not found; run the pseudo stage for this image")
        label = read_label(label_path)
        gt = read_gt(gt_path, image_id, num_classes - 1, label.shape)
        return image_id, pseudo_confusions(label, gt, num_classes), None
    except Exception as e:
        return image_id, None, str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"


def _tasks(dataset, ids: Sequence[str], folder: Path, suffix: str) -> list[tuple]:
    return [(i, str(folder / f"{i}{suffix}"), None if (g := dataset.mask_path(i)) is None else str(g)) for i in ids]


def evaluate_cams(dataset, ids: Sequence[str], cams_dir: str | Path, *, taus: Sequence[float] | None = None,
                  bg: str = "power", cam_key: str = "cams", n_jobs: int | None = None,
                  progress: bool = True) -> dict:
    """Seed quality over a split (eval_cam.py): confusion per tau, summed over images; the best tau is
    an oracle choice (picked on the evaluated labels). Returns {taus, miou, best_tau, conf, errors, ...}."""
    from ..labels.pseudo import run_tasks

    taus = tuple(taus) if taus else default_taus(bg, refined=cam_key == "cams")
    n = dataset.classes.num_classes + 1
    total = np.zeros((len(taus), n, n), np.int64)
    errors: dict[str, str] = {}
    for image_id, conf, err in run_tasks(_cam_task, _tasks(dataset, ids, Path(cams_dir), ".npz"),
                                         (cam_key, taus, bg, n), n_jobs, desc="eval cams", progress=progress):
        if err:
            errors[image_id] = err
        else:
            total += conf
    mious = [mean_iou(c) for c in total]
    best = int(np.nanargmax(mious)) if np.isfinite(mious).any() else 0
    return {"what": "cams", "bg": bg, "cam_key": cam_key, "taus": list(taus), "miou": nan_to_none(mious),
            "best_tau": taus[best], "best_miou": mious[best], "oracle": True, "conf": total[best],
            "evaluated": len(ids) - len(errors), "failed": len(errors), "errors": errors}


def evaluate_pseudo(dataset, ids: Sequence[str], pseudo_dir: str | Path, *, n_jobs: int | None = None,
                    progress: bool = True) -> dict:
    """Pseudo-label quality: mIoU on confident pixels, coverage (share of pixels not 255) and mIoU with
    255 read as background. Returns {miou_confident, coverage, miou_bg255, conf, conf_bg255, errors, ...}."""
    from ..labels.pseudo import run_tasks

    n = dataset.classes.num_classes + 1
    conf, conf_bg = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64)
    counts = np.zeros(2, np.int64)
    errors: dict[str, str] = {}
    for image_id, res, err in run_tasks(_pseudo_task, _tasks(dataset, ids, Path(pseudo_dir), ".png"), (n,), n_jobs,
                                        desc="eval pseudo", progress=progress):
        if err:
            errors[image_id] = err
        else:
            conf += res["confident"]
            conf_bg += res["as_bg"]
            counts += res["counts"]
    return {"what": "pseudo", "miou_confident": mean_iou(conf), "coverage": float(counts[0] / counts[1]) if counts[1] else float("nan"),
            "miou_bg255": mean_iou(conf_bg), "accuracy_confident": pixel_accuracy(conf), "conf": conf,
            "conf_bg255": conf_bg, "evaluated": len(ids) - len(errors), "failed": len(errors), "errors": errors}
