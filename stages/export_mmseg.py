"""Export pseudo labels as an mmsegmentation 1.x dataset and training config (mmseg is not needed here).

    python -m stages.export_mmseg --dataset voc --root ~/data/VOC2012 --split train_aug \
        --model-config ~/mmsegmentation/configs/deeplabv3plus/deeplabv3plus_r101-d8_4xb4-40k_voc12aug-512x512.py
    # then, in mmsegmentation:  python tools/train.py outputs/voc/mmseg/mmseg_train.py

Writes <out>/mmseg_dataset.py (+ mmseg_train.py with --model-config), train.txt, val.txt; default <out> is
a folder `mmseg` next to the pseudo-label folder. Exit status: 0 ok, 2 bad arguments or missing files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.common import DEFAULT_SPLIT, add_dataset_args, fail, open_dataset, outputs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.export_mmseg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--pseudo", default=None, help="pseudo-label folder (default outputs/<dataset>/pseudo)")
    p.add_argument("--val-split", default=None, help="validation split with ground truth (default: val for voc, "
                   "none otherwise; 'none' to skip)")
    p.add_argument("--model-config", default=None, help="an mmseg 1.x model config to train (its _base_ goes first)")
    p.add_argument("--crop", type=int, default=512, help="training crop size")
    p.add_argument("--out", default=None, help="export folder (default: <pseudo>/../mmseg)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.eval.mmseg_export import export
    from pipeline.io import FolderInUse, output_lock

    try:
        ds, ids = open_dataset(args)
        val_split = args.val_split or ("val" if args.dataset == "voc" else "none")
        val_ids = [] if val_split == "none" else ds.ids(val_split)
        pseudo = Path(args.pseudo) if args.pseudo else outputs(args.dataset, "pseudo")
        out = Path(args.out) if args.out else pseudo.resolve().parent / "mmseg"
        with output_lock(out):
            written = export(ds, ids, val_ids, pseudo, out, args.crop, args.model_config)
    except (FolderInUse, ValueError, OSError) as e:
        return fail(e)
    split = args.split or DEFAULT_SPLIT[args.dataset]
    print(f"mmseg dataset for {len(ids)} training ({split}) and {len(val_ids)} validation images:")
    for k, v in written.items():
        print(f"  {k}: {v}")
    if "train_config" not in written:
        print("pass --model-config <mmseg model config> to also get a ready mmseg_train.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
