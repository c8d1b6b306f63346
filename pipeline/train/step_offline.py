"""Offline labels: each crop's labels come with it, cropped from a label PNG of ``data.pseudo`` (the
pseudo-label stage's output) or, with ``data.supervision: gt``, from the ground-truth mask."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import ConfigError


class OfflineStep:
    """The ``LabelStep`` of training on label files; lists (and on ``check`` validates) the pairs."""

    def __init__(self, cfg: Mapping[str, Any], ds):
        from ..data.segdata import make_samples

        d = cfg["data"]
        if d["supervision"] == "pseudo":
            if not d["pseudo"]:
                raise ConfigError("data.pseudo: the pseudo-label folder is required (or data.supervision=gt)")
            if not Path(d["pseudo"]).expanduser().is_dir():
                raise FileNotFoundError(f"{d['pseudo']}: pseudo-label folder not found (run make pseudo first)")
        labels_dir = Path(d["pseudo"]).expanduser() if d["supervision"] == "pseudo" else None
        self.labels_dir = labels_dir
        self.samples = make_samples(ds, ds.ids(d["split"]), labels_dir)
        self.size = len(self.samples)
        self.source = "ground truth" if labels_dir is None else str(labels_dir)
        self.affinity = bool(float(cfg["train"]["aff_weight"]))

    def clip(self, clip_model: nn.Module | None) -> nn.Module | None:
        return clip_model   # a CLIP model loads its own (model.clip) unless a test hands one over

    def prepare(self, clip_model: nn.Module | None, classes, label_maker=None) -> None:
        """Nothing to prepare: the labels come with the batches."""

    def identity(self) -> dict[str, Any] | None:
        """What the pseudo labels are, by content, not by path (None for the ground truth): the
        configuration in the folder's manifest (the pseudo-label stage's: its settings and its CAMs'),
        else, for a folder made elsewhere, the sha256 of the training split's label files."""
        if self.labels_dir is None:
            return None
        try:
            return {"manifest": json.loads((self.labels_dir / "manifest.json").read_text())["config"]}
        except (OSError, ValueError, KeyError, TypeError):
            digest = hashlib.sha256()
            for s in self.samples:
                digest.update(f"{s.image_id}\n".encode())
                digest.update(Path(s.label).read_bytes())
            return {"files_sha256": digest.hexdigest()}

    def check(self, num_classes: int) -> None:
        from ..data.segdata import validate_samples

        validate_samples(self.samples, num_classes - 1, "training")

    def dataset(self, aug, seed: int) -> torch.utils.data.Dataset:
        from ..data.segdata import SegTrainSet

        return SegTrainSet(self.samples, aug, seed)

    def labels(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, keys: list, iteration: int):
        out = model(images, outputs="train") if self.affinity else {"logits": model(images)}
        labels = targets.to(images.device, non_blocking=True)
        return out, labels, labels

    def extra_loss(self, outputs, pool) -> None:
        return None
