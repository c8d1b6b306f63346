"""Pseudo-label stage: CAM files -> dense CRF (CLIP-ES's eval_cam_with_crf.py) or PAR (ExCEL) -> one label PNG
per image.

``pseudo_label`` labels one in-memory image (the CAM stage can call it without writing CAM files);
``run_pseudo`` runs a whole split: with the torch CRF on a GPU, threads read and prepare the images and
write the PNGs while this process labels batches of them on the device (``batched``); otherwise one image
per task in joblib worker processes that read their own inputs (only ids and paths travel). Both write PNGs
atomically, keep a manifest of the config, resume by skipping finished PNGs and put one clear message per
failed image in ``errors.json`` while the rest completes; a failed write (a full disk) stops the run,
naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import crf
from ..data.camfile import check_cams, load_cams, missing_message, upsample_cams
from .crf import DEFAULT_MAX_PIXELS
from ..data.datasets import Dataset, SampleError, read_mask
from ..data.image import DEFAULT_MAX_PATCHES, PATCH, load_rgb, normalize_then_resize, target_size
from ..io import check_manifest, check_output_folder, write_errors, write_manifest
from ..data.labelio import FORMATS, write_label
from ..procs import worker_init


@dataclass(frozen=True)
class PseudoConfig:
    """Everything that changes the labels. Defaults reproduce CLIP-ES's eval_cam_with_crf.py, quirks included."""

    conf: float = 0.95                 # pixels below this confidence become 255
    confidence: str = "crf"            # 'crf': max CRF marginal (code); 'raw': paper's raw-CAM rule; 'none'
    guide: str = "wrapped"             # 'wrapped': CLIP-ES's uint8-wrapped BGR-minus-mean guide; 'plain'
    power: float = 1.0                 # background row (1 - max cam) ** power
    crf: crf.CRFParams = field(default_factory=crf.CRFParams)
    format: str = "palette"            # label PNG: 'palette' (P mode, VOC colours) or 'gray' (reference)
    require_gt: bool = True            # CLIP-ES's eval_cam_with_crf.py reads every GT mask
    preset: str = "clipes"             # the crf.PRESETS entry guide and crf came from (recorded)
    backend: str = "auto"              # dense CRF backend: 'auto' | 'torch' | 'pydensecrf' (see crf.resolve_backend)
    max_pixels: int | None = DEFAULT_MAX_PIXELS      # larger images: CRF at a reduced size (crf.crf_scores)
    device: str = "cpu"                # where the torch backend runs (not part of the manifest)
    refine: str = "crf"                # 'crf' (CLIP-ES) or 'par' (ExCEL: PAR with the image, argmax, no 255)
    par_input_size: int | None = None  # PAR guide: the image at this square size (ExCEL's 320), 0 its own size;
                                       # None: the CAM stage's input size, read from its manifest

    def __post_init__(self) -> None:
        if self.refine not in REFINES:
            raise ValueError(f"refine must be one of {REFINES}, got {self.refine!r}")
        if self.confidence not in crf.CONFIDENCE_RULES:
            raise ValueError(f"confidence must be one of {crf.CONFIDENCE_RULES}, got {self.confidence!r}")
        if self.guide not in crf.GUIDES:
            raise ValueError(f"guide must be one of {crf.GUIDES}, got {self.guide!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if not 0 <= self.conf <= 1:
            raise ValueError(f"conf must be in [0, 1], got {self.conf}")
        crf.preset(self.preset)
        if self.backend not in crf.BACKENDS:
            raise ValueError(f"backend must be one of {crf.BACKENDS}, got {self.backend!r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive pixel count (or None for no cap), got {self.max_pixels}")

    def resolved(self) -> "PseudoConfig":
        """This config with 'auto' replaced by the backend that will run (printing a note on a fallback)."""
        note = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
        return replace(self, backend=crf.resolve_backend(self.backend, self.device, log=note))

    def batch_size(self, batch: int | None = None) -> int | None:
        """Images per device batch when the torch CRF labels in this process (``batched.DeviceLabeller``):
        ``batch``, by default ``GPU_BATCH`` on an accelerator; None: one image per worker process (the other
        refinements, and the torch CRF on the CPU, where a core per image outruns threads in one process)."""
        if self.refine != "crf" or self.backend != "torch":
            return None
        return batch or (GPU_BATCH if not self.device.startswith("cpu") else None)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["device"]  # the labels do not depend on it beyond float rounding
        return d


REFINES = ("crf", "par")
GPU_BATCH = 8  # images per torch CRF batch on a GPU


def resolve_par(cfg: PseudoConfig, cams_config: Any) -> PseudoConfig:
    """Fill ``par_input_size`` from the CAM stage's manifest config: the square size its images were
    resized to (ExCEL's --input-size), else 0 (the image at its own size)."""
    if cfg.refine != "par" or cfg.par_input_size is not None:
        return cfg
    return replace(cfg, par_input_size=cams_input_size(cams_config) or 0)


def cams_input_size(cams_config: Any) -> int | None:
    """The square size the CAM stage resized images to (ExCEL's --input-size), from its manifest config;
    None when it kept each image's aspect."""
    cam = cams_config.get("cam") if isinstance(cams_config, dict) else None
    size = cam.get("input_size") if isinstance(cam, dict) else None
    return int(size) if size else None


# ------------------------------------------------------------------------------- one image
def pseudo_label(image_rgb: np.ndarray, keys: np.ndarray, cams_patch: np.ndarray,
                 cfg: PseudoConfig = PseudoConfig()) -> np.ndarray:
    """RGB uint8 (H, W, 3), keys int (K,), patch-resolution CAMs float (K, h, w) -> uint8 (H, W) label
    (0 background, c + 1 class c, 255 low confidence). CAMs are upsampled to float16 exactly as the
    reference's CAM files held them, then refined by the dense CRF (or by PAR, see ``par_label``)."""
    if cfg.refine == "par":
        return par_label(image_rgb, keys, cams_patch, cfg.par_input_size or 0, cfg.power)
    H, W = image_rgb.shape[:2]
    cams = upsample_cams(cams_patch, (H, W))
    return crf.refine(image_rgb, keys, cams, params=cfg.crf, guide=cfg.guide, conf=cfg.conf,
                      confidence=cfg.confidence, power=cfg.power, backend=cfg.backend, device=cfg.device,
                      max_pixels=cfg.max_pixels)


def par_label(image_rgb: np.ndarray, keys: np.ndarray, cams_patch: np.ndarray, input_size: int = 0,
              power: float = 1.0) -> np.ndarray:
    """ExCEL's training-free labels: CAMs (K, h, w) upsampled (OpenCV bilinear, float32) to the image
    (H, W), background (1 - max)^power in front, refined by PAR guided by the normalised image (at
    ``input_size`` square when non-zero, as the reference's 320 x 320 input, resized to (H, W) by PAR),
    argmax -> uint8 (H, W) labels 0 / c + 1, no 255."""
    import torch

    from .par import par

    H, W = image_rgb.shape[:2]
    cams = upsample_cams(cams_patch, (H, W), np.float32)
    scores = np.concatenate([(1 - cams.max(axis=0, keepdims=True)) ** power, cams])
    guide = normalize_then_resize(image_rgb, (input_size, input_size) if input_size else (H, W))
    with torch.no_grad():
        refined = par(guide[None], torch.from_numpy(scores)[None])[0]
    keys_ext = np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)
    return keys_ext[refined.argmax(dim=0).numpy()]


def load_cams_for(cam_path: str | Path, image_size: tuple[int, int], num_classes: int,
                  max_patches: int = DEFAULT_MAX_PATCHES, input_size: int | None = None) -> dict[str, np.ndarray]:
    """Load a CAM file and check it belongs to an image of ``image_size`` = (H, W) of a dataset with
    ``num_classes`` classes, made with ``max_patches`` or, for ExCEL's square input, ``input_size``
    (class ids, finite values, patch grid)."""
    cam_path = Path(cam_path)
    if not cam_path.is_file():
        raise SampleError(missing_message(cam_path))
    d = load_cams(cam_path)
    size = tuple(int(v) for v in d["image_size"])
    if size != tuple(image_size):
        raise SampleError(f"{cam_path}: CAMs are for an image of size {size} (H, W) but the image is "
                          f"{tuple(image_size)}; the CAMs are stale or from another dataset: re-run the CAM stage")
    model_size = (input_size, input_size) if input_size else target_size(*size, max_patches)
    check_cams(d, cam_path, num_classes, tuple(s // PATCH for s in model_size))
    return d


def read_gt(gt_path: str | Path | None, image_id: str, num_classes: int, image_size: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask (H, W) uint8 of ``image_id``; ``SampleError`` if missing or of another size."""
    if gt_path is None or not Path(gt_path).is_file():
        raise SampleError(f"image {image_id}: ground-truth mask not found{f' ({gt_path})' if gt_path else ''}; "
                          "the reference requires one per image: add it, or pass --no-require-gt")
    gt = read_mask(Path(gt_path), num_classes)
    if gt.shape != tuple(image_size):
        raise SampleError(f"{gt_path}: mask size {gt.shape} differs from the image size {tuple(image_size)}")
    return gt


@dataclass(frozen=True)
class Task:
    """What a worker needs for one image: paths only (workers read their own inputs)."""

    image_id: str
    image: str
    cams: str
    out: str
    gt: str | None = None
    max_patches: int = DEFAULT_MAX_PATCHES  # the CAM stage's, to check the CAMs' patch grid
    input_size: int | None = None           # the CAM stage's square input (ExCEL --input-size), if any


def error_message(e: Exception) -> str:
    """One line for an image's failure: the message of our errors, the type too for anything else."""
    return str(e) if isinstance(e, (SampleError, ValueError, OSError)) else f"{type(e).__name__}: {e}"


def read_inputs(task: Task, num_classes: int, arrays: tuple | None, require_gt: bool) -> tuple:
    """(image RGB uint8 (H, W, 3), keys (K,), patch CAMs (K, h, w)) of a task, checked: from its CAM file,
    or ``arrays`` = (keys, CAMs) handed over by the CAM stage; its GT mask must exist when ``require_gt``."""
    image = load_rgb(task.image)
    if arrays is None:
        d = load_cams_for(task.cams, image.shape[:2], num_classes, task.max_patches, task.input_size)
        arrays = d["keys"], d["cams"]
    if require_gt:
        read_gt(task.gt, task.image_id, num_classes, image.shape[:2])
    return image, np.asarray(arrays[0]), np.asarray(arrays[1])


def label_one(task: Task, cfg: PseudoConfig, num_classes: int, arrays: tuple | None = None) -> tuple[str, str | None]:
    """Worker body: read, label, write. Returns (id, None) or (id, error message); raises only for a
    failed write (every later one would fail too: the run stops)."""
    try:
        label = pseudo_label(*read_inputs(task, num_classes, arrays, cfg.require_gt), cfg)
    except Exception as e:  # one bad image must not stop the split
        Path(task.out).unlink(missing_ok=True)  # never leave a label from an older run for a failed image
        return task.image_id, error_message(e)
    write_label(task.out, label, cfg.format)
    return task.image_id, None


def prepare_one(task: Task, cfg: PseudoConfig, num_classes: int, arrays: tuple | None = None):
    """Reader thread of the batched torch CRF: a ``batched.Item`` with the image's float16 probabilities,
    guide and label values, checked as ``crf.refine`` checks them (or its label, for an image above the
    resolution cap, labelled alone; or its error)."""
    from .batched import Item  # torch: not imported by the worker processes of the other paths

    try:
        image, keys, cams_patch = read_inputs(task, num_classes, arrays, cfg.require_gt)
        size = image.shape[:2]
        if crf.capped_size(*size, cfg.max_pixels) != size:
            return Item(task.image_id, task.out, label=pseudo_label(image, keys, cams_patch, cfg))
        cams = upsample_cams(cams_patch, size)
        crf.check_refine(image, cams, cfg.confidence)
        probs = crf.background_probs(cams, cfg.power)
        crf.check_probs(probs)
        return Item(task.image_id, task.out, probs=probs, guide=crf.guide_image(image, cfg.guide),
                    values=crf.keys_ext(keys))
    except Exception as e:  # one bad image must not stop the split
        return Item(task.image_id, task.out, error=error_message(e))


def device_labeller(cfg: PseudoConfig, num_classes: int, on_result: Callable[[str, str | None], None],
                    n_jobs: int | None = None, batch: int = GPU_BATCH):
    """The batched torch CRF of ``cfg`` on its device (a ``batched.DeviceLabeller``), with ``n_jobs`` reader
    and writer threads; ``submit(task, arrays=None)``."""
    from .batched import DeviceLabeller

    return DeviceLabeller(lambda task, arrays=None: prepare_one(task, cfg, num_classes, arrays),
                          lambda out, label: write_label(out, label, cfg.format), on_result,
                          params=cfg.crf, conf=cfg.conf, confidence=cfg.confidence, device=cfg.device,
                          jobs=default_jobs() if n_jobs is None or n_jobs < 1 else n_jobs, batch=batch)


# ---------------------------------------------------------------------------- parallel driver
def default_jobs() -> int:
    """All cores this process may use (cgroup/affinity aware)."""
    import joblib

    return max(1, joblib.cpu_count())


def run_tasks(fn: Callable, tasks: Sequence, args: tuple = (), n_jobs: int | None = None,
              desc: str = "", progress: bool = True) -> Iterator:
    """Yield ``fn(task, *args)`` for each task (in completion order), one task per joblib job, with a
    tqdm bar. ``n_jobs`` 1 runs in this process; None means all cores."""
    from tqdm import tqdm

    n_jobs = default_jobs() if n_jobs is None or n_jobs < 1 else n_jobs
    bar = tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress or not tasks, dynamic_ncols=True)
    try:
        if n_jobs == 1 or len(tasks) <= 1:
            results: Iterable = (fn(t, *args) for t in tasks)
        else:
            from joblib import Parallel, delayed

            # loky's workers run the initializer when they start, so one still idle when the stage is
            # killed dies with it too
            results = Parallel(n_jobs=min(n_jobs, len(tasks)), batch_size=1, return_as="generator_unordered",
                               initializer=worker_init, initargs=(os.getpid(),))(delayed(fn)(t, *args) for t in tasks)
        for r in results:
            bar.update(1)
            yield r
    finally:
        bar.close()


def _cams_provenance(cams_dir: Path) -> Any:
    """The CAM stage's manifest config, so labels from regenerated CAMs count as stale."""
    try:
        return json.loads((cams_dir / "manifest.json").read_text()).get("config")
    except (OSError, ValueError):
        return None


def for_dataset(cfg: PseudoConfig, dataset: Dataset) -> PseudoConfig:
    """``cfg`` without the ground-truth requirement when the dataset has no ground truth at all."""
    return cfg if dataset.has_masks or not cfg.require_gt else replace(cfg, require_gt=False)


def stage_config(dataset: Dataset, cams_dir: str | Path, cfg: PseudoConfig) -> dict[str, Any]:
    """The manifest config of a pseudo-label folder: labelling settings plus where inputs came from."""
    cams_dir = Path(cams_dir).resolve()
    return {"stage": "pseudo", "dataset": dataset.name, "root": str(dataset.root.resolve()),
            "classes": list(dataset.classes.names), "cams": str(cams_dir),
            "cams_config": _cams_provenance(cams_dir), **cfg.as_dict()}


def run_pseudo(dataset: Dataset, ids: Sequence[str], cams_dir: str | Path, out_dir: str | Path,
               cfg: PseudoConfig = PseudoConfig(), n_jobs: int | None = None, overwrite: bool = False,
               progress: bool = True, batch: int | None = None) -> dict[str, Any]:
    """Label every id; returns {total, done, skipped, failed, seconds, images_per_s, out, errors}.

    Resumes when ``out_dir`` holds labels of the same config (existing PNGs are kept); raises
    ``io.StaleOutputError`` when it holds another config's, unless ``overwrite``; raises the ``OSError`` of
    the first failed write. ``n_jobs``: worker processes, or reader/writer threads of the batched torch CRF,
    which labels up to ``batch`` images at a time (``PseudoConfig.batch_size``).
    """
    cams_dir, out_dir = Path(cams_dir), check_output_folder(out_dir)
    cfg = for_dataset(resolve_par(cfg, _cams_provenance(cams_dir)), dataset).resolved()
    config = stage_config(dataset, cams_dir, cfg)
    max_patches = (config["cams_config"] or {}).get("max_patches") or DEFAULT_MAX_PATCHES
    input_size = cams_input_size(config["cams_config"])
    resume = check_manifest(out_dir, config, overwrite=overwrite, outputs="*.png")
    write_manifest(out_dir, config, status="running")
    tasks, skipped = [], 0
    for image_id in ids:
        out = out_dir / f"{image_id}.png"
        if resume and out.is_file():
            skipped += 1
            continue
        gt = dataset.mask_path(image_id)
        tasks.append(Task(image_id, str(dataset.image_path(image_id)), str(cams_dir / f"{image_id}.npz"), str(out),
                          None if gt is None else str(gt), max_patches, input_size))
    t0 = time.perf_counter()
    batch = cfg.batch_size(batch)
    if batch:
        errors = label_batched(tasks, cfg, dataset.classes.num_classes, n_jobs, batch, progress)
    else:
        errors = {i: msg for i, msg in run_tasks(label_one, tasks, (cfg, dataset.classes.num_classes), n_jobs,
                                                 desc="pseudo", progress=progress) if msg}
    seconds = time.perf_counter() - t0
    write_errors(out_dir, errors)
    summary = {"total": len(ids), "done": len(tasks) - len(errors), "skipped": skipped, "failed": len(errors),
               "seconds": round(seconds, 3), "images_per_s": round(len(tasks) / seconds, 3) if seconds > 0 else None,
               "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "out": str(out_dir)}
    write_manifest(out_dir, config, status="failed" if errors else "complete", summary=summary)
    return {**summary, "errors": errors}


def label_batched(tasks: Sequence[Task], cfg: PseudoConfig, num_classes: int, n_jobs: int | None, batch: int,
                  progress: bool = True) -> dict[str, str]:
    """Label ``tasks`` with the batched torch CRF (``device_labeller``) under a tqdm bar; {id: error}."""
    from tqdm import tqdm

    errors: dict[str, str] = {}
    with tqdm(total=len(tasks), desc="pseudo", unit="img", disable=not progress or not tasks, dynamic_ncols=True) as bar:

        def record(image_id: str, err: str | None) -> None:
            if err:
                errors[image_id] = err
            bar.update(1)

        labeller = device_labeller(cfg, num_classes, record, n_jobs, batch)
        try:
            for task in tasks:
                labeller.submit(task)
        finally:
            labeller.close()
    return errors


# ------------------------------------------------------------------- labels straight from the CAM stage
class StreamingLabeller:
    """Labels images while the CAM stage produces their CAMs (``make cams-pseudo``), so CAM files need
    not be kept. The torch CRF on a GPU labels batches on the CAM stage's device (``device_labeller``;
    ``batch``: see ``PseudoConfig.batch_size``), the rest runs in a process pool; either way at most a few
    images per worker wait, which bounds memory and paces the CAM stage to the labelling speed. Resumable like ``run_pseudo`` (finished PNGs
    count); a failed write stops the run (``submit`` or ``close`` raise it)."""

    def __init__(self, dataset: Dataset, out_dir: str | Path, cfg: PseudoConfig, cams_config: Any,
                 n_jobs: int | None = None, overwrite: bool = False, batch: int | None = None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        cfg = for_dataset(resolve_par(cfg, cams_config), dataset).resolved()
        self.dataset, self.out, self.cfg = dataset, Path(out_dir), cfg
        self.config = {"stage": "pseudo", "dataset": dataset.name, "root": str(dataset.root.resolve()),
                       "classes": list(dataset.classes.names), "cams": "streamed from the CAM stage",
                       "cams_config": cams_config, **self.cfg.as_dict()}
        self.resume = check_manifest(self.out, self.config, overwrite=overwrite, outputs="*.png")
        write_manifest(self.out, self.config, status="running")
        self.n_jobs = default_jobs() if n_jobs is None or n_jobs < 1 else n_jobs
        self.pending: list = []
        self.errors: dict[str, str] = {}
        self.done_count = 0
        batch = cfg.batch_size(batch)
        self.device = device_labeller(cfg, dataset.classes.num_classes, self._record, self.n_jobs, batch) if batch else None
        # spawn, not fork: a fork of a process whose torch/OpenMP threads are running can deadlock
        self.pool = None if batch else ProcessPoolExecutor(
            self.n_jobs, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init,
            initargs=(os.getpid(),))

    def path(self, image_id: str) -> Path:
        return self.out / f"{image_id}.png"

    def finished(self, image_id: str) -> bool:
        return self.resume and self.path(image_id).is_file()

    def submit(self, image_id: str, keys: np.ndarray, cams_patch: np.ndarray) -> None:
        gt = self.dataset.mask_path(image_id)
        task = Task(image_id, str(self.dataset.image_path(image_id)), "", str(self.path(image_id)),
                    None if gt is None else str(gt))
        arrays = np.asarray(keys), np.asarray(cams_patch)
        if self.device is not None:
            self.device.submit(task, arrays)
            return
        self.pending.append(self.pool.submit(label_one, task, self.cfg, self.dataset.classes.num_classes, arrays))
        while len(self.pending) > 4 * self.n_jobs:
            self._collect(self.pending.pop(0))

    def _collect(self, future) -> None:
        self._record(*future.result())

    def _record(self, image_id: str, err: str | None) -> None:
        if err:
            self.errors[image_id] = err
        else:
            self.done_count += 1

    def close(self, failed_upstream: dict[str, str] | None = None) -> dict[str, str]:
        """Wait for every label; write errors.json and the final manifest. Returns the errors."""
        if self.device is not None:
            self.device.close()
        for future in self.pending:
            self._collect(future)
        self.pending = []
        if self.pool is not None:
            self.pool.shutdown()
        errors = {**(failed_upstream or {}), **self.errors}
        write_errors(self.out, errors)
        write_manifest(self.out, self.config, status="failed" if errors else "complete",
                       summary={"done": self.done_count, "failed": len(errors), "out": str(self.out)})
        return errors
