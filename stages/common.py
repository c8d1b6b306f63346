"""What the stage CLIs share: dataset/split flags, default output folders, failure reports."""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Mapping

DEFAULT_SPLIT = {"voc": "train_aug", "coco": "train", "folder": "all"}


def add_dataset_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Flags that pick a dataset and split (shared by the pseudo, eval, viz and model stages)."""
    p.add_argument("--dataset", required=required, choices=("voc", "coco", "folder"))
    p.add_argument("--root", required=required, help="dataset root (VOC2012 / COCO folder / image folder)")
    p.add_argument("--split", default=None, help="split name shipped in data/splits/<dataset>/ or a path to an id list "
                   "(default: train_aug for voc, train for coco, every labelled image for folder)")
    p.add_argument("--classes", default=None, help="class list YAML (default data/<dataset>.yaml; required for folder)")
    p.add_argument("--labels", default=None, help="image-level labels file (CSV/JSON/txt); folder dataset needs it")
    p.add_argument("--masks", default=None, help="folder dataset: directory of ground-truth <id>.png masks")
    p.add_argument("-j", "--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def open_dataset(args: argparse.Namespace, needs: tuple[str, ...] = ("images",)):
    """(dataset, ids) from the flags of ``add_dataset_args``; a root without what the stage ``needs``
    ('images', 'labels', 'masks') is refused."""
    from pipeline.data.datasets import build_dataset

    ds = build_dataset(args.dataset, args.root, args.classes, args.labels, args.masks, needs)
    return ds, ds.ids(args.split or DEFAULT_SPLIT[args.dataset])


def outputs(dataset: str, what: str) -> Path:
    return Path("outputs") / dataset / what


def print_failures(errors: Mapping[str, str], out_dir: str | Path, shown: int = 10) -> None:
    """The first ``shown`` per-image failures on stderr, and where the rest are."""
    for image_id, msg in list(errors.items())[:shown]:
        print(f"failed {image_id}: {msg}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} image(s) failed; all messages in {Path(out_dir) / 'errors.json'}", file=sys.stderr)


def fail(e: BaseException) -> int:
    """Print ``e`` as one ``error:`` line (no traceback) and return exit status 2. OS errors (disk
    full, a file where a folder should be, no permission) name the path and what to do."""
    msg = str(e)
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        fix = {errno.ENOSPC: "free some space or choose another --out, then re-run "
                             "(finished files are kept, the half-written one is not)",
               errno.EDQUOT: "free some space or choose another --out, then re-run",
               errno.EEXIST: "a file is in the way of an output folder; choose another --out",
               errno.ENOTDIR: "a file is in the way of an output folder; choose another --out",
               errno.EACCES: "choose a folder you can write to (--out)",
               errno.EROFS: "choose another --out"}.get(e.errno, "")
        msg = f"{where}{e.strerror.lower()}{f'; {fix}' if fix else ''}"
    print(f"error: {msg}", file=sys.stderr)
    return 2
