"""Pseudo labels from CAM files: dense CRF, confidence mask, one label PNG per image (CLIP-ES's eval_cam_with_crf.py).

    python -m stages.pseudo --dataset voc --root data/VOC2012 --split train_aug -j 8

Defaults reproduce CLIP-ES's eval_cam_with_crf.py (--crf-preset clipes: wrapped guide image, CRF-marginal
confidence 0.95, GT required); --crf-preset, --guide, --confidence raw|none and --no-require-gt change that.
--crf-backend auto runs the dense CRF with PyTorch on a GPU, with pydensecrf on the CPU (PyTorch when
pydensecrf is not installed); images above --crf-max-pixels are labelled from a scaled-down CRF.
-j: worker processes; with the PyTorch CRF, threads that read images and write labels while this process
labels batches of images on --device.
--refine par labels as ExCEL does instead: PAR guided by the image, argmax, no 255.
Exit status: 0 all labelled, 1 some images failed (see errors.json), 2 bad arguments, stale outputs or a
failed write (a full disk: the run stops there, naming the file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.common import add_dataset_args, fail, open_dataset, outputs, print_failures

def add_pseudo_args(p: argparse.ArgumentParser) -> None:
    """Flags of the labelling itself (shared with `stages.cams --pseudo-out`)."""
    from pipeline.labels.crf import BACKENDS, CONFIDENCE_RULES, DEFAULT_MAX_PIXELS, GUIDES, PRESETS
    from pipeline.data.labelio import FORMATS

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
    p.add_argument("--crf-preset", choices=tuple(PRESETS), default="clipes",
                   help="CRF parameters and guide image of a method (clipes: CLIP-ES's, the default); "
                        "the flags below override single values")
    p.add_argument("--crf-backend", choices=BACKENDS, default="auto",
                   help="dense CRF implementation: torch (PyTorch, any device) or pydensecrf (C++, CPU); "
                        "auto: torch on CUDA, pydensecrf on the CPU when installed, else torch")
    p.add_argument("--crf-max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="larger images run the CRF scaled down to this many pixels, then its marginals are "
                        "upsampled (0: no cap)")
    p.add_argument("--guide", choices=GUIDES, default=None,
                   help="bilateral guide: wrapped = reference's uint8-wrapped BGR-minus-mean image; plain = the "
                        "image in BGR order; rgb = the image in RGB order (default: the preset's)")
    p.add_argument("--format", choices=FORMATS, default="palette", help="palette PNG (VOC colours) or gray like the reference")
    p.add_argument("--power", type=float, default=1.0, help="background row (1 - max cam) ** power")
    p.add_argument("--crf-iters", type=int, default=None, help="mean-field iterations (default: the preset's)")
    p.add_argument("--pos-xy", type=float, default=None, help="Gaussian kernel sxy (default: the preset's)")
    p.add_argument("--pos-w", type=float, default=None, help="Gaussian kernel compat")
    p.add_argument("--bi-xy", type=float, default=None, help="bilateral kernel sxy")
    p.add_argument("--bi-rgb", type=float, default=None, help="bilateral kernel srgb")
    p.add_argument("--bi-w", type=float, default=None, help="bilateral kernel compat")
    p.add_argument("--no-require-gt", action="store_true",
                   help="label images without a ground-truth mask (the reference requires one)")


def pseudo_config(args: argparse.Namespace, device: str = "cpu"):
    """PseudoConfig from the flags of ``add_pseudo_args``: the preset, with single values overridden.
    ``device``: where the torch CRF backend runs."""
    from dataclasses import replace

    from pipeline.labels.crf import preset
    from pipeline.labels.pseudo import PseudoConfig

    pre = preset(args.crf_preset)
    given = {"iters": args.crf_iters, "pos_xy": args.pos_xy, "pos_w": args.pos_w, "bi_xy": args.bi_xy,
             "bi_rgb": args.bi_rgb, "bi_w": args.bi_w}
    params = replace(pre.params, **{k: v for k, v in given.items() if v is not None})
    return PseudoConfig(conf=args.conf, confidence=args.confidence, guide=args.guide or pre.guide, power=args.power,
                        crf=params, format=args.format, require_gt=not args.no_require_gt, preset=args.crf_preset,
                        backend=args.crf_backend, max_pixels=args.crf_max_pixels or None, device=str(device),
                        refine=args.refine, par_input_size=args.par_input_size)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.pseudo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--cams", default=None, help="CAM folder (default outputs/<dataset>/cams)")
    p.add_argument("--out", default=None, help="label folder (default outputs/<dataset>/pseudo)")
    add_pseudo_args(p)
    p.add_argument("--device", default=None, help="device of the torch CRF backend (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs made with another configuration")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.io import FolderInUse, StaleOutputError, output_lock
    from pipeline.labels.pseudo import run_pseudo

    try:
        cfg = pseudo_config(args, args.device or _default_device(args.crf_backend))
        ds, ids = open_dataset(args)
        out = args.out or outputs(args.dataset, "pseudo")
        with output_lock(out):
            res = run_pseudo(ds, ids, args.cams or outputs(args.dataset, "cams"), out,
                             cfg, n_jobs=args.jobs, overwrite=args.overwrite, progress=not args.no_progress)
    except (FolderInUse, StaleOutputError, ValueError, OSError) as e:
        return fail(e)
    errors = res.pop("errors")
    print(json.dumps(res, indent=2))
    print_failures(errors, Path(res["out"]))
    return 1 if errors else 0


def _default_device(backend: str) -> str:
    """cuda when the torch backend may run and a GPU is there; torch is only imported in that case."""
    if backend == "pydensecrf":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
