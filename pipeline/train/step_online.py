"""Online labels: each batch's labels are made while the model trains (``pipeline.train.online``),
from the frozen CLIP pass the model runs anyway and the images' image-level labels; no label files,
no masks."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import ConfigError


class OnlineStep:
    """The ``LabelStep`` of online training; its label maker is set by ``prepare`` once the model
    (and the CLIP it shares with the label maker) is built."""

    source = "image-level labels, online pseudo labels"

    def __init__(self, cfg: Mapping[str, Any], ds):
        self.cfg = cfg
        self.paths, self.image_labels = image_level_samples(ds, cfg["data"]["split"])
        self.size = len(self.paths)
        self.num_classes = len(ds.classes.names)   # foreground classes
        self.maker = None

    def identity(self) -> None:
        """No label files: the labels come from the dataset's image-level labels and the CLIP."""

    def check(self, num_classes: int) -> None:
        """Nothing left to check: the samples were checked when listed (image-level labels, no label maps)."""

    def clip(self, clip_model: nn.Module | None) -> nn.Module:
        """The frozen CLIP the model and the label maker share: ``clip_model``, else ``model.clip``."""
        if clip_model is not None:
            return clip_model
        from ..clip.model import load_clip

        if not self.cfg["model"]["clip"]:
            raise ConfigError("model.clip: path to the CLIP checkpoint (ViT-B-16.pt) is required for "
                              f"{self.cfg['model']['name']}")
        return load_clip(self.cfg["model"]["clip"], "cpu", torch.float32)

    def prepare(self, clip_model: nn.Module, classes, label_maker=None) -> None:
        """Set the label maker: ``label_maker``, else the one ``online`` configures."""
        if label_maker is None:
            from .online import build_label_maker

            label_maker = build_label_maker(self.cfg["online"], clip_model, classes, model_cfg=self.cfg["model"],
                                            dataset=self.cfg["data"]["dataset"])
        self.maker = label_maker

    def dataset(self, aug, seed: int) -> torch.utils.data.Dataset:
        from ..data.segdata import ImageLevelTrainSet

        return ImageLevelTrainSet(self.paths, self.image_labels, self.num_classes, aug, seed)

    def labels(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, keys: list, iteration: int):
        from .online import OnlineBatch

        out = model(images, outputs="train", attention_blocks=self.maker.attention_blocks)
        batch = OnlineBatch(images, [torch.nonzero(t).flatten().tolist() for t in targets],
                            [tuple(map(int, key)) for key in keys[0]])
        made = self.maker(batch, out, iteration)
        self.made = made
        return out, made.labels, made.labels if made.affinity_targets is None else made.affinity_targets

    def extra_loss(self, outputs: Mapping[str, Any], pool) -> torch.Tensor | None:
        """The maker's own loss terms (WeCLIP+: Dice and cross-branch; ``LabelMaker.extra_loss``)."""
        extra = getattr(self.maker, "extra_loss", None)
        return None if extra is None else extra(outputs, self.made, pool)


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
