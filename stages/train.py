"""Train a segmentation model (WeCLIP decoder on frozen CLIP, or DeepLab) on pseudo labels.

    python -m stages.train --config configs/weclip_voc.yaml --root ~/data/VOC2012 --clip ~/models/ViT-B-16.pt
    python -m stages.train --config configs/deeplab_voc.yaml --root ~/data/VOC2012 \
        --set model.pretrained=~/models/resnet101.pth --set schedule.iters=20000
    torchrun --nproc_per_node 4 -m stages.train --config ...        # DDP (NCCL on GPUs, gloo on CPUs)

--set section.key=value overrides any config key (the value read as YAML and typed by its key: 1e-3 is a
float; a value of another type, or an unknown key, is refused naming the key). --resume continues the run
in --out exactly where its last checkpoint left it. Exit status: 0 done, 2 bad config or inputs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.common import fail


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set schedule.iters=1000 (repeatable)")
    p.add_argument("--root", help="= --set data.root=...")
    p.add_argument("--dataset", help="= --set data.dataset=...")
    p.add_argument("--split", help="training split: shipped name or id-list path (= --set data.split=...)")
    p.add_argument("--val-split", help="validation split, 'none' for no validation (= --set data.val_split=...)")
    p.add_argument("--pseudo", help="pseudo-label folder (= --set data.pseudo=...)")
    p.add_argument("--clip", help="CLIP checkpoint for weclip (= --set model.clip=...)")
    p.add_argument("--gt", action="store_true", help="fully supervised: train on ground-truth masks")
    p.add_argument("--out", default=None, help="run folder (default outputs/<dataset>/train/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--stop-at", type=int, default=None, help="save and stop after this iteration (resume later)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.checkpoint import CheckpointMismatch
    from pipeline.clip.model import CheckpointError
    from pipeline.data.datasets import SampleError
    from pipeline.io import FolderInUse, output_lock
    from pipeline.train.config import load_config
    from pipeline.train.distributed import dist_env
    from pipeline.train.loop import train

    shortcuts = [f"data.root={args.root}" if args.root else "", f"data.dataset={args.dataset}" if args.dataset else "",
                 f"data.pseudo={args.pseudo}" if args.pseudo else "", f"model.clip={args.clip}" if args.clip else "",
                 "data.supervision=gt" if args.gt else "", f"data.split={args.split}" if args.split else "",
                 ("data.val_split=null" if args.val_split.lower() == "none" else f"data.val_split={args.val_split}")
                 if args.val_split else ""]
    try:
        cfg = load_config(args.config, [s for s in shortcuts if s] + args.overrides)
        out = Path(args.out) if args.out else Path("outputs") / cfg["data"]["dataset"] / "train" / Path(args.config).stem
        with output_lock(out):  # every rank of a torchrun run holds it
            res = train(cfg, out, resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress,
                        tensorboard=not args.no_tensorboard)
    except (FolderInUse, ValueError, OSError, CheckpointError, CheckpointMismatch, SampleError, FloatingPointError) as e:
        return fail(e)
    if dist_env()[0] == 0:
        miou = res.pop("val_miou")  # a fraction in the library; percent (0-100) in every file and on screen
        print(json.dumps({**res, "val_miou_pct": None if miou is None else round(100 * miou, 4), "out": str(out)},
                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
