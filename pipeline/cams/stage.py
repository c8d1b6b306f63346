"""The CAM stage: a dataset split -> one ``<out>/<image_id>.npz`` per image (see ``camfile``), by
one of the CAM methods of ``pipeline.cams`` (CLIP-ES or ExCEL).

Resumable (finished images are skipped), refuses to mix configurations (``manifest.json``),
logs per-image failures to ``errors.json`` while the rest completes, shards by rank under
``torchrun``, and batches same-size images.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from ..data.camfile import save_cams
from ..clip.model import PRECISIONS, checkpoint_file, load_clip, resolve_device
from ..data.datasets import Dataset, SampleError, build_dataset
from ..data.image import DEFAULT_MAX_PATCHES, ImageError
from ..io import (BackgroundWriter, check_manifest, check_output_folder, sha256_file, write_errors, write_json,
                  write_manifest)
from .prompts import best_template
from . import get_method


@dataclass
class CamsConfig:
    """Everything the CAM stage needs; see ``stages/cams.py`` for the flags."""

    dataset: str
    root: str
    split: str
    clip: str
    out: str
    method: str = "clipes"            # CAM method: 'clipes' or 'excel' (pipeline/cams)
    classes: str | None = None        # class YAML (required for 'folder')
    labels: str | None = None         # labels file (VOC: else Annotations/*.xml)
    masks: str | None = None          # folder dataset: ground-truth masks
    save_init: bool = False
    device: str = "auto"
    precision: str = "auto"           # fp32 on CPU; on CUDA the method's reference dtype (CLIP-ES fp16, ExCEL fp32)
    batch_size: int = 0               # 0: 1 on CPU, 16 on CUDA
    workers: int | None = None        # decoding processes (None: ``default_workers``)
    overwrite: bool = False
    exact: bool = True                # reproduce CLIP-ES's code quirks
    max_patches: int = DEFAULT_MAX_PATCHES
    exif_transpose: bool = False
    box_threshold: float | None = None  # default: for CLIP-ES the class list's (VOC 0.4, COCO 0.7), ExCEL 0.79
    cam_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # other fields of the method's config
    prompt_ranking: str | None = None   # ranking.csv of `make prompts`, read for template 'best'
    pseudo_out: str | None = None       # also write pseudo labels here, straight from the CAMs (cams-pseudo)
    pseudo: Any = None                  # pseudo.PseudoConfig for them (default: the reference's)
    pseudo_jobs: int | None = None      # CRF worker processes (default: all cores)
    keep_cams: bool = True              # False: no CAM files (needs pseudo_out)
    progress: bool = True


@dataclass
class Summary:
    """Counts of a run (under torchrun: rank 0's are the whole run's, the other ranks' their shard's)."""

    rank: int = 0
    total: int = 0
    written: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


class _Images(TorchDataset):
    """Loads and preprocesses one image per item; failures become records, not exceptions."""

    def __init__(self, data: Dataset, ids: list[str], load):
        self.data, self.ids, self.load = data, ids, load

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.ids[i]
        try:
            labels = self.data.labels(image_id)
            image, size = self.load(self.data.image_path(image_id))
            return {"id": image_id, "labels": labels, "image_size": size, "image": image}
        except (SampleError, ImageError, OSError, ValueError) as e:
            return {"id": image_id, "error": str(e)}


def _batches(items: Iterable[dict], batch_size: int, errors: dict[str, str]) -> Iterator[list[dict]]:
    """Group loaded images by input size into batches of at most ``batch_size``; error records go to
    ``errors``. Buffers a bounded number of images so mixed sizes still batch well."""
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    buffered = 0
    for item in items:
        if "error" in item:
            errors[item["id"]] = item["error"]
            yield []  # let the caller advance its progress bar
            continue
        key = tuple(item["image"].shape)
        buckets[key].append(item)
        buffered += 1
        if len(buckets[key]) == batch_size:
            buffered -= batch_size
            yield buckets.pop(key)
        elif buffered >= 4 * batch_size:
            key = max(buckets, key=lambda k: len(buckets[k]))
            buffered -= len(buckets[key])
            yield buckets.pop(key)
    for batch in buckets.values():
        yield batch


def default_workers(device: torch.device) -> int:
    """Decoding processes: a GPU computes a batch faster than two processes decode and resize it (up to 8,
    one per core of this process's share under torchrun, leaving one for the device loop); on the CPU the
    model needs the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type != "cuda":
        return min(2, cores)
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(8, share - 1))


def _dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def shard_ids(ids: list[str], rank: int, world: int) -> list[str]:
    """The ids process ``rank`` of ``world`` handles: every world-th id from position ``rank``, so the
    shards are disjoint, cover ``ids`` and differ in size by at most one."""
    return ids[rank::world]


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def manifest_config(cfg: CamsConfig, data: Dataset, ckpt_sha: str, cam_cfg: dict, dtype: torch.dtype) -> dict:
    """The settings that determine the numbers in the files (not where or how fast they were made)."""
    c = data.classes
    return {"stage": "cams", "dataset": cfg.dataset, "checkpoint_sha256": ckpt_sha,
            "labels": str(Path(cfg.labels).resolve()) if cfg.labels else None,
            "labels_sha256": sha256_file(cfg.labels) if cfg.labels else None,
            "classes": list(c.names), "prompts": list(c.prompts), "background": list(c.background),
            "template": c.template, "method": cfg.method, "cam": cam_cfg, "precision": str(dtype).removeprefix("torch."),
            "max_patches": cfg.max_patches, "exif_transpose": cfg.exif_transpose, "save_init": cfg.save_init}


def run_cams(cfg: CamsConfig) -> Summary:
    """Run the CAM stage (and, with ``cfg.pseudo_out``, the pseudo-label CRF on its CAMs as they come)."""
    rank, world, local_rank = _dist_info()
    if cfg.pseudo_out and world > 1:
        raise ValueError("CAMs straight into pseudo labels run in one process; use torchrun for `make cams` only")
    if not cfg.keep_cams and not cfg.pseudo_out:
        raise ValueError("not keeping the CAM files only makes sense with --pseudo-out")
    method = get_method(cfg.method)
    device, dtype = resolve_device(cfg.device, cfg.precision, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before NCCL starts, so its barriers use this process's GPU
        # the backend of the device the CAMs run on: NCCL has no CPU barrier (--device cpu on a GPU machine)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.precision == "auto" and device.type == "cuda":
        dtype = PRECISIONS[method.CUDA_PRECISION]
    out = check_output_folder(cfg.out)
    if cfg.pseudo_out:
        check_output_folder(cfg.pseudo_out)
    data = build_dataset(cfg.dataset, cfg.root, cfg.classes, cfg.labels, cfg.masks, needs=("images", "labels"))
    if cfg.pseudo_out and (cfg.pseudo is None or cfg.pseudo.require_gt) and data.has_masks:
        data.require(["masks"])
    ids = data.ids(cfg.split)
    options = dict(cfg.cam_options)
    if options.get("template") == "best":
        options["template"] = best_template(cfg.prompt_ranking or f"outputs/{cfg.dataset}/prompts/ranking.csv")
    cam_cfg = method.make_config(cfg.dataset, data.classes, cfg.exact, cfg.box_threshold, options)
    ckpt_sha = sha256_file(checkpoint_file(cfg.clip))  # a missing file gets the loader's advice
    config = manifest_config(cfg, data, ckpt_sha, method.manifest(cam_cfg), dtype)
    resume = check_manifest(out, config, cfg.overwrite, outputs="*.npz") if cfg.keep_cams else False
    labeller = None
    if cfg.pseudo_out:
        from ..labels.pseudo import PseudoConfig, StreamingLabeller

        # the torch CRF backend runs on the CAM stage's device
        pseudo_cfg = dataclasses.replace(cfg.pseudo or PseudoConfig(), device=str(device))
        labeller = StreamingLabeller(data, cfg.pseudo_out, pseudo_cfg, config, cfg.pseudo_jobs, cfg.overwrite)

    _barrier(world)
    if rank == 0 and cfg.keep_cams:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".*.tmp"):  # left by a killed run
            tmp.unlink(missing_ok=True)
        if not resume:
            for old in out.glob("*.npz"):
                old.unlink()
        write_manifest(out, config, status="running", checkpoint=str(Path(cfg.clip).resolve()))
    _barrier(world)

    model = load_clip(cfg.clip, device=device, dtype=dtype)
    engine = method.build_engine(model, data.classes, cam_cfg)
    shard = shard_ids(ids, rank, world)
    todo = [i for i in shard if not ((not cfg.keep_cams or (out / f"{i}.npz").exists())
                                     and (labeller is None or labeller.finished(i)))]
    summary = Summary(rank=rank, total=len(shard), skipped=len(shard) - len(todo))
    batch_size = cfg.batch_size or (16 if device.type == "cuda" else 1)
    load = method.image_loader(cam_cfg, cfg.max_patches, cfg.exif_transpose)
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    loader = DataLoader(_Images(data, todo, load), batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", disable=not cfg.progress or rank != 0, dynamic_ncols=True,
               desc=f"cams {cfg.dataset}/{Path(cfg.split).name}")
    with BackgroundWriter() as writer:  # the device goes on while files are written
        for batch in _batches(loader, batch_size, summary.errors):
            for item, result in _compute(engine, batch, device, dtype, summary.errors):
                if cfg.keep_cams:
                    writer.submit(save_cams, out / f"{item['id']}.npz", item["labels"], result.cams,
                                  item["image_size"], result.init if cfg.save_init else None)
                if labeller is not None:
                    labeller.submit(item["id"], item["labels"], result.cams)
                summary.written += 1
            bar.update(len(batch) or 1)
            bar.set_postfix(failed=len(summary.errors), refresh=False)
    bar.close()
    summary.seconds = time.perf_counter() - start
    summary.failed = len(summary.errors)
    if cfg.keep_cams:
        _finish(out, config, cfg, summary, rank, world, ids)
    if labeller is not None:  # its errors.json lists CAM failures too
        summary.errors = labeller.close(summary.errors)
        summary.failed = len(summary.errors)
        summary.seconds = time.perf_counter() - start
    return summary


def _compute(engine, batch: list[dict], device, dtype, errors: dict[str, str]):
    """Yield (item, CAMResult); a batch that fails is retried image by image so one bad image
    cannot take its batch mates down."""
    if not batch:
        return
    try:
        # the copy first, then the cast on the device: a blocking copy with a cast casts on the host
        images = torch.stack([b["image"] for b in batch]).to(device, non_blocking=True).to(dtype)
        yield from zip(batch, engine(images, [b["labels"] for b in batch]))
        return
    except (RuntimeError, ValueError) as e:
        if len(batch) == 1:
            errors[batch[0]["id"]] = f"CAM computation failed: {type(e).__name__}: {e}"
            return
    for item in batch:
        yield from _compute(engine, [item], device, dtype, errors)


def _finish(out: Path, config: dict, cfg: CamsConfig, summary: Summary, rank: int, world: int, ids: list[str]) -> None:
    """Merge per-rank results into rank 0's summary; rank 0 writes errors.json and the final manifest."""
    part = out / f".rank{rank}.json"
    counts = ("total", "written", "skipped")
    if world > 1:
        write_json(part, {"errors": summary.errors, **{k: getattr(summary, k) for k in counts}})
    _barrier(world)
    if rank == 0:
        errors = dict(summary.errors)
        for r in range(1, world):
            p = out / f".rank{r}.json"
            other = json.loads(p.read_text())
            errors.update(other["errors"])
            for k in counts:
                setattr(summary, k, getattr(summary, k) + other[k])
            p.unlink()
        part.unlink(missing_ok=True)
        write_errors(out, errors)
        summary.errors, summary.failed = errors, len(errors)
        done = sum((out / f"{i}.npz").exists() for i in ids)
        write_manifest(out, config, status="complete" if done == len(ids) else "incomplete",
                       checkpoint=str(Path(cfg.clip).resolve()),
                       counts={"images": len(ids), "written": done, "failed": len(errors)})
    _barrier(world)
    if world > 1:
        dist.destroy_process_group()
