"""Export pseudo labels as an mmsegmentation 1.x dataset + training config (mmseg is not needed here).

Writes into ``out_dir`` (by default a folder next to the pseudo labels)::

    train.txt / val.txt        image ids, one per line (mmseg ``ann_file``)
    images/ , val_images/ ...  symlinks, only when images do not already sit as <dir>/<id><suffix>
    mmseg_dataset.py           BaseSegDataset train/val/test dataloaders, pipelines, IoUMetric,
                               classes and palette, reduce_zero_label=False, ignore_index=255
    mmseg_train.py             with --model-config: _base_ = [that mmseg model config, mmseg_dataset.py]
                               + num_classes / crop size

Labels are our PNGs as they are (0 background, c + 1 class c, 255 ignore): exactly mmseg's VOC convention.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ..classes import IGNORE_INDEX, palette
from ..io import code_version, write_bytes


class ExportError(ValueError):
    """The export cannot be made (missing labels, unusable layout); the message names the files."""


def common_layout(paths: Sequence[Path], ids: Sequence[str]) -> tuple[Path, str] | None:
    """(folder, suffix) when every path is ``folder/<id><suffix>`` for one folder and suffix, else None."""
    layouts = set()
    for p, i in zip(paths, ids):
        suffix = p.suffix
        folder = Path(str(p)[: -len(i + suffix)]) if str(p).endswith(i + suffix) else None
        if folder is None:
            return None
        layouts.add((folder, suffix))
        if len(layouts) > 1:
            return None
    return layouts.pop() if layouts else None


def link_layout(paths: Sequence[Path], ids: Sequence[str], folder: Path) -> tuple[Path, str]:
    """Symlink ``folder/<id><suffix>`` -> each path (suffix: the most common one; mmcv decodes by content)."""
    suffix = Counter(p.suffix for p in paths).most_common(1)[0][0]
    for p, i in zip(paths, ids):
        link = folder / f"{i}{suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(p.resolve(), link)
    return folder, suffix


def layout(paths: Sequence[Path], ids: Sequence[str], fallback: Path) -> tuple[Path, str]:
    return common_layout(paths, ids) or link_layout(paths, ids, fallback)


def _missing(paths: Sequence[Path], what: str) -> None:
    gone = [str(p) for p in paths if not p.is_file()]
    if gone:
        more = f" ... ({len(gone)} in all)" if len(gone) > 5 else ""
        raise ExportError(f"{len(gone)} {what} missing: {', '.join(gone[:5])}{more}; does the split list name the "
                          "images you have? Choose it with --split / --val-split (make: SPLIT= / VAL_SPLIT=)")


def dataset_config(classes: Sequence[str], train: dict[str, Any], val: dict[str, Any] | None,
                   crop: int) -> str:
    """mmseg 1.x dataset config source. ``train``/``val``: {img_dir, img_suffix, seg_dir, seg_suffix, ann_file}."""
    pal = palette()[: len(classes)].tolist()

    def ds(d: dict[str, Any], pipeline: str) -> str:
        return (f"dict(type=dataset_type, data_root={str(d['root'])!r}, ann_file={str(d['ann_file'])!r},\n"
                f"        data_prefix=dict(img_path={str(d['img_dir'])!r}, seg_map_path={str(d['seg_dir'])!r}),\n"
                f"        img_suffix={d['img_suffix']!r}, seg_map_suffix={d['seg_suffix']!r}, metainfo=metainfo,\n"
                f"        reduce_zero_label=False, ignore_index={IGNORE_INDEX}, pipeline={pipeline})")

    val = val or train
    return f"""# mmsegmentation 1.x dataset written by `python -m stages.export_mmseg` ({code_version()}).
# Labels: 0 background, c + 1 class c, {IGNORE_INDEX} ignore (pixels the pseudo-label stage was not sure of).
dataset_type = 'BaseSegDataset'
crop_size = ({crop}, {crop})
metainfo = dict(
    classes={tuple(classes)!r},
    palette={pal!r})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=4, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset={ds(train, 'train_pipeline')})
val_dataloader = dict(
    batch_size=1, num_workers=4, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset={ds(val, 'test_pipeline')})
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
"""


def train_config(model_config: Path, num_classes: int, crop: int) -> str:
    """mmseg training config: the user's model config, then our dataset, then the class count."""
    bases = [str(model_config.resolve()), "./mmseg_dataset.py"]
    return f"""# mmsegmentation 1.x training config written by `python -m stages.export_mmseg`.
# Train with mmseg's tools/train.py:  python tools/train.py {{this file}}
_base_ = {bases!r}
crop_size = ({crop}, {crop})
data_preprocessor = dict(size=crop_size)
model = dict(data_preprocessor=data_preprocessor, decode_head=dict(num_classes={num_classes}, ignore_index={IGNORE_INDEX}))
"""


def export(dataset, train_ids: Sequence[str], val_ids: Sequence[str], pseudo_dir: str | Path,
           out_dir: str | Path, crop: int = 512, model_config: str | Path | None = None) -> dict[str, Path]:
    """Write the mmseg dataset (+ training config when ``model_config`` names an mmseg model config).

    Training images come from ``dataset``, their labels from ``pseudo_dir/<id>.png``; validation uses
    the dataset's ground-truth masks. Returns the paths written."""
    pseudo_dir, out_dir = Path(pseudo_dir).resolve(), Path(out_dir).resolve()
    if not train_ids:
        raise ExportError("the training split is empty")
    if model_config and not Path(model_config).is_file():
        raise ExportError(f"{model_config}: mmseg model config not found")
    classes = ["background", *dataset.classes.names]
    img_paths = [Path(dataset.image_path(i)).resolve() for i in train_ids]
    lab_paths = [pseudo_dir / f"{i}.png" for i in train_ids]
    _missing(img_paths, "training images")
    _missing(lab_paths, "pseudo labels (run make pseudo)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    img_dir, img_suffix = layout(img_paths, train_ids, out_dir / "images")
    write_bytes(out_dir / "train.txt", ("\n".join(train_ids) + "\n").encode())
    train = {"root": out_dir, "ann_file": out_dir / "train.txt", "img_dir": img_dir, "img_suffix": img_suffix,
             "seg_dir": pseudo_dir, "seg_suffix": ".png"}
    val = None
    if val_ids:
        vimg = [Path(dataset.image_path(i)).resolve() for i in val_ids]
        vmask = [dataset.mask_path(i) for i in val_ids]
        if any(m is None for m in vmask):
            raise ExportError(f"validation image {val_ids[vmask.index(None)]} has no ground-truth mask")
        vmask = [Path(m).resolve() for m in vmask]
        _missing(vimg, "validation images")
        vimg_dir, vimg_suffix = layout(vimg, val_ids, out_dir / "val_images")
        vseg_dir, vseg_suffix = layout(vmask, val_ids, out_dir / "val_masks")
        write_bytes(out_dir / "val.txt", ("\n".join(val_ids) + "\n").encode())
        val = {"root": out_dir, "ann_file": out_dir / "val.txt", "img_dir": vimg_dir, "img_suffix": vimg_suffix,
               "seg_dir": vseg_dir, "seg_suffix": vseg_suffix}
    written["dataset_config"] = out_dir / "mmseg_dataset.py"
    write_bytes(written["dataset_config"], dataset_config(classes, train, val, crop).encode())
    if model_config:  # a training config needs a model; without one the dataset config is the product
        written["train_config"] = out_dir / "mmseg_train.py"
        write_bytes(written["train_config"], train_config(Path(model_config), len(classes), crop).encode())
    return written
