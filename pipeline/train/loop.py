"""Training loop for the segmentation models on pseudo labels (or ground truth), single process or DDP.

    cfg = load_config("configs/weclip_voc.yaml", ["schedule.iters=1000", "data.root=~/data/VOC2012"])
    train(cfg, "outputs/voc/weclip", resume=True)

What it guarantees: the whole split is validated before the first step (names the bad files); the
data stream and every RNG are restored on ``resume`` so an interrupted run continues exactly (same
batches, same dropout masks, same optimiser state); checkpoints are written atomically; CSV (and
TensorBoard when installed) logs; periodic validation mIoU; bf16/fp16 autocast on CUDA; gradient
accumulation; DDP under ``torchrun`` (NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from .. import checkpoint as ckpt_io
from ..io import check_output_folder, code_version, write_bytes, write_json
from .losses import LOSSES, ONE, Pool, affinity_labels, affinity_loss, segmentation_loss  # noqa: F401  (re-exported)

# Every key a config may set; YAML files and --set overrides are merged onto this.
DEFAULTS: dict[str, Any] = {
    "model": {"name": "weclip", "clip": None, "encoder_blocks": None, "width": 256, "heads": 8, "depth": 3,
              "dropout": 0.1, "layers": [3, 4, 23, 3], "base_width": 64, "layout": "torchvision", "msc_scales": [],
              "freeze_bn": "auto", "pretrained": None,
              "calibrated_blocks": 5, "attention_layers": 6, "pos_via": 20, "eval_pos_via": None, "exact": True,
              "statistics": "batch", "relation_scale": 3.0,
              # WeCLIP+ only (weclip-plus): DINOv2 backbone file; which branches predict (both | clip | dino)
              "dino": None, "branches": "both"},
    "data": {"dataset": "voc", "root": None, "classes": None, "labels": None, "masks": None,
             "split": "train_aug", "supervision": "pseudo", "pseudo": None, "val_split": "val",
             "crop": 320, "scale_range": [0.5, 2.0], "scales": None, "flip": True, "normalize": "imagenet",
             "pad_image": "zero", "workers": 4},
    "optim": {"name": "adamw", "lr": 2.0e-4, "head_lr_mult": 10.0, "weight_decay": 0.01, "betas": [0.9, 0.999],
              "eps": 1.0e-8, "momentum": 0.9},
    "schedule": {"iters": 30000, "warmup_iters": 50, "warmup_ratio": 1.0e-6, "power": 1.0, "lr_step": 1},
    "train": {"batch_size": 4, "accum": 1, "seed": 1, "loss": "ce", "amp": "auto", "device": "auto",
              "ckpt_every": 2000, "keep_checkpoints": 2, "log_every": 20, "val_every": 2000,
              "val_max_images": None, "aff_weight": 0.0, "aff_radius": 8},
    # online pseudo labels (pipeline/train/online): method null = labels from data.pseudo / ground truth;
    # null settings take the method's own defaults (pipeline/train/online/<method>.py)
    "online": {"method": None, "refine": None, "layer_filter": None, "static_layers": None, "filter_layers": None,
               "switch_iter": None, "box_threshold": None, "exact_boxes": None, "par_iterations": None,
               # ExCEL only: diversity-loss targets from the segmentation, text enrichment
               "segmentation_targets_from": None, "tse": True, "descriptions": None, "attribute_bank": None,
               # WeCLIP+ only (pipeline/train/online/weclip_plus.py): GradCAM's input block, CAMs x segmentation
               # softmax, box masks, confident-pixel replacement, weights of the Dice and cross-branch losses
               "cam_input_block": None, "seg_weighting": None, "box_masks": None, "replace_from": None,
               "replace_threshold": None, "dice_weight": None, "cross_weight": None},
    "infer": {"scales": [1.0, 0.75], "flip": True, "long_side": None, "square": None, "unflipped_scales": [],
              "window": None, "stride": None, "crf": False, "crf_preset": None, "crf_params": None,
              "crf_backend": "auto", "crf_max_pixels": 1_000_000, "average_at": "image"},
    "val": {"scales": [1.0], "flip": False, "long_side": None, "square": None, "window": None, "stride": None,
            "crf": False},
}
# Keys that may change between an interrupted run and its resumption without changing the result.
RESUME_FREE = {"data.workers", "train.ckpt_every", "train.keep_checkpoints", "train.log_every", "train.device",
               "train.val_every", "train.val_max_images", "data.root", "data.pseudo", "model.clip", "model.dino", "infer",
               "val"}


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


# ------------------------------------------------------------------------------------- config
def _merge(base: dict, new: Mapping, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        if k not in out:
            raise ConfigError(f"{where}: unknown key {k!r}; valid keys here: {', '.join(sorted(out))}")
        if isinstance(out[k], dict) and k not in ("crf_params",):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}: {k!r} must be a mapping")
            out[k] = _merge(out[k], v, f"{where}.{k}")
        elif isinstance(out[k], dict):
            out[k] = {**out[k], **dict(v)}
        else:
            out[k] = v
    return out


def apply_override(cfg: dict, item: str) -> dict:
    """'section.key=value' (value parsed as YAML: 1e-3, [1,2], null, true) -> new config."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    node: Any = value
    for part in reversed(key.strip().split(".")):
        node = {part: node}
    return _merge(cfg, node, "override")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict:
    """DEFAULTS <- YAML file <- overrides; unknown keys are errors."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from e
        cfg = _merge(cfg, doc, str(path))
    for item in overrides:
        cfg = apply_override(cfg, item)
    check_config(cfg)
    return cfg


def check_config(cfg: Mapping) -> None:
    t, s, d = cfg["train"], cfg["schedule"], cfg["data"]
    if t["loss"] not in LOSSES:
        raise ConfigError(f"train.loss must be one of {LOSSES}, got {t['loss']!r}")
    if t["amp"] not in ("auto", "none", "bf16", "fp16"):
        raise ConfigError(f"train.amp must be auto, none, bf16 or fp16, got {t['amp']!r}")
    if cfg["optim"]["name"] not in ("adamw", "sgd"):
        raise ConfigError(f"optim.name must be adamw or sgd, got {cfg['optim']['name']!r}")
    if d["supervision"] not in ("pseudo", "gt"):
        raise ConfigError(f"data.supervision must be pseudo (labels from data.pseudo) or gt, got {d['supervision']!r}")
    if cfg["model"]["statistics"] not in ("batch", "image"):
        raise ConfigError(f"model.statistics must be batch or image, got {cfg['model']['statistics']!r}")
    online = cfg["online"]["method"]
    if online is not None:
        from .online import METHODS

        if online not in METHODS:
            raise ConfigError(f"online.method must be one of {', '.join(METHODS)} or null, got {online!r}")
    model = cfg["model"]["name"]
    if online is not None and model != online:
        raise ConfigError(f"online.method={online} makes labels for model.name={online}, not {model}")
    if float(t["aff_weight"]) and model not in ("weclip", "excel", "weclip-plus"):
        raise ConfigError(f"the affinity loss (train.aff_weight) needs model.name weclip, excel or weclip-plus, not {model}")
    for key, v in (("schedule.iters", s["iters"]), ("schedule.lr_step", s["lr_step"]),
                   ("train.batch_size", t["batch_size"]), ("train.accum", t["accum"])):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    from ..models import check_model_config

    try:
        check_model_config(cfg["model"], d["normalize"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and k not in ("crf_params",):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_differences(old: Mapping, new: Mapping) -> list[str]:
    """Config keys whose change would make a resumed run differ from an uninterrupted one."""
    a, b = flatten(old), flatten(new)
    free = lambda k: k in RESUME_FREE or k.split(".")[0] in RESUME_FREE  # noqa: E731
    return sorted(k for k in set(a) | set(b) if not free(k) and a.get(k) != b.get(k))


# --------------------------------------------------------------------------------- pure pieces
def lr_factor(step: int, iters: int, warmup_iters: int, warmup_ratio: float, power: float, every: int = 1) -> float:
    """WeCLIP's learning-rate factor at 0-based ``step``: linear warm-up from ``warmup_ratio`` over
    ``warmup_iters``, then poly (1 - step/iters) ** power with ``step`` rounded down to a multiple of
    ``every`` (deeplab-pytorch: power 0.9, no warm-up, lr updated every 10 iterations)."""
    if step < warmup_iters:
        return 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return max(0.0, 1 - every * (step // every) / iters) ** power


def model_loss(model: nn.Module, outputs, labels: torch.Tensor, kind: str = "ce", pool: Pool = ONE) -> torch.Tensor:
    """``segmentation_loss`` of the model's outputs, through the model's ``training_loss`` hook when it
    has one (DeepLab's multi-scale outputs: a sum over scales at their own resolutions)."""
    hook = getattr(ckpt_io.unwrap(model), "training_loss", None)
    loss_fn = lambda lg, lb: segmentation_loss(lg, lb, kind, pool)  # noqa: E731
    return hook(outputs, labels, loss_fn) if hook else loss_fn(outputs, labels)


def build_optimizer(model: nn.Module, optim: Mapping) -> torch.optim.Optimizer:
    """AdamW (WeCLIP) or SGD with momentum (deeplab-pytorch) over the model's ``param_groups``; each group
    remembers its base lr as 'base_lr' for the schedule."""
    groups = model.param_groups(float(optim["lr"]), float(optim["head_lr_mult"]), float(optim["weight_decay"]))
    for g in groups:
        g["base_lr"] = g["lr"]
    if optim["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=float(optim["lr"]), betas=tuple(optim["betas"]), eps=float(optim["eps"]))
    return torch.optim.SGD(groups, lr=float(optim["lr"]), momentum=float(optim["momentum"]))


# ------------------------------------------------------------------------------- environment
def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the DDP processes (in place)."""
    dist.all_reduce(t)
    return t


def pick_device(want: str, local_rank: int) -> torch.device:
    if want == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(want)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={want} but CUDA is not available")
    return dev


def amp_dtype(want: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: 'auto' = bf16 on CUDA when supported (else fp16), none on CPU."""
    if want == "none" or (want == "auto" and device.type != "cuda"):
        return None
    if want == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if want == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for ``dtype`` (None: full precision)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


# -------------------------------------------------------------------------------------- data
def open_data(cfg: Mapping, log: Callable[[str], None]):
    """(dataset, train samples, val samples) from the ``data`` section."""
    from ..data.datasets import build_dataset
    from ..data.segdata import make_samples

    d = cfg["data"]
    if not d["root"]:
        raise ConfigError("data.root: the dataset folder is required (e.g. data.root=~/data/VOC2012)")
    ds = build_dataset(d["dataset"], d["root"], d["classes"], d["labels"], d["masks"])
    online = cfg["online"]["method"] is not None
    if d["supervision"] == "pseudo" and not online:
        if not d["pseudo"]:
            raise ConfigError("data.pseudo: the pseudo-label folder is required (or data.supervision=gt)")
        if not Path(d["pseudo"]).expanduser().is_dir():
            raise FileNotFoundError(f"{d['pseudo']}: pseudo-label folder not found (run make pseudo first)")
    labels_dir = Path(d["pseudo"]).expanduser() if d["supervision"] == "pseudo" and not online else None
    train = image_level_samples(ds, d["split"]) if online else make_samples(ds, ds.ids(d["split"]), labels_dir)
    val = []
    if d["val_split"]:
        val_ids = ds.ids(d["val_split"])
        if cfg["train"]["val_max_images"]:
            val_ids = val_ids[: int(cfg["train"]["val_max_images"])]
        val = make_samples(ds, val_ids, None)
    source = "image-level labels, online pseudo labels" if online else "ground truth" if labels_dir is None else labels_dir
    log(f"data: {len(train[0] if online else train)} training images ({source}), {len(val)} validation images")
    return ds, train, val


def image_level_samples(ds, split: str) -> tuple[list[str], list[list[int]]]:
    """(image paths, ascending 0-based classes) of ``split`` for online training: the dataset's
    image-level labels (VOC XML, labels file), never its masks; every problem listed in one error."""
    from ..data.datasets import Dataset, SampleError

    if getattr(ds, "_labels", None) is None and type(ds)._own_labels is Dataset._own_labels:
        raise ConfigError(f"{ds.root}: online training reads image-level labels, and this {ds.name} dataset has them "
                          "only in its masks; pass a labels file (data.labels=..., e.g. CLIP-ES's COCO cls_labels)")
    paths, labels, errors = [], [], []
    for i in ds.ids(split):
        path = ds.image_path(i)
        try:
            if not Path(path).is_file():
                raise SampleError(f"{path}: image file not found (image id {i})")
            labels.append(sorted(ds.labels(i)))
            paths.append(str(path))
        except SampleError as e:
            errors.append(str(e))
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise SampleError(f"{len(errors)} training images are unusable:\n  " + "\n  ".join(errors[:20]) + more)
    return paths, labels


def aug_config(d: Mapping):
    from ..data.segdata import AugConfig

    return AugConfig(crop=int(d["crop"] or 0), scale_range=tuple(d["scale_range"]) if d["scale_range"] else None,
                     scales=tuple(d["scales"]) if d["scales"] else None, flip=bool(d["flip"]),
                     normalize=d["normalize"], pad_image=d["pad_image"])


# ---------------------------------------------------------------------------------------- logs
class RunLog:
    """CSV log (rewritten on resume up to the resume point) plus TensorBoard when installed."""

    FIELDS = ("iteration", "loss", "lr", "seconds", "iters_per_s", "peak_mem_mb", "val_miou_pct", "loss_seg", "loss_aff")

    def __init__(self, out: Path, start: int, tensorboard: bool, log: Callable[[str], None]):
        self.path = out / "log.csv"
        rows = []
        if start > 0 and self.path.is_file():
            rows = [r for r in csv.DictReader(self.path.open()) if int(r["iteration"]) <= start]
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        write_bytes(self.path, buf.getvalue().encode())
        self.file = self.path.open("a", newline="")
        self.csv = csv.DictWriter(self.file, self.FIELDS, lineterminator="\n", extrasaction="ignore")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
            except ImportError:
                log("TensorBoard is not installed (pip install tensorboard): logging to log.csv only")

    def write(self, row: Mapping[str, Any]) -> None:
        self.csv.writerow({k: ("" if row.get(k) is None else row[k]) for k in self.FIELDS})
        self.file.flush()
        if self.tb:
            for k in ("loss", "lr", "iters_per_s", "peak_mem_mb", "val_miou_pct", "loss_seg", "loss_aff"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}" if k != "val_miou_pct" else "val/miou_pct", row[k], row["iteration"])

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()


# ------------------------------------------------------------------------------------ the loop
def validate(model: nn.Module, samples, cfg: Mapping, device: torch.device, num_classes: int) -> float:
    """mIoU (0..1) of ``model`` on validation samples with the ``val`` inference settings."""
    from ..eval.infer import InferConfig, predict_image
    from ..eval.metrics import confusion_matrix, mean_iou
    from ..data.segdata import read_pair

    icfg = InferConfig.from_dict({**cfg["val"], "normalize": cfg["data"]["normalize"]})
    conf = np.zeros((num_classes, num_classes), np.int64)
    was_training = model.training
    model.eval()
    for s in samples:
        image, mask = read_pair(s)
        conf += confusion_matrix(predict_image(model, image, icfg, device), mask, num_classes)
    model.train(was_training)
    return mean_iou(conf)


def train(cfg: Mapping, out_dir: str | Path, *, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, tensorboard: bool = True, clip_model: nn.Module | None = None,
          label_maker=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train per ``cfg`` into ``out_dir``; returns {iteration, loss, val_miou (0..1), checkpoint, seconds}.

    With ``online.method`` set, each batch's labels are made while training (``pipeline.train.online``) from
    the images' image-level labels; ``label_maker`` replaces the configured one (tests).

    ``stop_at``: save and return after this iteration (the schedule still spans ``schedule.iters``;
    ``resume=True`` continues). ``clip_model``: a CLIP module to use instead of ``model.clip`` (tests).
    """
    from tqdm import tqdm

    from ..models import build_model, trainable_parameters
    from ..data.segdata import ResumableBatchSampler, SegTrainSet, validate_samples

    cfg = copy.deepcopy(dict(cfg))
    check_config(cfg)
    rank, world, local_rank = dist_env()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    say = log if rank == 0 else (lambda *_: None)
    out = check_output_folder(out_dir)
    ckdir = out / "checkpoints"
    device = pick_device(cfg["train"]["device"], local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    t_cfg, s_cfg = cfg["train"], cfg["schedule"]
    seed = int(t_cfg["seed"])
    seed_all(seed + rank)

    # -- inputs, checked in full before anything trains -------------------------------------------
    online = cfg["online"]["method"] is not None
    ds, train_samples, val_samples = open_data(cfg, say)
    class_names = ["background", *ds.classes.names]
    n_cls = len(class_names)
    problem = None
    if rank == 0:
        try:
            if not online:  # online samples were checked when listed (image-level labels, no label maps)
                validate_samples(train_samples, n_cls - 1, "training")
            if val_samples:
                validate_samples(val_samples, n_cls - 1, "validation")
        except ValueError as e:
            problem = e
    if world > 1:
        flag = [None if problem is None else str(problem)]
        dist.broadcast_object_list(flag, src=0)
        if flag[0] is not None and problem is None:
            problem = ValueError(flag[0])
    if problem is not None:
        raise problem

    # -- model, optimiser, state ----------------------------------------------------------------
    if online and clip_model is None:
        from ..clip.model import load_clip

        if not cfg["model"]["clip"]:
            raise ConfigError("model.clip: path to the CLIP checkpoint (ViT-B-16.pt) is required for "
                              f"{cfg['model']['name']}")
        clip_model = load_clip(cfg["model"]["clip"], "cpu", torch.float32)
    model = build_model(cfg["model"], n_cls, clip=clip_model, log=say).to(device)
    if online and label_maker is None:
        from .online import build_label_maker

        label_maker = build_label_maker(cfg["online"], clip_model, ds.classes, model_cfg=cfg["model"],
                                        dataset=cfg["data"]["dataset"])
    say(f"model {cfg['model']['name']}: {trainable_parameters(model):,} trainable parameters")
    optimizer = build_optimizer(model, cfg["optim"])
    dtype = amp_dtype(t_cfg["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    meta = {"model": cfg["model"], "family": getattr(model, "family", cfg["model"]["name"]), "num_classes": n_cls,
            "class_names": class_names, "normalize": cfg["data"]["normalize"], "infer": cfg["infer"], "config": cfg}
    start = 0
    pointer = ckdir / ckpt_io.LATEST
    if resume and pointer.is_file():
        ck = ckpt_io.load(ckdir)
        ckpt_io.check_compatible(ck, cfg["model"]["name"], class_names)
        diff = resume_differences(ck["meta"]["config"], cfg)
        if diff:
            raise ConfigError(f"{ck['path']}: cannot resume with a different configuration (differs in: "
                              f"{', '.join(diff)}); use another output folder")
        ckpt_io.load_model_state(model, ck["model"], ck["path"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        start = int(ck["iteration"])
        rngs = ck["rng"]
        if len(rngs) == world:
            ckpt_io.set_rng_state(rngs[rank])
        else:
            say(f"resume: checkpoint saved by {len(rngs)} process(es), now {world}: RNGs re-seeded")
            seed_all(seed + rank + start)
        say(f"resumed from {ck['path']} at iteration {start}")
    elif resume:
        say(f"--resume: {out} holds no checkpoint yet (checkpoints/{ckpt_io.LATEST}); starting a new run there")
    elif pointer.is_file():
        raise ConfigError(f"{out} already holds a run (checkpoints/{ckpt_io.LATEST}); pass --resume to continue "
                          "it, or choose another output folder")
    if rank == 0:
        write_json(out / "config.json", {"config": cfg, "code_version": code_version(), "world_size": world})
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # -- data stream ----------------------------------------------------------------------------
    batch, accum = int(t_cfg["batch_size"]), int(t_cfg["accum"])
    sampler = ResumableBatchSampler(len(train_samples[0] if online else train_samples), batch, seed, start * accum,
                                    rank, world)
    workers = int(cfg["data"]["workers"])
    if online:
        from .online import OnlineBatch
        from ..data.segdata import ImageLevelTrainSet

        train_set = ImageLevelTrainSet(*train_samples, n_cls - 1, aug_config(cfg["data"]), seed)
    else:
        train_set = SegTrainSet(train_samples, aug_config(cfg["data"]), seed)
    aff_w, aff_radius = float(t_cfg["aff_weight"]), int(t_cfg["aff_radius"])
    extra_loss = getattr(label_maker, "extra_loss", None) if online else None   # a method's own loss terms
    pool = Pool(world, all_sum) if world > 1 else ONE   # losses pooled over all processes' batches
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed))  # its own generator: the global RNG stays untouched
    batches = iter(loader)

    iters = int(s_cfg["iters"])
    end = min(iters, stop_at) if stop_at else iters
    runlog = RunLog(out, start, tensorboard, say) if rank == 0 else None
    bar = tqdm(total=iters, initial=start, disable=not progress or rank != 0, dynamic_ncols=True, desc="train")
    last_loss, val_miou, t0, t_log = float("nan"), None, time.perf_counter(), time.perf_counter()
    it_log = start
    ck_path = None
    model.train()
    try:
        for it in range(start, end):
            f = lr_factor(it, iters, int(s_cfg["warmup_iters"]), float(s_cfg["warmup_ratio"]), float(s_cfg["power"]),
                          int(s_cfg["lr_step"]))
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * f
            loss_sum = seg_sum = aff_sum = 0.0
            for k in range(accum):
                images, targets, *keys = next(batches)
                images = images.to(device, non_blocking=True)
                sync = world == 1 or k == accum - 1
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with autocast(device, dtype):
                        if online:
                            out = model(images, outputs="train", attention_blocks=label_maker.attention_blocks)
                            batch_in = OnlineBatch(images, [torch.nonzero(t).flatten().tolist() for t in targets],
                                                   [tuple(map(int, key)) for key in keys[0]])
                            made = label_maker(batch_in, out, it)
                            labels = made.labels
                            pairs = labels if made.affinity_targets is None else made.affinity_targets
                        else:
                            out = model(images, outputs="train") if aff_w else {"logits": model(images)}
                            labels = pairs = targets.to(device, non_blocking=True)
                    loss_seg = model_loss(model, out["logits"], labels, t_cfg["loss"], pool)
                    loss_aff = affinity_loss(out["affinity"], affinity_labels(pairs, out["grid"], aff_radius), pool) \
                        if aff_w else torch.zeros((), device=device)
                    loss = (loss_seg + aff_w * loss_aff + (extra_loss(out, made, pool) if extra_loss else 0)) / accum
                    scaler.scale(loss).backward()
                loss_sum += float(loss.detach())
                seg_sum += float(loss_seg.detach()) / accum
                aff_sum += float(loss_aff.detach()) / accum
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:   # the processes' mean of their pooled losses is the global batch's loss
                sums = all_sum(torch.tensor([loss_sum, seg_sum, aff_sum], dtype=torch.float64, device=device))
                loss_sum, seg_sum, aff_sum = (sums / world).tolist()
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss became {loss_sum} at iteration {it + 1}; lower optim.lr or use amp=bf16")
            last_loss = loss_sum
            step = it + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            do_val = bool(val_samples) and t_cfg["val_every"] and (step % int(t_cfg["val_every"]) == 0 or step == iters)
            if do_val:
                if rank == 0:
                    val_miou = validate(ckpt_io.unwrap(model), val_samples, cfg, device, n_cls)
                    say(f"iteration {step}: validation mIoU {100 * val_miou:.2f}%")
                if world > 1:
                    dist.barrier()
            if rank == 0 and (step % int(t_cfg["log_every"]) == 0 or do_val or step == end):
                now = time.perf_counter()
                runlog.write({"iteration": step, "loss": round(loss_sum, 6), "lr": optimizer.param_groups[0]["lr"],
                              "seconds": round(now - t0, 3),
                              "iters_per_s": round((step - it_log) / max(now - t_log, 1e-9), 4),
                              "peak_mem_mb": peak_memory_mb(device),
                              "val_miou_pct": round(100 * val_miou, 4) if do_val else None,
                              "loss_seg": round(seg_sum, 6), "loss_aff": round(aff_sum, 6) if aff_w else None})
                t_log, it_log = now, step
            if step % int(t_cfg["ckpt_every"]) == 0 or step == end:
                ck_path = _save(model, optimizer, scaler, meta, step, s_cfg, ckdir, int(t_cfg["keep_checkpoints"]),
                                rank, world)
    finally:
        bar.close()
        if runlog:
            runlog.close()
    return {"iteration": end, "loss": last_loss, "val_miou": val_miou, "checkpoint": str(ck_path) if ck_path else None,
            "seconds": round(time.perf_counter() - t0, 3)}


def _save(model, optimizer, scaler, meta, step: int, schedule: Mapping, ckdir: Path, keep: int,
          rank: int, world: int) -> Path | None:
    """All ranks send their RNG states to rank 0, which writes the checkpoint and then the pointer."""
    rng = ckpt_io.rng_state()
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    path = None
    if rank == 0:
        path = ckpt_io.save(ckdir / f"iter_{step:07d}.pt", {
            "meta": meta, "iteration": step, "model": ckpt_io.model_state(model),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "scheduler": {"iteration": step, **dict(schedule)}, "rng": rngs})
        ckpt_io.write_latest(ckdir, path.name, step)
        ckpt_io.prune(ckdir, keep)
    if world > 1:
        dist.barrier()
    return path
