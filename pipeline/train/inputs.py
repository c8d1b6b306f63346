"""The training run's inputs: the dataset, the step kind that lists the training samples (label files
or image-level labels), the validation samples, checked in full before anything trains; and their
fingerprints by content (the CLIP file, the label files), which ``--resume`` compares."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from ..io import sha256_file
from .config import ConfigError
from .distributed import Process


def open_inputs(cfg: Mapping, log: Callable[[str], None]):
    """(dataset, ``LabelStep`` with the training samples, validation samples)."""
    from ..data.datasets import build_dataset
    from ..data.segdata import make_samples
    from .step_offline import OfflineStep
    from .step_online import OnlineStep

    d = cfg["data"]
    if not d["root"]:
        raise ConfigError("data.root: the dataset folder is required (e.g. data.root=~/data/VOC2012)")
    needs = ["images", *(["labels"] if cfg["online"]["method"] is not None else []),
             *(["masks"] if d["supervision"] == "gt" or d["val_split"] else [])]
    ds = build_dataset(d["dataset"], d["root"], d["classes"], d["labels"], d["masks"], needs=needs)
    step = OnlineStep(cfg, ds) if cfg["online"]["method"] is not None else OfflineStep(cfg, ds)
    val = []
    if d["val_split"]:
        val_ids = ds.ids(d["val_split"])
        if cfg["train"]["val_max_images"]:
            val_ids = val_ids[: int(cfg["train"]["val_max_images"])]
        val = make_samples(ds, val_ids, None)
    log(f"data: {step.size} training images ({step.source}), {len(val)} validation images")
    return ds, step, val


def check_inputs(step, val_samples, num_classes: int, proc: Process) -> None:
    """Rank 0 reads every training and validation file; a problem stops every process."""
    from ..data.segdata import validate_samples

    problem = None
    if proc.rank == 0:
        try:
            step.check(num_classes)
            if val_samples:
                validate_samples(val_samples, num_classes - 1, "validation")
        except ValueError as e:
            problem = e
    proc.raise_together(problem)


def fingerprints(cfg: Mapping, step) -> dict[str, Any]:
    """What the run depends on beyond its config, by content: the backbone files' sha256 (CLIP, and WeCLIP+'s
    DINOv2; None without one, or when it is missing: the loader names it) and the label files' identity
    (``LabelStep.identity``). Recorded at the start of the run, in ``config.json`` and every checkpoint's
    meta (``inputs``)."""
    out = {}
    for key in ("clip", "dino"):
        path = Path(cfg["model"][key]).expanduser() if cfg["model"].get(key) else None
        out[f"{key}_sha256"] = sha256_file(path) if path is not None and path.is_file() else None
    out["pseudo"] = step.identity()
    return out


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any], cfg: Mapping) -> list[str]:
    """Why inputs recorded by a run (``old``) and today's (``new``) are not the same content, one line each;
    a side that recorded nothing (no CLIP file, ground truth) is not compared."""
    out = []
    for key, what in (("clip", "CLIP"), ("dino", "DINOv2")):
        a, b = old.get(f"{key}_sha256"), new.get(f"{key}_sha256")
        if a and b and a != b:
            out.append(f"model.{key} {cfg['model'][key]} is not the {what} the run started with (sha256 {b[:16]}..., "
                       f"the run's {a[:16]}...)")
    a, b = old.get("pseudo"), new.get("pseudo")
    if a and b and a != b:
        where = f"data.pseudo {cfg['data']['pseudo']}"
        if "manifest" in a and "manifest" in b:
            keys = _differing(a["manifest"], b["manifest"])
            out.append(f"{where} holds labels made with another configuration than the run's (its manifest "
                       f"differs in: {', '.join(keys)})")
        else:
            out.append(f"{where} holds other label files than the run's (their content differs)")
    return out


def _differing(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested mappings differ."""
    if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
        return [] if a == b else [prefix.rstrip(".") or "(all)"]
    return [k for key in sorted(set(a) | set(b)) for k in _differing(a.get(key), b.get(key), f"{prefix}{key}.")]


def aug_config(d: Mapping):
    from ..data.segdata import AugConfig

    return AugConfig(crop=int(d["crop"] or 0), scale_range=tuple(d["scale_range"]) if d["scale_range"] else None,
                     scales=tuple(d["scales"]) if d["scales"] else None, flip=bool(d["flip"]),
                     normalize=d["normalize"], pad_image=d["pad_image"])


def training_batches(step, cfg: Mapping, start: int, proc: Process):
    """The run's stream of batches from iteration ``start`` on: a pure function of (train.seed, iteration)
    (``segdata.ResumableBatchSampler``), whatever the number of workers."""
    import torch

    from ..data.segdata import ResumableBatchSampler

    t = cfg["train"]
    seed, workers = int(t["seed"]), int(cfg["data"]["workers"])
    sampler = ResumableBatchSampler(step.size, int(t["batch_size"]), seed, start * int(t["accum"]), proc.rank,
                                    proc.world)
    loader = torch.utils.data.DataLoader(
        step.dataset(aug_config(cfg["data"]), seed), batch_sampler=sampler, num_workers=workers,
        pin_memory=proc.device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed))  # its own generator: the global RNG stays untouched
    return iter(loader)
