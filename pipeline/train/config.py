"""Training configuration: every key with its type and default, YAML files and ``--set`` overrides
merged onto them, and the check that refuses unknown or contradictory keys.

    cfg = load_config("configs/weclip_voc.yaml", ["schedule.iters=1000", "data.root=~/data/VOC2012"])

The keys are the dataclasses below, read through OmegaConf (structured configs). It was chosen
because it does what the hand-written merge did not, with no code of ours: typed dot-list overrides
(``optim.lr=1e-3`` is a float, its YAML reader takes YAML 1.2's floats, where PyYAML's 1.1 reads a
string), values converted to or refused for their key's type, unknown keys refused, lists replaced
and mappings merged key by key; it reads the config files as they are, so they stay YAML with their
comments. It is a maintained, widely used library (Hydra's core; WeCLIP's training scripts read
their configs with it), and the config stays a plain dict everywhere else.
"""
from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .losses import LOSSES


@dataclass
class ModelSection:
    name: str = "weclip"
    clip: str | None = None
    encoder_blocks: int | None = None
    width: int = 256
    heads: int = 8
    depth: int = 3
    dropout: float = 0.1
    layers: list[int] = field(default_factory=lambda: [3, 4, 23, 3])
    base_width: int = 64
    layout: str = "torchvision"
    msc_scales: list[float] = field(default_factory=list)
    freeze_bn: bool | str = "auto"
    pretrained: str | None = None
    calibrated_blocks: int = 5
    attention_layers: int = 6
    pos_via: int | None = 20
    eval_pos_via: int | None = None
    exact: bool = True
    statistics: str = "batch"
    relation_scale: float = 3.0
    # WeCLIP+ only: the DINOv2 backbone file; which branches predict (both | clip | dino)
    dino: str | None = None
    branches: str = "both"


@dataclass
class DataSection:
    dataset: str = "voc"
    root: str | None = None
    classes: str | None = None
    labels: str | None = None
    masks: str | None = None
    split: str = "train_aug"
    supervision: str = "pseudo"
    pseudo: str | None = None
    val_split: str | None = "val"
    crop: int | None = 320
    scale_range: list[float] | None = field(default_factory=lambda: [0.5, 2.0])
    scales: list[float] | None = None
    flip: bool = True
    normalize: str = "imagenet"
    pad_image: str = "zero"
    workers: int = 4


@dataclass
class OptimSection:
    name: str = "adamw"
    lr: float = 2.0e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    momentum: float = 0.9


@dataclass
class ScheduleSection:
    iters: int = 30000
    warmup_iters: int = 50
    warmup_ratio: float = 1.0e-6
    power: float = 1.0
    lr_step: int = 1


@dataclass
class TrainSection:
    batch_size: int = 4
    accum: int = 1
    seed: int = 1
    loss: str = "ce"
    amp: str = "auto"
    device: str = "auto"
    ckpt_every: int = 2000
    keep_checkpoints: int = 2
    log_every: int = 20
    val_every: int | None = 2000
    val_max_images: int | None = None
    aff_weight: float = 0.0
    aff_radius: int = 8


@dataclass
class OnlineSection:
    """Online pseudo labels (pipeline/train/online): method null = labels from data.pseudo / ground
    truth; null settings take the method's own defaults (pipeline/train/online/<method>.py)."""

    method: str | None = None
    refine: str | None = None
    layer_filter: bool | None = None
    static_layers: int | None = None
    filter_layers: int | None = None
    switch_iter: int | None = None
    box_threshold: float | None = None
    exact_boxes: bool | None = None
    par_iterations: int | None = None
    # ExCEL only: diversity-loss targets from the segmentation, text enrichment
    segmentation_targets_from: int | None = None
    tse: bool = True
    descriptions: str | None = None
    attribute_bank: str | None = None
    # WeCLIP+ only (pipeline/train/online/weclip_plus.py): GradCAM's input block, CAMs x segmentation
    # softmax, box masks, confident-pixel replacement, weights of the Dice and cross-branch losses
    cam_input_block: int | None = None
    seg_weighting: bool | None = None
    box_masks: bool | None = None
    replace_from: int | None = None
    replace_threshold: float | None = None
    dice_weight: float | None = None
    cross_weight: float | None = None


@dataclass
class InferSection:
    scales: list[float] = field(default_factory=lambda: [1.0, 0.75])
    flip: bool = True
    long_side: int | None = None
    square: int | None = None
    unflipped_scales: list[float] = field(default_factory=list)
    window: int | None = None
    stride: int | None = None
    crf: bool = False
    crf_preset: str | None = None
    crf_params: dict[str, Any] | None = None
    crf_backend: str = "auto"
    crf_max_pixels: int | None = 1_000_000
    average_at: str = "image"


@dataclass
class ValSection:
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    long_side: int | None = None
    square: int | None = None
    window: int | None = None
    stride: int | None = None
    crf: bool = False


@dataclass
class Config:
    """Every key a config may set; YAML files and --set overrides are merged onto these."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    online: OnlineSection = field(default_factory=OnlineSection)
    infer: InferSection = field(default_factory=InferSection)
    val: ValSection = field(default_factory=ValSection)


# Keys that may change between an interrupted run and its resumption without changing the result.
RESUME_FREE = {"data.workers", "train.ckpt_every", "train.keep_checkpoints", "train.log_every", "train.device",
               "train.val_every", "train.val_max_images", "data.root", "data.pseudo", "model.clip", "model.dino", "infer",
               "val"}


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def defaults() -> dict[str, Any]:
    """Every key's default, as a plain dict of sections."""
    return OmegaConf.to_container(OmegaConf.structured(Config))


# ------------------------------------------------------------------------------ typed merging
def _key_type(key: str) -> Any:
    """The annotation of a dotted key ('optim.lr' -> float), or None when no dataclass declares it."""
    cls: Any = Config
    for part in key.split("."):
        if not is_dataclass(cls) or part not in {f.name for f in fields(cls)}:
            return None
        cls = typing.get_type_hints(cls)[part]
    return cls


def _describe(t: Any) -> str:
    """A type annotation in words: float -> 'a float', int | None -> 'an integer or null'."""
    names = {float: "a float", int: "an integer", bool: "true or false", str: "a string", Any: "any value"}
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        words = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is dict or is_dataclass(t):
        return "a mapping"
    return names.get(t, getattr(t, "__name__", str(t)))


def _lookup(doc: Any, key: str) -> Any:
    for part in key.split("."):
        doc = doc.get(part) if isinstance(doc, Mapping) else None
    return doc


def _merge(cfg, doc: Mapping, where: str):
    """``cfg`` (an OmegaConf structured config) with ``doc`` merged on; ``ConfigError`` naming the key:
    for an unknown key the nearest known one, for a value of the wrong type the key's type."""
    for k, v in doc.items():
        if _key_type(k) is not None and not isinstance(v, Mapping):
            raise ConfigError(f"{where}: {k} is a section (a mapping of its keys), got {v!r}")
    try:
        return OmegaConf.merge(cfg, doc)
    except ConfigKeyError as e:
        parent, _, key = (e.full_key or "").rpartition(".")
        owner = _key_type(parent) if parent else Config
        known = [f.name for f in fields(owner)] if is_dataclass(owner) else []
        nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
        hint = f"; the nearest known key is {'.'.join(filter(None, (parent, nearest[0])))}" if nearest else ""
        raise ConfigError(f"{where}: unknown key {key!r}{f' in {parent}' if parent else ''}{hint}") from None
    except OmegaConfBaseException as e:
        t = _key_type(e.full_key or "")
        if t is None:
            raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
        raise ConfigError(f"{where}: {e.full_key} takes {_describe(t)}, got {_lookup(doc, e.full_key)!r}") from None


def _read(path: Path) -> dict:
    """A YAML config file as a mapping of sections (an empty section counts as none)."""
    try:
        doc = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: cannot read config ({str(e).splitlines()[0]})") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a config file is a mapping of sections (model:, data:, ...), not a list")
    return {k: v for k, v in doc.items() if v is not None}


def _override(item: str) -> tuple[str, dict]:
    """'section.key=value' (value read as YAML 1.2: 1e-3, [1,2], null, true) -> (key, nested dict)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key = item.split("=", 1)[0].strip()
    try:
        return key, OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"override {item}: cannot read the value ({str(e).splitlines()[0]})") from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict:
    """defaults <- YAML file <- overrides -> the checked config (plain dict of sections); every key the
    file or an override sets must be one the run reads (``check_config``)."""
    cfg, given = OmegaConf.structured(Config), set()
    if path:
        path = Path(path)
        doc = _read(path)
        cfg = _merge(cfg, doc, str(path))
        given |= set(flatten(doc))
    for item in overrides:
        key, doc = _override(item)
        cfg = _merge(cfg, doc, f"override {item}")
        given.add(".".join(key.split(".")[:2]))
    return check_config(_container(cfg), given)


def _container(cfg) -> dict:
    """The plain dict of an OmegaConf config, ``${...}`` interpolations resolved (``${oc.env:HOME}``)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key}: {str(e).splitlines()[0]} (a literal $ followed by {{ is read as an "
                          "interpolation)") from None


def typed(cfg: Mapping) -> dict:
    """``cfg`` with every key of ``Config``, each value converted to its key's type (``ConfigError``
    for an unknown key or a value that does not convert)."""
    return _container(_merge(OmegaConf.structured(Config), cfg, "config"))


# ---------------------------------------------------------------------------------- the check
def unread_keys(cfg: Mapping) -> dict[str, str]:
    """Keys the chosen model, online method and optimiser do not read -> why, naming who reads them.
    What each one reads is declared next to it (``models.CONFIG_KEYS``, ``online.CONFIG_KEYS``,
    ``optim.CONFIG_KEYS``); keys none of them declares are read by every run."""
    from ..models import CONFIG_KEYS as MODEL_KEYS
    from .online import CONFIG_KEYS as METHOD_KEYS
    from .optim import CONFIG_KEYS as OPTIM_KEYS

    scopes = (("model", cfg["model"]["name"], "the {} model", MODEL_KEYS),
              ("online", cfg["online"]["method"], "online method {}", METHOD_KEYS),
              ("optim", cfg["optim"]["name"], "optimiser {}", OPTIM_KEYS))
    out = {}
    for section, chosen, who, declared in scopes:
        table = {name: {k if "." in k else f"{section}.{k}" for k in keys} for name, keys in declared.items()}
        whom = who.format(chosen) if chosen else "offline training (online.method: null)"
        for key in sorted(set().union(*table.values()) - table.get(chosen, set())):
            readers = ", ".join(name for name, keys in table.items() if key in keys)
            out[key] = f"{key}: {whom} does not read it (read by {readers})"
    return out


def check_config(cfg: Mapping, given: set[str] | None = None) -> dict:
    """The typed ``cfg``, refusing values that would train silently wrong (``ConfigError`` naming the key),
    among them keys that are set (the dotted keys in ``given``; None: those that differ from their
    default) but that the run does not read."""
    cfg = typed(cfg)
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
    model = cfg["model"]["name"]
    from ..models import MODELS

    if model not in MODELS:
        raise ConfigError(f"model.name must be one of {', '.join(MODELS)}, got {model!r}")
    online = cfg["online"]["method"]
    if online is not None:
        from .online import METHODS, check_settings

        if online not in METHODS:
            raise ConfigError(f"online.method must be one of {', '.join(METHODS)} or null, got {online!r}")
        if model != online:
            raise ConfigError(f"online.method={online} makes labels for model.name={online}, not {model}")
        if d["supervision"] == "gt":
            raise ConfigError(f"data.supervision=gt trains on ground-truth masks, online.method={online} on labels it "
                              "makes from image-level labels: drop one of them")
    if given is None:
        base = flatten(defaults())
        given = {k for k, v in flatten(cfg).items() if base.get(k) != v}
    unread = [why for key, why in unread_keys(cfg).items() if key in given]
    if unread:
        raise ConfigError("; ".join(unread) + f": remove {'it' if len(unread) == 1 else 'them'} (nothing would read "
                          f"{'it' if len(unread) == 1 else 'them'})")
    if online is not None:
        try:
            check_settings(cfg["online"], cfg["model"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for key, v in (("schedule.iters", s["iters"]), ("schedule.lr_step", s["lr_step"]),
                   ("train.batch_size", t["batch_size"]), ("train.accum", t["accum"])):
        if v < 1:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    from ..models import check_model_config

    try:
        check_model_config(cfg["model"], d["normalize"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


# ------------------------------------------------------------------------------------- resume
def flatten(cfg: Mapping) -> dict[str, Any]:
    """{'optim': {'lr': 0.001}} -> {'optim.lr': 0.001} (sections hold keys; mapping values stay whole)."""
    return {f"{s}.{k}": v for s, section in cfg.items() if isinstance(section, Mapping) for k, v in section.items()}


def resume_differences(old: Mapping, new: Mapping) -> list[str]:
    """Config keys whose change would make a resumed run differ from an uninterrupted one. Both sides
    are compared as typed values (a run saved with the string '1e-3' resumes with 0.001), the old
    one as it was when it no longer fits today's keys."""
    try:
        old = typed(old)
    except ConfigError:
        pass
    a, b = flatten(old), flatten(typed(new))
    free = lambda k: k in RESUME_FREE or k.split(".")[0] in RESUME_FREE  # noqa: E731
    return sorted(k for k in set(a) | set(b) if not free(k) and a.get(k) != b.get(k))
