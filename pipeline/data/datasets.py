"""Datasets: where images, image-level labels and ground-truth masks live (VOC, COCO, folder).

Each dataset maps an image id to an image path, its foreground labels (0-based ids, in the order
the reference reads them) and, when present, a ground-truth mask (0 bg, c + 1 class c, 255 ignore).
Problems with one image raise ``SampleError`` naming the file, so a stage can log it and go on.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from ..classes import DATA_DIR, IGNORE_INDEX, ClassList, builtin
from .labelio import read_label

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class SampleError(ValueError):
    """One image's inputs are unusable; the message names the file and the fix."""


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def line_id(line: str) -> str | None:
    """The image id one line of a split list names (None for blank and # lines).

    The id is the whole line, dots and spaces kept (``photo.2021``, ``my cat``), without an image file
    extension (``x.jpg`` -> ``x``). Two layouts with a second column are read by their first: lines of
    paths (``JPEGImages/x.jpg SegmentationClassAug/x.png`` -> ``x``) and CLIP-ES's ``<id> <class index>...``
    lines, whose other columns are all numbers.
    """
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    first, *rest = s.split()
    if Path(first).suffix.lower() in IMAGE_EXTS and ("/" in first or not rest):
        return Path(first).stem
    if rest and all(t.isdigit() for t in rest):
        return first
    return s[: -len(Path(s).suffix)] if Path(s).suffix.lower() in IMAGE_EXTS else s


def read_id_list(path: str | Path) -> list[str]:
    """Image ids of a split list file, one per non-empty, non-# line (see ``line_id``), in file order,
    duplicates included."""
    return [i for line in Path(path).read_text().splitlines() if (i := line_id(line)) is not None]


def note(message: str) -> None:
    """One ``note:`` line on stderr (from the first process only, under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", file=sys.stderr)


def unique_ids(ids: list[str], source: str) -> list[str]:
    """``ids`` without repeats (first occurrences, in order); repeats are reported in one note."""
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        twice = [i for i, n in Counter(ids).items() if n > 1]
        note(f"{source}: {len(ids) - len(unique)} duplicate line(s) for {len(twice)} id(s) "
             f"({', '.join(twice[:5])}{', ...' if len(twice) > 5 else ''}); each image is used once")
    return unique


def read_labels_file(path: str | Path, classes: ClassList,
                     errors: dict[str, str] | None = None) -> dict[str, list[int]]:
    """Image-level labels from a file, in file order per image (a label repeated on a line counts once;
    an image listed twice needs the same labels both times, else it fails).

    An unknown class name raises ``SampleError``; with ``errors`` given, that image's message goes
    there instead (and the image is left out of the result), so one bad line fails one image only.

    Formats: JSON ``{id: [name or index, ...]}``; CSV ``id,label[,label...]`` (a cell may hold several
    labels separated by ';' or '|'; a header row starting with 'id' is skipped); or text lines
    ``<id> <label> <label> ...`` (CLIP-ES ``coco14/train.txt``: 0-based indices).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels file not found")
    rows: list[tuple[str, list[str]]] = []
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text(), object_pairs_hook=_Pairs)
        except ValueError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
        if not isinstance(doc, _Pairs):
            raise ValueError(f"{path}: expected a JSON object mapping image id -> list of class names")
        rows = [(str(k), [str(x) for x in (v if isinstance(v, list) else [v])]) for k, v in doc]
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            for i, rec in enumerate(csv.reader(f)):
                if not rec or (i == 0 and rec[0].strip().lower() in ("id", "image", "image_id")):
                    continue
                cells = [t.strip() for c in rec[1:] for t in c.replace("|", ";").split(";")]
                rows.append((rec[0].strip(), [c for c in cells if c]))
    else:
        for line in path.read_text().splitlines():
            tok = line.split()
            if tok and not tok[0].startswith("#"):
                rows.append((tok[0], tok[1:]))
    out: dict[str, list[int]] = {}
    given: dict[str, list[str]] = {}
    for image_id, names in rows:
        if image_id in given:  # the same id twice: fine when the lines agree, else that image fails
            if [n.strip().lower() for n in names] != [n.strip().lower() for n in given[image_id]]:
                msg = (f"{path}: image {image_id} is listed more than once with different labels "
                       f"({' '.join(given[image_id])} / {' '.join(names)}); keep one line")
                if errors is None:
                    raise SampleError(msg)
                errors[image_id] = msg
                out.pop(image_id, None)
            continue
        given[image_id] = names
        ids: list[int] = []
        for n in names:
            try:
                c = classes.index(n)
            except KeyError as e:
                if errors is None:
                    raise SampleError(f"{path}: image {image_id}: {e.args[0]}") from None
                errors[image_id] = f"{path}: image {image_id}: {e.args[0]}"
                break
            if c not in ids:
                ids.append(c)
        else:
            out[image_id] = ids
    return out


class _Pairs(list):
    """A JSON object as its (key, value) pairs, so that a key given twice stays visible."""


def labels_from_mask(mask: np.ndarray, num_classes: int) -> list[int]:
    """Ascending foreground ids present in a label map (WeCLIP's rule; 0 and 255 excluded)."""
    vals = np.unique(mask)
    return [int(v) - 1 for v in vals if 0 < v <= num_classes]


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    """Ground-truth label map as uint8 (H, W): palette index or gray value; checks the value range."""
    try:
        mask = read_label(path)
    except ValueError as e:
        raise SampleError(str(e)) from None
    bad = np.setdiff1d(np.unique(mask), np.r_[np.arange(num_classes + 1), IGNORE_INDEX])
    if bad.size:
        raise SampleError(f"{path}: mask values {bad.tolist()} are outside 0..{num_classes} and {IGNORE_INDEX}")
    return mask


class Dataset:
    """Common interface; subclasses say where files are."""

    name = "dataset"
    layout = ""  # the expected layout, for the message of ``require``

    def __init__(self, root: str | Path, classes: ClassList, labels_file: str | Path | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: dataset root not found (pass ROOT=/path/to/{self.name} data)")
        self.classes = classes
        self._label_errors: dict[str, str] = {}  # labels-file lines naming unknown classes, per image
        self._labels = read_labels_file(labels_file, classes, self._label_errors) if labels_file else None

    # -- to override -------------------------------------------------------------------------
    def image_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def mask_path(self, image_id: str) -> Path | None:
        """Ground-truth mask path, or None when the dataset has none for this image."""
        return None

    @property
    def has_masks(self) -> bool:
        """Whether the dataset has ground truth at all (a folder dataset only with --masks)."""
        return True

    def _own_labels(self, image_id: str) -> list[int]:
        mask = self.mask_path(image_id)
        if mask is None:
            raise SampleError(f"{self.name} image {image_id}: no labels file entry and no ground-truth mask to read labels from")
        return labels_from_mask(read_mask(mask, self.classes.num_classes), self.classes.num_classes)

    def missing(self, need: str) -> str | None:
        """What the root lacks for ``need`` ('images', 'labels' or 'masks'), or None."""
        return None

    def default_ids(self, split: str) -> list[str]:
        shipped = sorted(p.stem for p in (DATA_DIR / "splits" / self.name).glob("*.txt"))
        raise FileNotFoundError(f"no split {split!r} for {self.name} (shipped: {', '.join(shipped) or 'none'}); "
                                "pass one of those or a path to a list of image ids")

    # -- shared ------------------------------------------------------------------------------
    def require(self, needs: Iterable[str]) -> None:
        """Refuse a root without what a stage needs (``missing``), naming every missing part at once,
        before any model loads or image is read."""
        gaps = [m for n in needs if (m := self.missing(n))]
        if gaps:
            raise ValueError(f"{self.root}: this {self.name} dataset root has no {'; no '.join(gaps)}; "
                             f"check ROOT= (--root){self.layout}")

    def ids(self, split: str) -> list[str]:
        """Ids of ``split``: a path to an id list, a list shipped in data/splits/<dataset>/, or the
        dataset's own listing; an id listed twice is used once (and reported)."""
        source = Path(split).expanduser()
        if not source.is_file():
            source = DATA_DIR / "splits" / self.name / f"{split}.txt"
        ids = read_id_list(source) if source.is_file() else self.default_ids(split)
        if not ids:
            raise ValueError(f"split {split!r} of {self.name} has no image ids")
        return unique_ids(ids, str(source))

    def labels(self, image_id: str) -> list[int]:
        """Foreground labels of an image, 0-based, in the reference's order; never empty."""
        if self._labels is not None:
            if image_id in self._label_errors:
                raise SampleError(self._label_errors[image_id])
            if image_id not in self._labels:
                hint = " (an id with spaces needs a CSV or JSON labels file)" if " " in image_id else ""
                raise SampleError(f"image {image_id}: not in the labels file{hint}; add a line for it or drop it "
                                  "from the split")
            labels = self._labels[image_id]
        else:
            labels = self._own_labels(image_id)
        if not labels:
            raise SampleError(f"image {image_id}: has no foreground labels; CAMs need at least one class (drop it from the split)")
        return labels


class VOCDataset(Dataset):
    """VOC2012 layout: JPEGImages/, Annotations/ (labels from <object><name>, first appearance
    order, difficult objects included, as CLIP-ES), SegmentationClassAug/ or SegmentationClass/."""

    name = "voc"
    layout = " (VOC2012: JPEGImages/, Annotations/, SegmentationClassAug/ or SegmentationClass/)"

    def __init__(self, root, classes: ClassList | None = None, labels_file=None):
        super().__init__(root, classes or builtin("voc"), labels_file)

    def missing(self, need: str) -> str | None:
        if need == "images" and not (self.root / "JPEGImages").is_dir():
            return "JPEGImages/ (the images)"
        if need == "labels" and self._labels is None and not (self.root / "Annotations").is_dir():
            return "Annotations/ (image-level labels; or pass a labels file, --labels)"
        if need == "masks" and not any((self.root / d).is_dir() for d in ("SegmentationClassAug", "SegmentationClass")):
            return "SegmentationClassAug/ or SegmentationClass/ (ground-truth masks)"
        return None

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path | None:
        return _first_existing([self.root / d / f"{image_id}.png" for d in ("SegmentationClassAug", "SegmentationClass")])

    def _own_labels(self, image_id: str) -> list[int]:
        xml = self.root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise SampleError(f"{xml}: annotation not found; provide it or pass a labels file (--labels)")
        try:
            tree = ET.parse(xml)
        except ET.ParseError as e:
            raise SampleError(f"{xml}: malformed XML ({e})") from e
        labels: list[int] = []
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            try:
                c = self.classes.index(name)
            except KeyError as e:
                raise SampleError(f"{xml}: {e.args[0]}") from None
            if c not in labels:
                labels.append(c)
        return labels


class COCODataset(Dataset):
    """COCO 2014 in VOC style: JPEGImages/[<split>2014/]<id>.jpg (or <split>2014/ directly),
    SegmentationClass/[<split>2014/]<id>.png; labels from a labels file (CLIP-ES format) or masks."""

    name = "coco"
    layout = " (COCO in VOC style: JPEGImages/[train2014/], SegmentationClass/[train2014/], or train2014/)"

    def __init__(self, root, classes: ClassList | None = None, labels_file=None):
        super().__init__(root, classes or builtin("coco"), labels_file)

    def missing(self, need: str) -> str | None:
        masks = (self.root / "SegmentationClass").is_dir()
        if need == "images" and not any((self.root / d).is_dir() for d in ("JPEGImages", "train2014", "val2014")):
            return "JPEGImages/, train2014/ or val2014/ (the images)"
        if need == "labels" and self._labels is None and not masks:
            return "labels file (--labels, CLIP-ES's format) and no SegmentationClass/ to read labels from"
        if need == "masks" and not masks:
            return "SegmentationClass/ (ground-truth masks)"
        return None

    @staticmethod
    def _subset(image_id: str) -> str:
        return "val2014" if "val2014" in image_id else "train2014"

    def image_path(self, image_id: str) -> Path:
        sub = self._subset(image_id)
        cands = [self.root / "JPEGImages" / sub / f"{image_id}.jpg", self.root / "JPEGImages" / f"{image_id}.jpg",
                 self.root / sub / f"{image_id}.jpg"]
        return _first_existing(cands) or cands[0]

    def mask_path(self, image_id: str) -> Path | None:
        sub = self._subset(image_id)
        return _first_existing([self.root / "SegmentationClass" / sub / f"{image_id}.png",
                                self.root / "SegmentationClass" / f"{image_id}.png"])

    def default_ids(self, split: str) -> list[str]:
        if self._labels is not None:
            return list(self._labels) + list(self._label_errors)
        for d in (self.root / "JPEGImages" / f"{split}2014", self.root / f"{split}2014"):
            if d.is_dir():
                return sorted(p.stem for p in d.glob("*.jpg"))
        return super().default_ids(split)


class FolderDataset(Dataset):
    """A folder of images (any common extension, found recursively by file stem) with a labels file
    (CSV or JSON: image id -> class names; needed for CAMs, not for prediction) and a class YAML;
    optional masks folder of <id>.png."""

    name = "folder"

    def __init__(self, root, classes: ClassList, labels_file=None, masks: str | Path | None = None):
        super().__init__(root, classes, labels_file)
        self.masks = Path(masks).expanduser() if masks else None
        self._paths: dict[str, Path] = {}
        for p in sorted(self.root.rglob("*")):
            if p.suffix.lower() in IMAGE_EXTS and p.is_file():
                key = str(p.relative_to(self.root).with_suffix(""))
                self._paths.setdefault(key, p)
                self._paths.setdefault(p.stem, p)

    def image_path(self, image_id: str) -> Path:
        return self._paths.get(image_id, self.root / f"{image_id}.jpg")

    def mask_path(self, image_id: str) -> Path | None:
        return _first_existing([self.masks / f"{image_id}.png"]) if self.masks else None

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def missing(self, need: str) -> str | None:
        if need == "images" and not self._paths:
            return f"images ({', '.join(IMAGE_EXTS)}) in it or below"
        if need == "labels" and self._labels is None:
            return "labels file (--labels labels.csv|labels.json)"
        if need == "masks" and (self.masks is None or not self.masks.is_dir()):
            return f"folder of ground-truth masks ({f'{self.masks} not found' if self.masks else 'pass --masks DIR'})"
        return None

    def default_ids(self, split: str) -> list[str]:
        """The labelled images, or every image found when there is no labels file (prediction)."""
        if self._labels is not None:
            return list(self._labels) + list(self._label_errors)
        return sorted({str(p.relative_to(self.root).with_suffix("")) for p in self._paths.values()})

    def _own_labels(self, image_id: str) -> list[int]:
        raise SampleError(f"image {image_id}: the folder dataset needs a labels file (--labels labels.csv|labels.json)")


def build_dataset(name: str, root: str | Path, classes: str | Path | None = None,
                  labels: str | Path | None = None, masks: str | Path | None = None,
                  needs: Iterable[str] = ()) -> Dataset:
    """Dataset by name ('voc', 'coco', 'folder'); ``classes`` is a class YAML (required for folder);
    ``needs``: what the caller reads ('images', 'labels', 'masks'), refused now if the root lacks it."""
    vocab = ClassList.from_yaml(classes) if classes else None
    if name == "voc":
        ds: Dataset = VOCDataset(root, vocab, labels)
    elif name == "coco":
        ds = COCODataset(root, vocab, labels)
    elif name == "folder":
        if vocab is None:
            raise ValueError("the folder dataset needs a class list (--classes classes.yaml, see data/voc.yaml)")
        ds = FolderDataset(root, vocab, labels, masks)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose voc, coco or folder")
    ds.require(needs)
    return ds


def image_folder(path: str | Path, class_names: Iterable[str]) -> FolderDataset:
    """The images of a folder (found recursively) to predict with a model of ``class_names``; no labels
    needed. ``ValueError`` naming the folder when it is missing or holds no image."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path}: image folder not found; IMAGES= (--images) names a folder of images")
    names = tuple(class_names)
    ds = FolderDataset(path, ClassList(names=names, prompts=names, background=()))
    if not ds._paths:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) in this folder or below; IMAGES= (--images) "
                         "names a folder of images")
    return ds
