"""Training data for the segmentation models: (image, label PNG) pairs, augmentations, a resumable sampler.

Randomness is counter based: sample ``k`` of the run (k = iteration x accumulation x world batch +
position) draws its augmentation from ``np.random.default_rng([seed, k])`` and the epoch order from
``default_rng([seed, epoch])``. The data stream is therefore a pure function of (seed, iteration):
a resumed run, a run with more DataLoader workers and an uninterrupted run see the same batches.

Augmentations (WeCLIP's datasets/transforms.py, deeplab-pytorch): random rescale (uniform range or a set
of scales), horizontal flip, pad to the crop (image 0 or the mean colour, label 255), random crop, then the input
convention the model was trained with: RGB (x - mean) / std with ImageNet statistics (WeCLIP, torchvision
ResNets), CLIP's statistics, or deeplab-pytorch's caffe convention (BGR 0-255 minus the mean, no std).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..classes import IGNORE_INDEX
from .image import CLIP_MEAN, CLIP_STD, load_rgb
from .labelio import read_label

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # on 0-255 RGB (WeCLIP's transforms.py)
IMAGENET_STD = (58.395, 57.12, 57.375)
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)  # deeplab-pytorch's configs (the caffe DeepLab models' mean)
# (mean, std) on 0-255 RGB; the conventions in BGR_INPUTS then reverse the channels (caffe-trained weights).
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                  "clip": (tuple(255 * m for m in CLIP_MEAN), tuple(255 * s for s in CLIP_STD)),
                  "caffe": (CAFFE_MEAN_BGR[::-1], (1.0, 1.0, 1.0))}
BGR_INPUTS = frozenset({"caffe"})


class DataError(ValueError):
    """Training inputs are unusable; the message names every offending file (up to a limit)."""


@dataclass(frozen=True)
class Sample:
    """One training/validation pair: image path and label PNG path (0 bg, c + 1 class c, 255 ignore)."""

    image_id: str
    image: str
    label: str


@dataclass(frozen=True)
class AugConfig:
    """crop: square crop side (0 = no crop); scale_range: (lo, hi) uniform rescale (WeCLIP 0.5-2.0) or
    scales: discrete set (DeepLab 0.5..1.5), used when given; pad_image: 'zero' (WeCLIP) or 'mean'."""

    crop: int = 320
    scale_range: tuple[float, float] | None = (0.5, 2.0)
    scales: tuple[float, ...] | None = None
    flip: bool = True
    normalize: str = "imagenet"
    pad_image: str = "zero"

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.pad_image not in ("zero", "mean"):
            raise ValueError(f"pad_image must be 'zero' or 'mean', got {self.pad_image!r}")


# ------------------------------------------------------------------------------------ pure ops
def normalize(image: np.ndarray, kind: str = "imagenet") -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W), (x - mean) / std on the 0-255 scale, channels in the
    convention's order (BGR for 'caffe')."""
    mean, std = NORMALIZATIONS[kind]
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()  # a writable copy
    x = (x - torch.tensor(mean, device=x.device).view(3, 1, 1)) / torch.tensor(std, device=x.device).view(3, 1, 1)
    return x.flip(0) if kind in BGR_INPUTS else x


def denormalize(x: torch.Tensor, kind: str = "imagenet") -> np.ndarray:
    """float (3, H, W) normalised -> uint8 (H, W, 3) RGB (for CRF guides and visualisation)."""
    mean, std = NORMALIZATIONS[kind]
    x = x.detach().float().cpu()
    x = x.flip(0) if kind in BGR_INPUTS else x
    img = x * torch.tensor(std, device=x.device).view(3, 1, 1) + torch.tensor(mean, device=x.device).view(3, 1, 1)
    return img.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def rescale(image: np.ndarray, label: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize by ``r`` to (int(r*W), int(r*H)) (WeCLIP's rounding): image PIL bilinear, label nearest."""
    H, W = label.shape
    size = (max(1, int(r * W)), max(1, int(r * H)))
    img = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    lab = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return img, lab


def pad_to(image: np.ndarray, label: np.ndarray, size: int, fill: Sequence[float],
           offset: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Pad (H, W, 3) / (H, W) up to at least ``size`` x ``size``: image with ``fill``, label with 255;
    the original sits at ``offset`` = (top, left) inside the padded canvas."""
    H, W = label.shape
    Hp, Wp = max(H, size), max(W, size)
    if (Hp, Wp) == (H, W):
        return image, label
    top, left = offset
    img = np.empty((Hp, Wp, 3), np.uint8)
    img[:] = np.asarray(fill, np.float64).round().astype(np.uint8)
    lab = np.full((Hp, Wp), IGNORE_INDEX, np.uint8)
    img[top:top + H, left:left + W] = image
    lab[top:top + H, left:left + W] = label
    return img, lab


def augment(image: np.ndarray, label: np.ndarray, cfg: AugConfig, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB (H, W, 3), uint8 label (H, W) -> augmented pair (crop x crop when cfg.crop), in the
    order rescale, flip, pad, crop (as WeCLIP's transforms.py). All draws come from ``rng``."""
    if cfg.scales:
        r = float(cfg.scales[int(rng.integers(len(cfg.scales)))])
    elif cfg.scale_range:
        r = float(rng.uniform(*cfg.scale_range))
    else:
        r = 1.0
    if r != 1.0:
        image, label = rescale(image, label, r)
    if cfg.flip and rng.random() > 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if cfg.crop:
        H, W = label.shape
        c = cfg.crop
        fill = (0, 0, 0) if cfg.pad_image == "zero" else NORMALIZATIONS[cfg.normalize][0]
        offset = (int(rng.integers(0, max(c - H, 0) + 1)), int(rng.integers(0, max(c - W, 0) + 1)))
        image, label = pad_to(image, label, c, fill, offset)
        H, W = label.shape
        y, x = int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1))
        image, label = image[y:y + c, x:x + c], label[y:y + c, x:x + c]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def read_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Decode a sample -> (uint8 (H, W, 3) RGB, uint8 (H, W) label); ``DataError`` naming the file on a size mismatch."""
    image = load_rgb(sample.image)
    label = read_label(sample.label)
    if image.shape[:2] != label.shape:
        raise DataError(f"{sample.label}: label size {label.shape} differs from image {sample.image} {image.shape[:2]}")
    return image, label


# ------------------------------------------------------------------------------------ datasets
class SegTrainSet(torch.utils.data.Dataset):
    """Items are (sample index, global sample counter) pairs from ``ResumableBatchSampler``; returns
    (image float32 (3, c, c), label int64 (c, c)) with augmentation drawn from rng([seed, counter])."""

    def __init__(self, samples: Sequence[Sample], aug: AugConfig, seed: int):
        self.samples = list(samples)
        self.aug = aug
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, counter = item
        image, label = read_pair(self.samples[index])
        image, label = augment(image, label, self.aug, np.random.default_rng([self.seed, counter]))
        return normalize(image, self.aug.normalize), torch.from_numpy(label.astype(np.int64))


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Infinite batches of (index, counter) for this rank, starting at global batch ``start_batch``.

    Global batch b covers positions [b*B*W, (b+1)*B*W) of the concatenated epoch permutations
    (epoch e: ``default_rng([seed, e]).permutation(n)``, incomplete tails dropped); rank r takes
    its B consecutive positions. B = per-rank batch, W = world size.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world_size: int = 1):
        per_epoch = n // (batch_size * world_size)
        if per_epoch < 1:
            raise DataError(f"{n} training images cannot fill one batch of {batch_size} x {world_size} process(es)")
        self.n, self.B, self.seed, self.start = n, batch_size, int(seed), int(start_batch)
        self.rank, self.world, self.per_epoch = rank, world_size, per_epoch

    def batch(self, b: int) -> list[tuple[int, int]]:
        """Global batch ``b`` -> this rank's [(sample index, global sample counter)]."""
        epoch, within = divmod(b, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        first = within * self.B * self.world + self.rank * self.B
        base = b * self.B * self.world + self.rank * self.B
        return [(int(perm[first + j]), base + j) for j in range(self.B)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start
        while True:
            yield self.batch(b)
            b += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs it for len(loader)
        return 2**62


# ---------------------------------------------------------------------------------- validation
def _check_one(sample: Sample, num_classes: int) -> str | None:
    """Check one pair: files exist, the image decodes to its end (JPEGs at 1/8 scale, which still reads
    all their data, so a truncated file is caught here and not mid-run), sizes agree, label mode P/L and
    values in 0..num_classes or 255 (one decode + bincount). Returns an error message or None."""
    for path, what in ((sample.image, "image"), (sample.label, "label")):
        if not Path(path).is_file():
            return f"{path}: {what} file not found (image id {sample.image_id})"
    try:
        with Image.open(sample.image) as im:
            img_size = im.size
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            try:
                im.load()
            except (OSError, SyntaxError, ValueError) as e:
                return (f"{sample.image}: cannot decode image ({e}); re-download or re-encode it, or drop "
                        f"{sample.image_id} from the split")
        with Image.open(sample.label) as lb:
            if lb.mode not in ("P", "L"):
                return f"{sample.label}: label PNG has mode {lb.mode}; expected P (palette) or L (8-bit gray)"
            if lb.size != img_size:
                return (f"{sample.label}: label size {lb.size[1]}x{lb.size[0]} differs from image "
                        f"{sample.image} {img_size[1]}x{img_size[0]} (H x W)")
            counts = np.bincount(np.asarray(lb, dtype=np.uint8).ravel(), minlength=256)
    except OSError as e:
        return f"{sample.image_id}: cannot read image or label header ({e})"
    counts[: num_classes + 1] = 0
    counts[IGNORE_INDEX] = 0
    if counts.any():
        bad = np.flatnonzero(counts).tolist()
        return (f"{sample.label}: label values {bad[:8]} outside 0..{num_classes} (0 background, 1..{num_classes} "
                f"classes) and {IGNORE_INDEX} (ignore); wrong class count or not a label map?")
    return None


def validate_samples(samples: Sequence[Sample], num_classes: int, what: str = "training", threads: int = 8,
                     max_listed: int = 20) -> None:
    """Check every pair up front (see ``_check_one``); raise one ``DataError`` listing the problems."""
    if not samples:
        raise DataError(f"the {what} split is empty: no images to use")
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # PIL decodes without the GIL
        errors = [e for e in pool.map(lambda s: _check_one(s, num_classes), samples) if e]
    if errors:
        listed = "\n  ".join(errors[:max_listed])
        more = f"\n  ... and {len(errors) - max_listed} more" if len(errors) > max_listed else ""
        raise DataError(f"{len(errors)} of {len(samples)} {what} samples are unusable:\n  {listed}{more}")


def make_samples(dataset, ids: Sequence[str], labels_dir: str | Path | None) -> list[Sample]:
    """Samples for ``ids``: labels from ``labels_dir/<id>.png`` (pseudo labels), or the dataset's
    ground-truth masks when ``labels_dir`` is None (fully supervised, WeCLIP Table 7)."""
    out = []
    for i in ids:
        if labels_dir is None:
            gt = dataset.mask_path(i)
            label = str(gt) if gt is not None else f"<no ground-truth mask for {i}>"
        else:
            label = str(Path(labels_dir) / f"{i}.png")
        out.append(Sample(i, str(dataset.image_path(i)), label))
    return out


class ImageLevelTrainSet(torch.utils.data.Dataset):
    """Training crops with image-level labels only (online pseudo labels; no label maps are read).

    images: image paths; labels: per image its 0-based foreground classes. Items are (sample index,
    global sample counter) pairs from ``ResumableBatchSampler``; returns (image float32 (3, c, c),
    multi-hot float32 (num_classes,), key int64 (2,) = (index, counter)). The augmentation draws are
    ``SegTrainSet``'s for the same counter (they depend on the image size only), so a label map can be
    cropped alongside when one is wanted (tests)."""

    def __init__(self, images: Sequence[str], labels: Sequence[Sequence[int]], num_classes: int, aug: AugConfig,
                 seed: int):
        self.images = list(images)
        self.labels = [list(lab) for lab in labels]
        self.num_classes = int(num_classes)
        self.aug = aug
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, counter = item
        image = load_rgb(self.images[index])
        blank = np.zeros(image.shape[:2], np.uint8)
        image, _ = augment(image, blank, self.aug, np.random.default_rng([self.seed, counter]))
        hot = torch.zeros(self.num_classes)
        hot[self.labels[index]] = 1
        return normalize(image, self.aug.normalize), hot, torch.tensor([index, counter])
