"""Panels (image | CAM heat-maps | pseudo-label overlay | ground truth) and an index.html gallery,
worst per-image mIoU first.

    python -m stages.viz --dataset voc --root data/VOC2012 --split val --limit 200
Exit status: 0 ok, 1 some images failed (see errors.json), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.common import add_dataset_args, fail, open_dataset, outputs, print_failures


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.viz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--cams", default=None, help="CAM folder (default outputs/<dataset>/cams; 'none' to leave out)")
    p.add_argument("--pseudo", default=None, help="pseudo-label folder (default outputs/<dataset>/pseudo; 'none' to leave out)")
    p.add_argument("--out", default=None, help="panel folder (default outputs/<dataset>/viz)")
    p.add_argument("--limit", type=int, default=None, help="only the first N ids of the split")
    p.add_argument("--tile-height", type=int, default=192, help="rows of each panel tile")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.eval.viz import run_viz
    from pipeline.io import FolderInUse, output_lock

    pick = lambda v, what: None if v == "none" else (v or outputs(args.dataset, what))  # noqa: E731
    try:
        ds, ids = open_dataset(args)
        out = args.out or outputs(args.dataset, "viz")
        with output_lock(out):
            res = run_viz(ds, ids[: args.limit] if args.limit else ids, out,
                          cams_dir=pick(args.cams, "cams"), pseudo_dir=pick(args.pseudo, "pseudo"),
                          tile_h=args.tile_height, n_jobs=args.jobs, progress=not args.no_progress)
    except (FolderInUse, ValueError, OSError) as e:
        return fail(e)
    print(f"viz: {res['done']} panels, {res['failed']} failed -> {res['index']}")
    print_failures(res["errors"], Path(res["index"]).parent)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
