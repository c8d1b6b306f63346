"""Segmentation training checkpoints: atomic writes, weights-only loading, compatibility checks, RNG states.

A checkpoint is a torch file (read with ``weights_only=True``) holding::

    format, meta {model (config section), num_classes, class_names, normalize, config,
    inputs {clip_sha256, dino_sha256, pseudo}}, iteration, model (state_dict without frozen parts, e.g.
    WeCLIP's CLIP encoder), optimizer, scaler, scheduler, rng [per-rank {torch, cuda, numpy, python}]

A run folder keeps ``checkpoints/iter_XXXXXXX.pt`` and ``checkpoints/latest.json`` pointing to the
newest; both are written atomically (temp file, then rename), the pointer last. A run killed between
the two leaves a whole checkpoint newer than its pointer: ``newest`` finds it, and a killed write's
temp file goes with ``remove_temporaries`` when the run continues.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .io import UnreadableWeights, atomic_open, sha256_file, torch_load, write_json

FORMAT = "wsss-seg-checkpoint/1"
LATEST = "latest.json"


class CheckpointMismatch(ValueError):
    """A checkpoint belongs to another model, class list or file format, or a backbone file given with it
    (CLIP, DINOv2) is missing or not the run's; the message says which."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the frozen parts the model names in ``frozen_prefixes`` (cloned to CPU)."""
    model = unwrap(model)
    skip = tuple(getattr(model, "frozen_prefixes", ()))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; every non-frozen key must be present with the right shape."""
    model = unwrap(model)
    skip = tuple(getattr(model, "frozen_prefixes", ()))
    own = {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"shape mismatch {shapes[:3]}" if shapes else ""]
        raise CheckpointMismatch(f"{source}: weights do not fit this model ({'; '.join(p for p in parts if p)})")
    model.load_state_dict(dict(state), strict=False)


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Every global RNG this process uses, in weights-only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(cached)],
             "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the machine that saved it; this one may have fewer
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


# ------------------------------------------------------------------------------------ files
def save(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write a checkpoint atomically (temp file + fsync + rename): a kill never leaves half a file."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
    return path


def newest(folder: str | Path) -> Path | None:
    """The newest whole checkpoint in a checkpoints folder: the file ``latest.json`` names, or a newer
    ``iter_*.pt`` (files are renamed into place whole, so any of them is one; a run killed after writing
    a checkpoint but before its pointer leaves it newer than the pointer's). None when there is none."""
    folder = Path(folder)
    found = sorted(folder.glob("iter_*.pt"))[-1:]
    pointer = folder / LATEST
    if pointer.is_file():
        found.append(folder / json.loads(pointer.read_text())["file"])
    found = [f for f in found if f.is_file()]
    return max(found, key=lambda f: f.name) if found else None


def remove_temporaries(folder: str | Path) -> None:
    """Delete the temp files that killed atomic writes left in ``folder`` (``.<name>.<random>.tmp``)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run folder / its checkpoints folder -> its newest checkpoint (``newest``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            found = newest(folder) if folder.is_dir() else None
            if found is not None:
                return found
    if path.is_file():
        return path
    raise FileNotFoundError(f"{path}: no checkpoint file, and no checkpoints/{LATEST} in it (has the run saved one?)")


def label(path: str | Path) -> str:
    """A name for what a checkpoint file is, for output folders: '<run folder>-<file stem>'
    (outputs/voc/train/weclip_voc/checkpoints/iter_0002000.pt -> 'weclip_voc-iter_0002000')."""
    path = Path(path).resolve()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return f"{run.name}-{path.stem}"


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; ``CheckpointMismatch`` when it is not one of ours."""
    path = resolve(path)
    try:
        ckpt = torch_load(path, "pass another checkpoint (a run folder keeps its newest ones in checkpoints/)")
    except UnreadableWeights as e:
        raise CheckpointMismatch(str(e)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointMismatch(f"{path}: not a segmentation checkpoint of this project (format "
                                 f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, "
                                 f"expected {FORMAT!r})")
    ckpt["path"] = str(path)
    return ckpt


def check_compatible(ckpt: Mapping[str, Any], model_name: str, class_names: list[str]) -> None:
    """Refuse a checkpoint of another model or class list, naming the file and both sides."""
    meta = ckpt["meta"]
    src = ckpt.get("path", "checkpoint")
    if meta["model"].get("name") != model_name:
        raise CheckpointMismatch(f"{src}: checkpoint is a {meta['model'].get('name')!r} model, this run builds "
                                 f"{model_name!r}")
    if list(meta["class_names"]) != list(class_names):
        raise CheckpointMismatch(f"{src}: checkpoint has {meta['num_classes']} classes ({', '.join(meta['class_names'][:5])}"
                                 f", ...), this run has {len(class_names)} ({', '.join(class_names[:5])}, ...)")


def check_clip(meta: Mapping[str, Any], clip: str | Path | None, source: str) -> None:
    """Refuse a CLIP file whose content is not the one the checkpoint's run trained with (the sha256 in
    ``meta['inputs']``), naming both. Not checked: checkpoints saved before the sha256 was recorded, models
    without CLIP, and a missing file (the loader names it)."""
    want = (meta.get("inputs") or {}).get("clip_sha256")
    path = Path(clip).expanduser() if clip else None
    if not want or path is None or not path.is_file():
        return
    got = sha256_file(path)
    if got != want:
        raise CheckpointMismatch(f"{path}: not the CLIP that {source} was trained with (sha256 {got[:16]}..., the "
                                 f"run's {want[:16]}...); pass the run's CLIP file (--clip, CLIP=)")


def check_dino(meta: Mapping[str, Any], dino: str | Path | None, source: str) -> Path | None:
    """The DINOv2 file to build the checkpoint's model with: ``dino`` (``--dino``, e.g. the file moved since
    training) or the path the run recorded; None for models without a DINOv2 (weclip-plus with
    ``branches: clip``, and the others), which refuse ``dino`` rather than ignore it. A missing file is
    named with the flag to pass; a file whose content is not the run's (the sha256 in ``meta['inputs']``)
    is refused naming both files. Not compared: checkpoints saved before that sha256 was recorded."""
    model = meta["model"]
    if model.get("name") != "weclip-plus" or model.get("branches", "both") == "clip":
        if dino:
            kind = (f"'{model.get('name')}' model" if model.get("name") != "weclip-plus" else
                    "'weclip-plus' model with model.branches: clip")
            raise CheckpointMismatch(f"{source}: a {kind}, which has no DINOv2 to replace; drop --dino {dino} "
                                     f"(make: unset DINO)")
        return None
    recorded = model.get("dino")
    if not (dino or recorded):
        return None                                  # the model builder says model.dino is required
    path = Path(dino or recorded).expanduser()
    if not path.is_file():
        where = "given with --dino" if dino else f"where {source} was trained with it"
        raise CheckpointMismatch(f"{path}: DINOv2 file not found ({where}); pass where the run's DINOv2 file is "
                                 f"now with --dino PATH (make: DINO=PATH)")
    want = (meta.get("inputs") or {}).get("dino_sha256")
    if want:
        got = sha256_file(path)
        if got != want:
            raise CheckpointMismatch(f"{path}: not the DINOv2 that {source} was trained with ({recorded}, sha256 "
                                     f"{want[:16]}...; this file's {got[:16]}...); pass that file, wherever it is "
                                     f"now, with --dino PATH (make: DINO=PATH)")
    return path


def write_latest(folder: str | Path, file: str, iteration: int) -> None:
    write_json(Path(folder) / LATEST, {"file": file, "iteration": iteration})


def prune(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``iter_*.pt`` files (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    files = sorted(Path(folder).glob("iter_*.pt"))
    for f in files[:-keep]:
        f.unlink(missing_ok=True)
