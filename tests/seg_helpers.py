"""Synthetic segmentation data for the training/inference tests: scenes with ground truth, a small class
list, and noisy pseudo labels (shifted boundaries, swapped classes, 255 holes) written as label PNGs; the
learning proofs' injected CAMs and their scoring; a guard against reading label maps; a pointwise model."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import torch
import yaml

from pipeline.eval import metrics
from pipeline.data import synthetic
from pipeline.classes import IGNORE_INDEX, ClassList
from pipeline.data.datasets import build_dataset, read_mask
from pipeline.data.labelio import write_label
from pipeline.data.segdata import augment
from pipeline.train.online import InitialCAMs, pad_maps

NAMES = ["aeroplane", "bicycle", "bird", "boat"]


def noisy_label(gt: np.ndarray, rng: np.random.Generator, num_classes: int, swap: float = 0.25,
                grow: tuple[int, int] = (3, 8), holes: int = 2) -> np.ndarray:
    """GT (H, W) -> a pseudo label as CAM pipelines get them wrong: each object dilated or eroded by
    3-7 px, relabelled to a random class with probability ``swap``, plus ``holes`` rectangles of 255."""
    H, W = gt.shape
    out = np.where(gt == IGNORE_INDEX, 0, gt).astype(np.uint8)
    for c in np.unique(gt):
        if c in (0, IGNORE_INDEX):
            continue
        m = (gt == c).astype(np.uint8)
        k = int(rng.integers(*grow))
        ker = np.ones((2 * k + 1, 2 * k + 1), np.uint8)
        m2 = cv2.dilate(m, ker) if rng.random() < 0.5 else cv2.erode(m, ker)
        out[(m == 1) & (m2 == 0)] = 0
        out[m2 == 1] = c if rng.random() > swap else int(rng.integers(1, num_classes + 1))
    for _ in range(holes):
        y, x = int(rng.integers(0, H - 16)), int(rng.integers(0, W - 16))
        out[y:y + int(rng.integers(8, 24)), x:x + int(rng.integers(8, 24))] = IGNORE_INDEX
    return out


def make_data(root: Path, n_train: int, n_val: int, size=(128, 160), seed: int = 1) -> dict:
    """Scenes in VOC layout + classes.yaml (4 classes) + noisy pseudo labels under root/pseudo.

    Returns {root, classes, train, val, pseudo, train_ids, val_ids, noisy_miou}; noisy_miou is the
    pseudo labels' own mIoU against the ground truth (255 read as background)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cls_yaml = root / "classes.yaml"
    cls_yaml.write_text(yaml.safe_dump({"classes": NAMES}))
    classes = ClassList.from_yaml(cls_yaml)
    tr = synthetic.make_scenes(root, n_train, size, seed=seed, classes=classes, split="train", prefix="tr")
    va = synthetic.make_scenes(root, n_val, size, seed=seed + 1, classes=classes, split="val", prefix="va") if n_val else []
    ds = build_dataset("voc", root, cls_yaml)
    rng = np.random.default_rng(seed)
    n = len(NAMES) + 1
    conf = np.zeros((n, n), np.int64)
    for i in tr:
        gt = read_mask(ds.mask_path(i), len(NAMES))
        lab = noisy_label(gt, rng, len(NAMES))
        write_label(root / "pseudo" / f"{i}.png", lab)
        conf += metrics.confusion_matrix(np.where(lab == IGNORE_INDEX, 0, lab), gt, n)
    return {"root": root, "classes": cls_yaml, "train": synthetic.split_file(root, "train"),
            "val": synthetic.split_file(root, "val") if n_val else None, "pseudo": root / "pseudo",
            "train_ids": tr, "val_ids": va, "noisy_miou": metrics.mean_iou(conf)}


def without_masks(d: dict, dest: Path) -> dict:
    """``make_data``'s folder copied to ``dest`` without its ground-truth masks -> ``d`` pointing at the copy
    (root and train split; the other paths still the original's)."""
    shutil.copytree(d["root"], dest)
    shutil.rmtree(dest / "SegmentationClass")
    return {**d, "root": dest, "train": dest / "ImageSets" / "Segmentation" / "train.txt"}


def overrides(d: dict, **extra) -> list[str]:
    """Config overrides pointing a training run at ``make_data``'s folder (CPU, no workers)."""
    items = {"data.root": d["root"], "data.classes": d["classes"], "data.pseudo": d["pseudo"],
             "data.split": d["train"], "data.val_split": d["val"], "data.workers": 0, "train.device": "cpu",
             "train.ckpt_every": 10**6, "train.val_every": 10**6, **extra}
    return [f"{k}={'null' if v is None else v}" for k, v in items.items()]


def injected_crop_cams(dataset, ids, aug, seed, batch, swap: float = 0.0
                       ) -> list[tuple[torch.Tensor, np.ndarray, np.random.Generator]]:
    """For each crop of an online training batch (``batch.keys`` = (index into ``ids``, sample counter)):
    CAMs (K, h, w) made the way real ones go wrong (``synthetic.noisy_cam``: shifted, blurred, spurious
    blobs, noise, at patch resolution; two co-occurring classes traded with probability ``swap``,
    ``synthetic.swap_cooccurring``) from the crop's ground truth, that ground truth (re-drawn with the
    training augmentation's seed), and the crop's RNG for any further injected signal."""
    out = []
    for (index, counter), lab in zip(batch.keys, batch.labels):
        i = ids[index]
        image = np.asarray(PIL.Image.open(dataset.image_path(i)).convert("RGB"))
        gt = read_mask(dataset.mask_path(i), dataset.classes.num_classes)
        _, gt = augment(image, gt, aug, np.random.default_rng([seed, counter]))
        rng = np.random.default_rng(counter)
        cams = np.stack([synthetic.noisy_cam((gt == c + 1).astype(np.uint8), rng, 0.04, 0.03, 0.05, 0.3) for c in lab])
        cams = synthetic.swap_cooccurring(cams, [(gt == c + 1).any() for c in lab], rng, swap)
        out.append((torch.from_numpy(cams), gt, rng))
    return out


def injected_attention(gt: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Crop ground truth (H, W) -> an attention map (1+n, 1+n) over its 16-pixel patches (sampled at
    their centres) that carries what real CLIP attention carries and random weights do not: patches of
    the same ground-truth region attend to each other more (e^4 vs e^0 before noise), with log-normal
    noise; rows sum to 1, CLS first."""
    y = gt[synthetic.PATCH // 2::synthetic.PATCH, synthetic.PATCH // 2::synthetic.PATCH].reshape(-1)
    y = np.concatenate([[254], y])
    logits = 4 * (y[:, None] == y[None]).astype(np.float32) + rng.normal(0, 0.5, (len(y), len(y))).astype(np.float32)
    return torch.from_numpy(logits).softmax(dim=-1)


class InjectedCAMs:
    """A CAM source for the learning proofs: each crop's CAMs made from its ground truth the way real ones
    go wrong (``injected_crop_cams``, co-occurring classes traded with probability ``swap``), with attention
    maps that favour same-region patches (``injected_attention``) put where the encoder pass left its own,
    at ``attention_blocks`` and as the last block's: a random CLIP's CAMs and attention carry neither
    signal. ``real``: a CAM source run first all the same (ExCEL's: its pass, static or dynamic, is the one
    the model trains on), its CAMs dropped. Keeps each batch's ground truth (B, H, W) in ``gt``."""

    def __init__(self, dataset, ids, aug, seed, attention_blocks, swap: float = 0.0, real=None):
        self.ds, self.ids, self.aug, self.seed, self.blocks = dataset, ids, aug, seed, attention_blocks
        self.swap, self.real = swap, real
        self.gt: list[np.ndarray] = []

    def __call__(self, batch, inter, grid) -> InitialCAMs:
        if self.real is not None:
            self.real(batch, inter, grid)
        crops = injected_crop_cams(self.ds, self.ids, self.aug, self.seed, batch, self.swap)
        self.gt.append(np.stack([gt for _, gt, _ in crops]))
        attn = {k: torch.stack([injected_attention(gt, rng) for _, gt, rng in crops]) for k in (*self.blocks, "last")}
        for k in self.blocks:
            inter.attentions[k] = attn[k]
        out = pad_maps([cams for cams, _, _ in crops], batch.labels)
        out.attention_last = attn["last"]
        return out


def cam_labels(initial: InitialCAMs, size) -> torch.Tensor:
    """The injected CAMs' own labels (B, H, W) at the crop size ``size``: background 1 - max, argmax (no
    refinement, no PAR)."""
    cams = torch.nn.functional.interpolate(initial.cams, size=size, mode="bilinear", align_corners=False)
    cams = cams.masked_fill(~initial.valid[:, :, None, None], -1)
    scores = torch.cat([1 - cams.amax(dim=1, keepdim=True), cams], dim=1)
    ids = torch.cat([torch.zeros_like(initial.classes[:, :1]), initial.classes + 1], dim=1)
    idx = scores.argmax(dim=1)
    return ids.gather(1, idx.flatten(1)).view_as(idx)


class ScoredLabels:
    """A label maker that scores the one it wraps against the crops' ground truth (``inject.gt``): confusion
    matrices of the injected CAMs' own labels (``cam_labels``), of the labels, and of the labels of the
    iterations before ``early``, in ``conf['cams' | 'labels' | 'first']``. Everything else (attention
    blocks, WeCLIP+'s extra losses) is the wrapped maker's."""

    def __init__(self, maker, inject: InjectedCAMs, num_classes: int, early: int):
        self.maker, self.inject, self.early, self.n = maker, inject, early, num_classes + 1
        self.conf = {k: np.zeros((self.n, self.n), np.int64) for k in ("cams", "labels", "first")}

    def __getattr__(self, name):
        return getattr(self.maker, name)

    def __call__(self, batch, outputs, iteration):
        made = self.maker(batch, outputs, iteration)
        lab, cam = made.labels.cpu().numpy(), cam_labels(made.initial, batch.images.shape[-2:]).cpu().numpy()
        for b, gt in enumerate(self.inject.gt[-1]):
            self.conf["cams"] += metrics.confusion_matrix(cam[b], gt, self.n, IGNORE_INDEX)
            self.conf["labels"] += metrics.confusion_matrix(lab[b], gt, self.n, IGNORE_INDEX)
            if iteration < self.early:
                self.conf["first"] += metrics.confusion_matrix(lab[b], gt, self.n, IGNORE_INDEX)
        return made


def forbid_label_maps(monkeypatch) -> list[str]:
    """Fails the test at any read of a label map (``labelio.read_label`` wherever it is imported) -> the
    list of every file PIL opens from now on."""
    def no_masks(path, *a, **k):
        raise AssertionError(f"training read a label map: {path}")

    for where in ("pipeline.data.labelio.read_label", "pipeline.data.datasets.read_label",
                  "pipeline.data.segdata.read_label"):
        monkeypatch.setattr(where, no_masks)
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: (opened.append(str(fp)), real_open(fp, *a, **k))[1])
    return opened


class Pointwise(torch.nn.Module):
    """Logits = (first channel, minus it): a pointwise model, plus the input sizes it saw."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return torch.cat([x[:, :1], -x[:, :1]], 1)


def torchrun_train(config: str, out: Path, sets: list[str], *args: str, timeout: int = 300) -> str:
    """``stages.train`` under torchrun with two gloo processes on CPU (one thread each) -> its stdout;
    fails the test with the end of stderr when the run fails."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "stages.train", "--config", config, "--out", str(out), "--no-progress", "--no-tensorboard",
           *args] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def assert_same_weights(a: dict, b: dict, atol: float = 1e-4) -> None:
    """Two state dicts hold the same tensors up to ``atol``. Attention key biases are left out: they get
    zero gradient in exact arithmetic (a softmax ignores a constant per query), so Adam turns float
    noise there into steps of about the learning rate; queries and values are compared."""
    assert a.keys() == b.keys()
    for k, w in a.items():
        w, v = w.float(), b[k].float()
        if k.endswith("attn.in_proj_bias"):
            third = len(w) // 3
            w, v = torch.cat([w[:third], w[2 * third:]]), torch.cat([v[:third], v[2 * third:]])
        torch.testing.assert_close(w, v, rtol=0, atol=atol, msg=k)


def log_rows(run: Path) -> list[dict[str, float | None]]:
    """A training run's ``log.csv`` -> one dict per logged step: iteration, loss, loss_seg, loss_aff, lr as
    floats (None where the run logs no such value, e.g. no affinity loss)."""
    import csv

    keys = ("iteration", "loss", "loss_seg", "loss_aff", "lr")
    with open(Path(run) / "log.csv") as f:
        return [{k: float(r[k]) if r[k] else None for k in keys} for r in csv.DictReader(f)]
