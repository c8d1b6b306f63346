"""Pseudo labels from CAM files: dense CRF, confidence mask, one label PNG per image (SPEC 5.3).

    python -m stages.pseudo --dataset voc --root data/VOC2012 --split train_aug -j 8

Defaults reproduce CLIP-ES's eval_cam_with_crf.py (wrapped guide image, CRF-marginal confidence
0.95, GT required); --guide plain, --confidence raw|none and --no-require-gt change that.
--refine par labels as ExCEL does instead: PAR guided by the image, argmax, no 255.
Exit status: 0 all labelled, 1 some images failed (see errors.json), 2 bad arguments or stale outputs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.common import add_dataset_args, open_dataset, outputs, print_failures

def add_pseudo_args(p: argparse.ArgumentParser) -> None:
    """Flags of the labelling itself (shared with `stages.cams --pseudo-out`)."""
    from pipeline.crf import CONFIDENCE_RULES, GUIDES, CRFParams
    from pipeline.labelio import FORMATS

    d = CRFParams()
    p.add_argument("--refine", choices=("crf", "par"), default="crf",
                   help="crf: CLIP-ES's dense CRF with confidence mask; par: ExCEL's pixel-adaptive refinement "
                        "(background 1 - max, PAR with the image, argmax, no 255)")
    p.add_argument("--par-input-size", type=int, default=None,
                   help="PAR guide: the image resized to this square first (ExCEL: 320); 0: its own size; "
                        "default: the CAM stage's --input-size, from its manifest")
    p.add_argument("--conf", type=float, default=0.95, help="confidence below which a pixel becomes 255")
    p.add_argument("--confidence", choices=CONFIDENCE_RULES, default="crf",
                   help="crf: max CRF marginal (reference code); raw: paper's max(1-max X, max X) on raw CAMs; "
                        "none: no 255 (the reference's --eval_only)")
    p.add_argument("--guide", choices=GUIDES, default="wrapped",
                   help="bilateral guide: wrapped = reference's uint8-wrapped BGR-minus-mean image; plain = the image")
    p.add_argument("--format", choices=FORMATS, default="palette", help="palette PNG (VOC colours) or gray like the reference")
    p.add_argument("--power", type=float, default=1.0, help="background row (1 - max cam) ** power")
    p.add_argument("--crf-iters", type=int, default=d.iters)
    p.add_argument("--pos-xy", type=float, default=d.pos_xy, help="Gaussian kernel sxy")
    p.add_argument("--pos-w", type=float, default=d.pos_w, help="Gaussian kernel compat")
    p.add_argument("--bi-xy", type=float, default=d.bi_xy, help="bilateral kernel sxy")
    p.add_argument("--bi-rgb", type=float, default=d.bi_rgb, help="bilateral kernel srgb")
    p.add_argument("--bi-w", type=float, default=d.bi_w, help="bilateral kernel compat")
    p.add_argument("--no-require-gt", action="store_true",
                   help="label images without a ground-truth mask (the reference requires one)")


def pseudo_config(args: argparse.Namespace):
    """PseudoConfig from the flags of ``add_pseudo_args``."""
    from pipeline.crf import CRFParams
    from pipeline.pseudo import PseudoConfig

    return PseudoConfig(conf=args.conf, confidence=args.confidence, guide=args.guide, power=args.power,
                        crf=CRFParams(args.crf_iters, args.pos_xy, args.pos_w, args.bi_xy, args.bi_rgb, args.bi_w),
                        format=args.format, require_gt=not args.no_require_gt, refine=args.refine,
                        par_input_size=args.par_input_size)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.pseudo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--cams", default=None, help="CAM folder (default outputs/<dataset>/cams)")
    p.add_argument("--out", default=None, help="label folder (default outputs/<dataset>/pseudo)")
    add_pseudo_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace outputs made with another configuration")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.io import StaleOutputError
    from pipeline.pseudo import run_pseudo

    try:
        cfg = pseudo_config(args)
        ds, ids = open_dataset(args)
        res = run_pseudo(ds, ids, args.cams or outputs(args.dataset, "cams"), args.out or outputs(args.dataset, "pseudo"),
                         cfg, n_jobs=args.jobs, overwrite=args.overwrite, progress=not args.no_progress)
    except (StaleOutputError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors = res.pop("errors")
    print(json.dumps(res, indent=2))
    print_failures(errors, Path(res["out"]))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
