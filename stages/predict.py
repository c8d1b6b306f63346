"""Predict label PNGs with a trained segmentation model (multi-scale + flip, sliding window, optional CRF).

    python -m stages.predict --checkpoint outputs/voc/train/weclip_voc --dataset voc --root ~/data/VOC2012 --split val
    python -m stages.predict --checkpoint outputs/voc/train/weclip_voc --images some/folder     # any images

Inference settings default to those stored in the checkpoint (the training config's ``infer`` section);
flags override them. Outputs: <out>/<id>.png (palette by default: 0 background, c + 1 class c) and
<out>/overlay/<id>.jpg (the labels blended over the image; --no-overlays to skip).
Exit status: 0 ok, 1 some images failed (see errors.json), 2 bad arguments or checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.data.datasets import image_folder
from stages.common import DEFAULT_SPLIT, add_dataset_args, fail, open_dataset, print_failures


def add_infer_args(p: argparse.ArgumentParser) -> None:
    """Checkpoint and inference flags (shared with stages.evaluate_model)."""
    p.add_argument("--checkpoint", required=True, help="checkpoint file or training run folder (uses its latest)")
    p.add_argument("--clip", default=None, help="CLIP checkpoint path, if not where the weclip run had it")
    p.add_argument("--dino", default=None, help="DINOv2 backbone file, if not where the weclip-plus run had it "
                   "(same content; refused for models without a DINOv2)")
    p.add_argument("--preset", default=None, choices=("excel",),
                   help="a named inference protocol over the checkpoint's settings (other flags still apply): "
                        "excel = ExCEL's square 320 x {0.7, 1.0, 1.2, 1.5}, mirrored except at 1.0")
    p.add_argument("--scales", default=None, help="comma-separated test scales, e.g. 1.0,0.75")
    p.add_argument("--flip", dest="flip", action="store_true", default=None, help="add flipped predictions")
    p.add_argument("--no-flip", dest="flip", action="store_false")
    p.add_argument("--crf", dest="crf", action="store_true", default=None, help="dense CRF on the softmax")
    p.add_argument("--no-crf", dest="crf", action="store_false")
    p.add_argument("--crf-preset", choices=("weclip", "deeplab", "clipes", "excel"), default=None,
                   help="CRF parameters and guide image (default: the checkpoint's, else by model family: "
                        "weclip models -> weclip, DeepLab -> deeplab)")
    p.add_argument("--crf-backend", choices=("auto", "torch", "pydensecrf"), default=None,
                   help="dense CRF implementation (auto: torch on CUDA, pydensecrf on the CPU when installed)")
    p.add_argument("--crf-max-pixels", type=int, default=None,
                   help="larger images run the CRF scaled down to this many pixels (0: no cap; default 1000000)")
    p.add_argument("--long-side", type=int, default=None, help="resize the long side to this first (WeCLIP: 512)")
    p.add_argument("--window", type=int, default=None, help="sliding-window tile size for large images")
    p.add_argument("--stride", type=int, default=None, help="sliding-window step (default 2/3 of the window)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def infer_overrides(args: argparse.Namespace) -> dict:
    from pipeline.eval.infer import infer_preset

    d = infer_preset(args.preset) if args.preset else {}
    if args.scales:
        d["scales"] = [float(s) for s in args.scales.split(",")]
    for k in ("flip", "crf", "long_side", "window", "stride", "crf_preset", "crf_backend"):
        if getattr(args, k) is not None:
            d[k] = getattr(args, k)
    if args.crf_max_pixels is not None:
        d["crf_max_pixels"] = args.crf_max_pixels or None
    if args.crf_preset is not None:
        d["crf_params"] = None  # the preset's numbers, not those stored with the checkpoint
    return d


def parse_args(argv=None) -> argparse.Namespace:
    from pipeline.data.labelio import FORMATS

    p = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p, required=False)
    p.add_argument("--images", default=None, help="a folder of images to segment (instead of --dataset/--root)")
    p.add_argument("--no-overlays", action="store_true", help="no overlay pictures next to the label PNGs")
    add_infer_args(p)
    p.add_argument("--format", choices=FORMATS, default="palette")
    p.add_argument("--out", default=None, help="output folder (default outputs/<dataset or images>/predict/"
                   "<run>-<checkpoint>/<split or image folder name>)")
    p.add_argument("--overwrite", action="store_true", help="replace predictions made with another checkpoint or settings")
    args = p.parse_args(argv)
    if bool(args.images) == bool(args.dataset or args.root):
        p.error("give either --images DIR or --dataset and --root")
    if args.dataset and not args.root or args.root and not args.dataset:
        p.error("--dataset and --root go together")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline import checkpoint as ckpt_io
    from pipeline.checkpoint import CheckpointMismatch
    from pipeline.clip.model import CheckpointError
    from pipeline.eval.infer import checkpoint_infer_config, infer_device, load_model, predict_split
    from pipeline.io import (FolderInUse, StaleOutputError, check_manifest, output_lock, sha256_file, write_errors,
                             write_manifest)

    try:
        ckpt_file = ckpt_io.resolve(args.checkpoint)
        source = Path(args.images).resolve().name if args.images else Path(args.split or DEFAULT_SPLIT[args.dataset]).stem
        out = (Path(args.out) if args.out else
               Path("outputs") / (args.dataset or "images") / "predict" / ckpt_io.label(ckpt_file) / source)
        with output_lock(out):  # before the model loads: a refused run costs nothing
            device = infer_device(args.device)
            model, meta = load_model(args.checkpoint, device, args.clip, dino=args.dino)
            if args.images:  # the checkpoint knows its classes; no labels are needed to predict
                ds = image_folder(args.images, meta["class_names"][1:])
                ids = ds.ids("all")
            else:
                ds, ids = open_dataset(args)
            if list(meta["class_names"]) != ["background", *ds.classes.names]:
                raise CheckpointMismatch(f"{args.checkpoint}: trained for {meta['num_classes']} classes, the dataset "
                                         f"has {ds.classes.num_classes + 1}")
            cfg = checkpoint_infer_config(meta, infer_overrides(args), device)
            config = {"stage": "predict", "checkpoint_sha256": sha256_file(ckpt_file), "infer": cfg.as_dict(),
                      "format": args.format, "images": str(Path(args.images).resolve()) if args.images else None,
                      "root": str(Path(args.root).resolve()) if args.root else None, "split": args.split}
            check_manifest(out, config, args.overwrite, outputs="**/*.png")
            write_manifest(out, config, status="running", checkpoint=str(ckpt_file))
            res = predict_split(model, ds, ids, out, cfg, device, fmt=args.format, progress=not args.no_progress,
                                overlay_dir=None if args.no_overlays else out / "overlay")
            write_errors(out, res["errors"])
            write_manifest(out, config, status="failed" if res["errors"] else "complete", checkpoint=str(ckpt_file),
                           summary={k: v for k, v in res.items() if k not in ("conf", "errors")})
    except (FolderInUse, ValueError, OSError, CheckpointError, CheckpointMismatch, StaleOutputError) as e:
        return fail(e)
    print(f"{res['done']}/{res['total']} label PNGs in {out} ({res['images_per_s']} img/s)")
    print_failures(res["errors"], out)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
