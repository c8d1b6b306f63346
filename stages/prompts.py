"""make prompts: rank prompt templates by sharpness on a labelled split (CLIP-ES, CVPR 2023).

    python -m stages.prompts --dataset voc --root ~/data/VOC2012 --split train --clip ~/models/ViT-B-16.pt
    python -m stages.prompts --propose-background --classes my_classes.yaml
"""
from __future__ import annotations

import argparse
import sys

from stages.common import fail

from pipeline.classes import ClassList
from pipeline.clip.model import CheckpointError
from pipeline.io import FolderInUse, output_lock
from pipeline.cams.prompts import PromptsConfig, propose_background, run_prompts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.prompts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["voc", "coco", "folder"])
    p.add_argument("--root")
    p.add_argument("--split", default=None, help="default: train (voc, coco), every labelled image (folder)")
    p.add_argument("--clip")
    p.add_argument("--out", default=None, help="default outputs/<dataset>/prompts")
    p.add_argument("--classes", default=None, help="class list YAML (required for folder)")
    p.add_argument("--labels", default=None)
    p.add_argument("--masks", default=None, help="folder dataset: ground-truth masks, enables the mIoU column")
    p.add_argument("--templates", default=None, help="file of templates, one per line (default data/templates.txt)")
    p.add_argument("--top", type=int, default=5, help="initial-CAM mIoU for this many best templates (needs GT)")
    p.add_argument("--max-images", type=int, default=0, help="score on the first N images only (0: all)")
    p.add_argument("--no-background", action="store_true", help="softmax without the background set")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--propose-background", action="store_true",
                   help="print a background set for --classes (common scene words that collide with no class) and exit")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.propose_background:
        if not a.classes:
            p.error("--propose-background needs --classes")
        words = propose_background(ClassList.from_yaml(a.classes))
        print("background: [" + ", ".join(words) + "]")
        return 0
    missing = [f"--{k}" for k in ("dataset", "root", "clip") if not getattr(a, k)]
    if missing:
        p.error(f"missing {', '.join(missing)}")
    split = a.split or {"voc": "train", "coco": "train", "folder": "all"}[a.dataset]
    cfg = PromptsConfig(dataset=a.dataset, root=a.root, split=split, clip=a.clip,
                        out=a.out or f"outputs/{a.dataset}/prompts", classes=a.classes, labels=a.labels, masks=a.masks,
                        templates=a.templates, top=a.top, max_images=a.max_images, background=not a.no_background,
                        device=a.device, precision=a.precision, progress=not a.no_progress)
    try:
        with output_lock(cfg.out):
            ranking, errors = run_prompts(cfg)
    except (FolderInUse, CheckpointError, OSError, ValueError, ImportError) as e:
        return fail(e)
    print((cfg.out + "/ranking.md:"))
    for row in ranking.rows()[:10]:
        miou = "" if row["init_cam_miou_pct"] is None else f"  initial-CAM mIoU {row['init_cam_miou_pct']:.2f}%"
        print(f"  {row['rank']:3d}. {row['template']:<40s} sharpness {row['sharpness']:.5f}{miou}")
    if errors:
        print(f"{len(errors)} image(s) skipped; see {cfg.out}/errors.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
