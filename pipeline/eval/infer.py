"""Inference for trained segmentation models: multi-scale + flip, sliding window, optional dense CRF,
palette PNG outputs, and mIoU against ground truth through ``pipeline.eval.metrics`` (as WeCLIP's
test_msc_flip_voc.py and deeplab-pytorch's test script).

Per image: optional resize of the long side (WeCLIP: 512), then for each scale s the logits of the
image and of its mirror (flipped back) are averaged, resized to the image size, averaged over scales,
softmaxed; the CRF (when on) refines these probabilities with the guide image and parameters of its
preset (default by model family: WeCLIP's for weclip models, ExCEL's for excel, deeplab-pytorch's for DeepLab).
``square`` instead resizes the whole image to a square of side square·s at each scale (ExCEL's
protocol, preset ``excel``: 320 x {0.7, 1.0, 1.2, 1.5}, no mirror at 1.0), which distorts the aspect
ratio; the default keeps it.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt_io
from ..classes import IGNORE_INDEX
from ..labels.crf import (BACKENDS, DEFAULT_MAX_PIXELS, CRFParams, capped_size, crf_scores, guide_image, preset,
                          resolve_backend, scores_argmax)
from ..labels.crf.torch_backend import dense_crf_images
from ..data.image import load_rgb
from ..io import BackgroundWriter, write_bytes
from ..data.labelio import FORMATS, write_label
from ..data.segdata import normalize
from .viz import overlay


AVERAGE_AT = ("image", "logits")


@dataclass(frozen=True)
class InferConfig:
    """scales: relative to the (resized) image; long_side: resize the long side to this first (None: keep);
    square: instead resize the image to a square of side int(square·s) at each scale s (None: keep the
    aspect ratio); unflipped_scales: scales at which the mirrored image is not added even with ``flip``;
    window/stride: sliding-window tile and step in pixels when a side exceeds ``window`` (None: whole image);
    crf: dense CRF on the softmax with ``crf_preset`` (None: by model family, see ``crf_preset_for``),
    ``crf_params`` overriding the preset's numbers, on ``crf_backend`` ('auto' | 'torch' | 'pydensecrf'),
    images above ``crf_max_pixels`` through a scaled-down CRF (``crf.crf_scores``); average_at: 'image'
    (each scale's logits resized to the image, then averaged) or 'logits' (WeCLIP's test script: each
    scale's patch-resolution logits resized to the first scale's logit grid, averaged, resized once to the
    image; models with ``forward_patch_logits``, no sliding window)."""

    scales: tuple[float, ...] = (1.0, 0.75)
    flip: bool = True
    long_side: int | None = None
    square: int | None = None
    unflipped_scales: tuple[float, ...] = ()
    window: int | None = None
    stride: int | None = None
    crf: bool = False
    crf_preset: str | None = None
    crf_params: CRFParams | None = None
    crf_backend: str = "auto"
    crf_max_pixels: int | None = DEFAULT_MAX_PIXELS
    normalize: str = "imagenet"
    batch_tiles: int = 4
    average_at: str = "image"

    def __post_init__(self) -> None:
        if self.average_at not in AVERAGE_AT:
            raise ValueError(f"inference average_at must be one of {AVERAGE_AT}, got {self.average_at!r}")
        if self.average_at == "logits" and self.window is not None:
            raise ValueError("inference average_at: logits averages whole-image patch logits; set window: null")
        if self.crf_preset is not None:
            preset(self.crf_preset)
        if self.crf_backend not in BACKENDS:
            raise ValueError(f"crf_backend must be one of {BACKENDS}, got {self.crf_backend!r}")
        if self.square is not None and self.long_side is not None:
            raise ValueError("inference: give either square (fixed square input) or long_side, not both")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, model: str | None = None) -> "InferConfig":
        """From a checkpoint's ``infer`` section and overrides; ``model`` (its model name) picks the default
        CRF preset."""
        d = dict(d or {})
        if "crf_params" in d and isinstance(d["crf_params"], dict):
            d["crf_params"] = CRFParams(**d["crf_params"])
        for key in ("scales", "unflipped_scales"):
            if key in d:
                d[key] = tuple(float(s) for s in d[key] or ())
        if d.get("crf_preset") is None and model:
            d["crf_preset"] = crf_preset_for(model)
        return cls(**d)

    def crf_setup(self) -> tuple[CRFParams, str]:
        """(parameters, guide) of the CRF: the preset's, with ``crf_params`` overriding its numbers."""
        pre = preset(self.crf_preset or "deeplab")
        return self.crf_params or pre.params, pre.guide

    def resolved(self, device) -> "InferConfig":
        """'auto' replaced by the CRF backend that runs on ``device`` (recorded in manifests)."""
        if not self.crf:
            return self
        note = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
        return replace(self, crf_backend=resolve_backend(self.crf_backend, device, log=note))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def crf_preset_for(model: str) -> str:
    """The CRF preset of a model family: WeCLIP's for weclip models, ExCEL's for excel, deeplab-pytorch's
    otherwise."""
    if model.startswith("weclip"):
        return "weclip"
    return "excel" if model == "excel" else "deeplab"


# Named inference protocols (``--preset``), applied over a checkpoint's stored settings.
INFER_PRESETS: dict[str, dict[str, Any]] = {
    # ExCEL's test script: square 320 x {0.7, 1.0, 1.2, 1.5}, mirrored except at 1.0
    "excel": {"square": 320, "long_side": None, "scales": (0.7, 1.0, 1.2, 1.5), "flip": True,
              "unflipped_scales": (1.0,), "window": None},
}


def infer_preset(name: str) -> dict[str, Any]:
    """The ``InferConfig`` fields of inference preset ``name``."""
    if name not in INFER_PRESETS:
        raise ValueError(f"unknown inference preset {name!r}; choose one of {', '.join(INFER_PRESETS)}")
    return dict(INFER_PRESETS[name])


# ------------------------------------------------------------------------------------ pure parts
def tile_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of tiles of ``window`` along a side of ``size`` with step ``stride``, the last
    tile flush with the end (so every pixel is covered)."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


@torch.no_grad()
def window_logits(model: nn.Module, x: torch.Tensor, window: int | None, stride: int | None,
                  batch_tiles: int = 4) -> torch.Tensor:
    """x (1, 3, H, W) -> logits (1, C, H, W); tiles of ``window`` averaged where they overlap when a
    side exceeds the window, one forward otherwise."""
    H, W = x.shape[-2:]
    if window is None or (H <= window and W <= window):
        return model(x).float()
    stride = stride or max(1, window * 2 // 3)
    boxes = [(y, xx) for y in tile_starts(H, window, stride) for xx in tile_starts(W, window, stride)]
    out, count = None, torch.zeros(1, 1, H, W, device=x.device)
    for i in range(0, len(boxes), batch_tiles):
        chunk = boxes[i:i + batch_tiles]
        tiles = torch.cat([x[..., y:y + window, xx:xx + window] for y, xx in chunk])
        logits = model(tiles).float()
        if out is None:
            out = torch.zeros(1, logits.shape[1], H, W, device=x.device)
        for t, (y, xx) in enumerate(chunk):
            h, w = logits.shape[-2:]
            out[..., y:y + h, xx:xx + w] += logits[t:t + 1]
            count[..., y:y + h, xx:xx + w] += 1
    return out / count


def require_patch_logits(model: nn.Module) -> int:
    """The model's patch size, or a clear error when it has no patch-resolution logits."""
    if not (hasattr(model, "forward_patch_logits") and hasattr(model, "patch")):
        raise ValueError(f"inference average_at: logits needs a model with patch-resolution logits "
                         f"(forward_patch_logits), which {type(model).__name__} lacks; use average_at: image")
    return model.patch


def patch_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (1, 3, H, W) -> the model's patch-resolution logits (1, C, H // p, W // p) float32; the last
    H mod p rows and W mod p columns are dropped, as a stride-p patch embedding does."""
    p = require_patch_logits(model)
    H, W = x.shape[-2:]
    return model.forward_patch_logits(x[..., :H // p * p, :W // p * p]).float()


def views_logits(forward: Callable[[torch.Tensor], torch.Tensor], xs: torch.Tensor, mirror: bool,
                 batch_mirror: bool) -> torch.Tensor:
    """xs (1, 3, h, w) -> logits (1, C, h', w'): ``forward(xs)``, averaged with the mirror's (flipped back)
    when ``mirror``; ``batch_mirror`` runs both views as one batch of 2 (equal up to float rounding, see
    ``msc_logits``)."""
    if not mirror:
        return forward(xs)
    if batch_mirror:
        both = forward(torch.cat([xs, xs.flip(-1)]))
        return (both[:1] + both[1:].flip(-1)) / 2
    return (forward(xs) + forward(xs.flip(-1)).flip(-1)) / 2


@torch.no_grad()
def msc_logits(model: nn.Module, x: torch.Tensor, cfg: InferConfig, batch_mirror: bool = False) -> torch.Tensor:
    """x (1, 3, H, W) normalised -> logits (1, C, H, W): mean over scales of (logits + flipped logits)/2
    (logits alone at ``unflipped_scales``), averaged at the image size or, with ``average_at: logits``,
    at the first scale's patch-logit grid and then resized once.

    ``batch_mirror``: each scale's image and its mirror in one forward of batch 2 (fewer, fuller launches on
    a GPU). Equal to two forwards of batch 1 only up to float rounding (a batch may take other kernels;
    measured on the CPU with tiny WeCLIP, ExCEL and DeepLab models at VOC size: at most 2.4e-7 on logits
    near 1, no label changed); whole images only (a sliding window keeps batch 1)."""
    H, W = x.shape[-2:]
    base = x
    if cfg.long_side:
        r = cfg.long_side / max(H, W)
        base = F.interpolate(x, size=(int(H * r), int(W * r)), mode="bilinear", align_corners=False)
    if cfg.average_at == "logits":
        forward = lambda xs: patch_logits(model, xs)  # noqa: E731
    else:
        forward = lambda xs: window_logits(model, xs, cfg.window, cfg.stride, cfg.batch_tiles)  # noqa: E731
    total, size = None, (H, W)
    for s in cfg.scales:
        if cfg.square:
            side = int(cfg.square * s)
            xs = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        else:
            xs = base if s == 1.0 else F.interpolate(base, scale_factor=s, mode="bilinear", align_corners=False)
        whole = cfg.window is None or max(xs.shape[-2:]) <= cfg.window
        logits = views_logits(forward, xs, cfg.flip and s not in cfg.unflipped_scales, batch_mirror and whole)
        if total is None and cfg.average_at == "logits":
            size = logits.shape[-2:]
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        total = logits if total is None else total + logits
    total = total / len(cfg.scales)
    return F.interpolate(total, size=(H, W), mode="bilinear", align_corners=False) if size != (H, W) else total


def crf_refine(image_rgb: np.ndarray, probs: np.ndarray, params: CRFParams, guide: str = "wrapped",
               backend: str = "auto", device=None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 (H, W, 3), softmax probabilities float (C, H, W) -> CRF marginals float32 (C, h, w)
    ((h, w) = (H, W) unless capped by ``max_pixels``; ``crf.scores_argmax`` upsamples)."""
    return crf_scores(image_rgb, probs.astype(np.float32), params, guide=guide, backend=backend, device=device,
                      max_pixels=max_pixels)


def device_crf(cfg: InferConfig, device: torch.device, size: tuple[int, int]) -> bool:
    """Whether an image of ``size`` (H, W) keeps its probabilities on ``device`` for the CRF: the torch
    backend on an accelerator and no down-scaling by ``crf_max_pixels`` (cv2's area resize is the host
    path's). On the CPU the host path already is the device's."""
    return (cfg.crf and cfg.crf_backend == "torch" and device.type != "cpu"
            and capped_size(*size, cfg.crf_max_pixels) == tuple(size))


NON_FINITE = "probabilities contain NaN or Inf: the CAMs or model outputs are broken"


@torch.no_grad()
def device_unary(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (C, H, W) -> (unary -log(clip(softmax, 1e-5, 1)) float32 (C, H, W), 0-dim bool: all
    probabilities finite), on the logits' device without a host read. The host path's ``crf.unary_energy``
    in torch's float32 log, which may differ from numpy's in the last bit."""
    probs = torch.softmax(logits.float(), dim=0)
    return -torch.log(probs.clamp(1e-5, 1)), torch.isfinite(probs).all()


@torch.no_grad()
def crf_labels_on_device(unaries: Sequence[torch.Tensor], guides: Sequence[torch.Tensor],
                         params: CRFParams) -> list[torch.Tensor]:
    """Finite unaries (C, H_i, W_i) and guides (H_i, W_i, 3) uint8 on one device -> uint8 (H_i, W_i) argmax of
    each image's CRF marginals (first maximum on ties, as ``np.argmax``), in one batch
    (``dense_crf_images``: each image's marginals equal its own CRF's)."""
    dev = unaries[0].device
    qs = dense_crf_images(unaries, [g.to(dev, non_blocking=True) for g in guides], params)
    return [q.argmax(dim=0).to(torch.uint8) for q in qs]


def predict_image(model: nn.Module, image_rgb: np.ndarray, cfg: InferConfig, device: torch.device,
                  x: torch.Tensor | None = None, batch_mirror: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> uint8 (H, W) label map (0 background, c + 1 class c).

    ``x``: the image already normalised (1, 3, H, W) on the host (``prepare``; made here when not given).
    With ``device_crf`` the softmax, CRF and argmax stay on the device and only the label is read back.
    ``batch_mirror``: see ``msc_logits``."""
    if x is None:
        x = normalize(image_rgb, cfg.normalize)[None]
    logits = msc_logits(model, x.to(device, non_blocking=True), cfg, batch_mirror)[0]
    if cfg.crf:
        params, kind = cfg.crf_setup()
        if device_crf(cfg, device, image_rgb.shape[:2]):
            unary, finite = device_unary(logits)
            if not finite:
                raise ValueError(NON_FINITE)
            guide = torch.from_numpy(np.array(guide_image(image_rgb, kind)))
            return crf_labels_on_device([unary], [guide], params)[0].cpu().numpy()
        probs = torch.softmax(logits, dim=0).cpu().numpy()
        q = crf_refine(image_rgb, probs, params, kind, cfg.crf_backend, device, cfg.crf_max_pixels)
        return scores_argmax(q, image_rgb.shape[:2])[0].astype(np.uint8)
    return logits.argmax(dim=0).byte().cpu().numpy()


# ---------------------------------------------------------------------------------- model files
def infer_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or by default CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def checkpoint_infer_config(meta: dict[str, Any], overrides: dict[str, Any] | InferConfig | None = None,
                            device: str | torch.device | None = None) -> InferConfig:
    """Inference settings for a checkpoint (its ``meta``): those stored at training time, then
    ``overrides`` (a dict of ``InferConfig`` fields, or a whole ``InferConfig``); the input convention is
    always the one the model was trained with (``ValueError`` when an override differs). With ``device``
    the CRF backend is resolved for it, as predictions and manifests use it: the stages call this before
    loading the model, so a refused output folder costs no prediction."""
    norm = meta.get("normalize", "imagenet")
    overrides = dict(overrides.as_dict() if isinstance(overrides, InferConfig) else overrides or {})
    if overrides.get("normalize", norm) != norm:
        raise ValueError(f"this model was trained on {norm!r} inputs; it cannot be fed {overrides['normalize']!r}")
    family = meta.get("family") or meta.get("model", {}).get("name")
    cfg = InferConfig.from_dict({**meta.get("infer", {}), **overrides, "normalize": norm}, model=family)
    return cfg if device is None else cfg.resolved(infer_device(device))


def load_model(checkpoint: str | Path | Mapping[str, Any], device: str | torch.device = "cpu",
               clip: str | Path | None = None, log: Callable[[str], None] = print,
               dino: str | Path | None = None) -> tuple[nn.Module, dict]:
    """(eval-mode model on ``device``, checkpoint meta) from a checkpoint file or run folder, or a
    checkpoint already read with ``checkpoint.load``.

    ``clip`` overrides the CLIP checkpoint path stored in a WeCLIP checkpoint (e.g. on another machine); a
    file whose content differs from the run's CLIP is refused (``checkpoint.check_clip``). ``dino`` does the
    same for WeCLIP+'s DINOv2 file (``checkpoint.check_dino``); each is refused for a model without one."""
    from ..models import build_model

    ck = checkpoint if isinstance(checkpoint, Mapping) else ckpt_io.load(checkpoint)
    meta = ck["meta"]
    model_cfg = dict(meta["model"])
    if clip:
        if not model_cfg.get("clip"):
            raise ckpt_io.CheckpointMismatch(f"{ck['path']}: a '{model_cfg.get('name')}' model, which has no CLIP to "
                                             f"replace; drop --clip {clip} (make: unset CLIP)")
        model_cfg["clip"] = str(clip)
    ckpt_io.check_clip(meta, model_cfg.get("clip"), ck["path"])
    dino_file = ckpt_io.check_dino(meta, dino, ck["path"])
    if dino_file is not None:
        model_cfg["dino"] = str(dino_file)
    model_cfg["pretrained"] = None  # the checkpoint holds the trained weights
    model = build_model(model_cfg, int(meta["num_classes"]), log=lambda *_: None)
    ckpt_io.load_model_state(model, ck["model"], ck["path"])
    log(f"model {model_cfg['name']} from {ck['path']} (iteration {ck.get('iteration')})")
    return model.to(device).eval(), meta


# --------------------------------------------------------------------------------- split runners
def prepare(dataset, image_id: str, cfg: InferConfig, device: torch.device, classes: int | None) -> dict[str, Any]:
    """One image read for ``predict_split`` (in a reader thread): {image uint8 (H, W, 3), mask uint8 (H, W) or
    None, x normalised (1, 3, H, W) host tensor, guide (H, W, 3) uint8 host tensor when the CRF runs on the
    device, else None (tensors pinned for an asynchronous copy to CUDA)}. ``classes``: foreground classes of the mask to read
    (None: no mask). ``ValueError`` / ``OSError`` for an unreadable image or mask."""
    from ..data.datasets import read_mask

    image = load_rgb(dataset.image_path(image_id))
    mask = None
    if classes is not None:
        path = dataset.mask_path(image_id)
        if path is None:
            raise FileNotFoundError(f"image {image_id}: no ground-truth mask to evaluate against")
        mask = read_mask(Path(path), classes)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{path}: mask size {mask.shape} differs from the image {image.shape[:2]}")
    x = normalize(image, cfg.normalize)[None]
    guide = None
    if device_crf(cfg, device, image.shape[:2]):   # a copy: the decoded array is read-only
        guide = torch.from_numpy(np.array(guide_image(image, cfg.crf_setup()[1])))
    pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)  # noqa: E731
    return {"image": image, "mask": mask, "x": pin(x), "guide": None if guide is None else pin(guide)}


def read_ahead(load: Callable[[str], Any], ids: Sequence[str], threads: int, ahead: int):
    """Yield (id, load(id) or the ``ValueError`` / ``OSError`` it raised) in ``ids`` order, ``load`` running
    in ``threads`` threads at most ``ahead`` ids ahead of the consumer (decoding releases the GIL)."""
    from collections import deque

    def guarded(image_id):
        try:
            return load(image_id)
        except (ValueError, OSError) as e:
            return e

    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="reader")
    try:
        rest = iter(ids)
        pending = deque((i, pool.submit(guarded, i)) for _, i in zip(range(max(1, ahead)), rest))
        while pending:
            image_id, fut = pending.popleft()
            for i in rest:
                pending.append((i, pool.submit(guarded, i)))
                break
            yield image_id, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_overlay(path: Path, label: np.ndarray, image: np.ndarray, image_id: str) -> None:
    """The labels blended over the image, as a JPEG at ``path`` (atomic)."""
    ok, jpg = cv2.imencode(".jpg", overlay(label, image)[..., ::-1])
    if not ok:
        raise ValueError(f"image {image_id}: could not encode its overlay")
    write_bytes(path, jpg.tobytes())


def predict_split(model: nn.Module, dataset, ids: Sequence[str], out_dir: str | Path, cfg: InferConfig,
                  device: torch.device, fmt: str = "palette", gt: bool = False, overwrite: bool = True,
                  progress: bool = True, overlay_dir: str | Path | None = None, readers: int = 4,
                  writers: int = 4, batch_mirror: bool | None = None, crf_batch: int = 8) -> dict[str, Any]:
    """Predict every id; writes ``<out_dir>/<id>.png`` (``fmt`` palette/gray) atomically, and with
    ``overlay_dir`` a JPEG of the labels blended over the image. With ``gt`` the prediction is
    compared with the dataset's mask (confusion summed in 'conf').

    The device does not wait for files: ``readers`` threads decode images and masks ahead of it (in id
    order), ``writers`` threads encode and write the outputs (``io.BackgroundWriter``) and one thread sums
    the confusion matrix (a prediction out of range is recorded as today's was). An image or mask
    that cannot be read, or a prediction that fails, is recorded in 'errors' and the rest go on; a failed
    write (a full disk) stops the run with its ``OSError``. With the CRF on the device (``device_crf``) the
    logits of ``crf_batch`` images wait on the device and go through one CRF together (each image's labels
    equal its own CRF's), then one host read of their labels. ``batch_mirror``: see ``msc_logits``; None: on
    an accelerator (equal to batch 1 up to float rounding), off on the CPU (byte-identical PNGs).

    Returns {total, done, failed, seconds, images_per_s, conf (or None), errors {id: message}}."""
    from tqdm import tqdm

    from .metrics import confusion_matrix

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out_dir = Path(out_dir) if out_dir is not None else None
    n = dataset.classes.num_classes + 1
    conf = np.zeros((n, n), np.int64) if gt else None
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    if cfg.average_at == "logits":
        require_patch_logits(model)                  # once, not as an error on every image
    model.eval()
    load = lambda image_id: prepare(dataset, image_id, cfg, device, n - 1 if gt else None)  # noqa: E731
    mirror = device.type != "cpu" if batch_mirror is None else batch_mirror
    params = cfg.crf_setup()[0]
    waiting: list[tuple[str, dict, torch.Tensor, torch.Tensor]] = []   # (id, item, unary, finite) for the CRF

    def count(image_id: str, label: np.ndarray, mask: np.ndarray) -> None:
        """In the one confusion thread: the only writer of ``conf``, off the device's thread."""
        try:
            np.add(conf, confusion_matrix(label, mask, n, IGNORE_INDEX), out=conf)
        except ValueError as e:
            errors[image_id] = str(e)

    def finish(image_id: str, item: dict, label: np.ndarray) -> None:
        if out_dir is not None:
            target = out_dir / f"{image_id}.png"
            if overwrite or not target.exists():
                writer.submit(write_label, target, label, fmt)
        if overlay_dir is not None:
            writer.submit(write_overlay, Path(overlay_dir) / f"{image_id}.jpg", label, item["image"], image_id)
        if item["mask"] is not None:
            tallies.append(tally.submit(count, image_id, label, item["mask"]))

    def flush() -> None:
        """The waiting images through one device CRF; one host read of their finiteness, one of their labels."""
        finite = torch.stack([w[3] for w in waiting]).tolist()
        for (image_id, *_), ok in zip(waiting, finite):
            if not ok:
                errors[image_id] = NON_FINITE
        kept = [w for w, ok in zip(waiting, finite) if ok]
        waiting.clear()
        if not kept:
            return
        labels = crf_labels_on_device([w[2] for w in kept], [w[1]["guide"] for w in kept], params)
        flat = torch.cat([lab.reshape(-1) for lab in labels]).cpu().numpy()
        for (image_id, item, *_), label in zip(kept, np.split(flat, np.cumsum([lab.numel() for lab in labels])[:-1])):
            finish(image_id, item, label.reshape(item["image"].shape[:2]))

    tallies: list[Future] = []
    with closing(read_ahead(load, ids, readers, 2 * max(1, readers))) as items, BackgroundWriter(writers) as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="confusion") as tally:
        for image_id, item in tqdm(items, total=len(ids), desc="predict", unit="img", disable=not progress,
                                   dynamic_ncols=True):
            if isinstance(item, BaseException):
                errors[image_id] = str(item)
                continue
            try:
                if item["guide"] is not None:   # device CRF: batched with the next images', no host read yet
                    logits = msc_logits(model, item["x"].to(device, non_blocking=True), cfg, mirror)[0]
                    waiting.append((image_id, item, *device_unary(logits)))
                else:
                    label = predict_image(model, item["image"], cfg, device, item["x"], mirror)
            except (ValueError, OSError) as e:
                errors[image_id] = str(e)
                continue
            if item["guide"] is None:
                finish(image_id, item, label)
            elif len(waiting) >= crf_batch:
                flush()
        if waiting:
            flush()
    for t in tallies:
        t.result()                                   # a failure other than a recorded ValueError: raised here
    seconds = time.perf_counter() - t0
    return {"total": len(ids), "done": len(ids) - len(errors), "failed": len(errors), "seconds": round(seconds, 3),
            "images_per_s": round(len(ids) / seconds, 3) if seconds > 0 else None, "conf": conf, "errors": errors}


def evaluate_model(checkpoint: str | Path | Mapping[str, Any], dataset, ids: Sequence[str], *,
                   out_dir: str | Path | None = None, infer: dict[str, Any] | InferConfig | None = None,
                   device: str | None = None, clip: str | Path | None = None, dino: str | Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """``make eval WHAT=model``: predict ``ids`` with a trained checkpoint (file, run folder, or one already
    read with ``checkpoint.load``) and score them against the dataset's ground truth with
    ``metrics.confusion_matrix`` / ``mean_iou``.

    ``infer``: an ``InferConfig`` or dict of its fields over the config stored in the checkpoint
    (``checkpoint_infer_config``). ``clip``, ``dino``: backbone files moved since training (``load_model``).
    ``out_dir``: also write the predicted label PNGs there. Returns {what: 'model', miou, accuracy, conf,
    evaluated, failed, errors, checkpoint, infer, seconds, images_per_s}; ``conf`` feeds
    ``metrics.per_class_rows`` / ``write_tables`` like the pseudo-label evaluation.
    """
    from .metrics import mean_iou, pixel_accuracy

    dev = infer_device(device)
    ck = checkpoint if isinstance(checkpoint, Mapping) else ckpt_io.load(checkpoint)
    model, meta = load_model(ck, dev, clip, log=lambda *_: None, dino=dino)
    if list(meta["class_names"]) != ["background", *dataset.classes.names]:
        raise ckpt_io.CheckpointMismatch(f"{ck['path']}: trained for {meta['num_classes']} classes "
                                         f"({', '.join(meta['class_names'][1:4])}, ...), the dataset has "
                                         f"{dataset.classes.num_classes + 1} ({', '.join(dataset.classes.names[:3])}, ...)")
    cfg = checkpoint_infer_config(meta, infer, dev)
    res = predict_split(model, dataset, ids, out_dir, cfg, dev, gt=True, progress=progress)
    return {"what": "model", "miou": mean_iou(res["conf"]), "accuracy": pixel_accuracy(res["conf"]),
            "conf": res["conf"], "evaluated": res["done"], "failed": res["failed"], "errors": res["errors"],
            "checkpoint": ck["path"], "infer": cfg.as_dict(), "seconds": res["seconds"],
            "images_per_s": res["images_per_s"]}
