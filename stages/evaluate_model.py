"""Evaluate a trained segmentation model against ground truth (make eval WHAT=model).

    python -m stages.evaluate_model --checkpoint outputs/voc/train/weclip_voc --dataset voc --root ~/data/VOC2012 --split val

mIoU over classes present in the ground truth (pipeline.eval.metrics, the same as the pseudo-label evaluation);
per-class IoU / precision / recall in <out>/per_class.{csv,json,md}, summary in <out>/summary.json.
--save-predictions also writes the label PNGs. Exit status: 0 ok, 1 some images failed, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.predict import add_infer_args, infer_overrides
from stages.common import add_dataset_args, fail, print_failures


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.evaluate_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    add_infer_args(p)
    p.add_argument("--out", default=None,
                   help="report folder (default outputs/<dataset>/eval/model_<run>-<checkpoint>_<split>"
                        "[_<inference flags given>])")
    p.add_argument("--overwrite", action="store_true", help="replace tables made with another checkpoint or settings")
    p.add_argument("--save-predictions", action="store_true", help="also write label PNGs to <out>/predictions")
    return p.parse_args(argv)


def settings_suffix(args: argparse.Namespace) -> str:
    """The inference flags given on the command line, for the default report folder's name, so that
    evaluations of one checkpoint with other settings get folders of their own (``_crf``, ``_preset-excel``)."""
    parts = [f"preset-{args.preset}"] if args.preset else []
    for k in ("scales", "long_side", "window", "stride", "crf_preset", "crf_backend", "crf_max_pixels"):
        if getattr(args, k) is not None:
            parts.append(f"{k.replace('_', '-')}-{getattr(args, k)}")
    for k in ("flip", "crf"):
        if getattr(args, k) is not None:
            parts.append(k if getattr(args, k) else f"no-{k}")
    return "".join("_" + p for p in parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.eval import metrics as M
    from pipeline import checkpoint as ckpt_io
    from pipeline.checkpoint import CheckpointMismatch
    from pipeline.clip.model import CheckpointError
    from pipeline.eval.infer import checkpoint_infer_config, evaluate_model
    from pipeline.io import (FolderInUse, StaleOutputError, check_manifest, output_lock, sha256_file, write_errors,
                             write_json, write_manifest)
    from stages.common import DEFAULT_SPLIT, open_dataset

    try:
        ds, ids = open_dataset(args, needs=("images", "masks"))
        split = Path(args.split or DEFAULT_SPLIT[args.dataset]).stem
        ckpt_file = ckpt_io.resolve(args.checkpoint)
        out = Path(args.out) if args.out else (Path("outputs") / args.dataset / "eval"
                                               / f"model_{ckpt_io.label(ckpt_file)}_{split}{settings_suffix(args)}")
        with output_lock(out):
            # the settings first, so that a folder holding another evaluation is refused before any prediction
            ck = ckpt_io.load(ckpt_file)   # read once: its settings decide the folder check, its weights the model
            infer = checkpoint_infer_config(ck["meta"], infer_overrides(args), args.device)
            config = {"stage": "evaluate_model", "checkpoint_sha256": sha256_file(ckpt_file),
                      "infer": infer.as_dict(), "root": str(Path(args.root).resolve()), "split": args.split}
            check_manifest(out, config, args.overwrite, outputs="per_class.*")
            res = evaluate_model(ck, ds, ids, out_dir=out / "predictions" if args.save_predictions else None,
                                 infer=infer, device=args.device, clip=args.clip, dino=args.dino,
                                 progress=not args.no_progress)
            rows = M.per_class_rows(res["conf"], ["background", *ds.classes.names])
            summary = {"what": "model", "split": split, "checkpoint": res["checkpoint"], "images": res["evaluated"],
                       "failed": res["failed"], "miou": 100 * res["miou"], "accuracy": 100 * res["accuracy"],
                       "scales": list(res["infer"]["scales"]), "flip": res["infer"]["flip"], "crf": res["infer"]["crf"]}
            summary = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}
            title = f"{args.dataset} {split}: segmentation model"
            M.write_tables(out, "per_class", rows, summary, title)
            write_json(out / "summary.json", summary)
            write_errors(out, res["errors"])
            write_manifest(out, config, checkpoint=str(ckpt_file))
    except (FolderInUse, ValueError, OSError, CheckpointError, CheckpointMismatch, StaleOutputError) as e:
        return fail(e)
    print(title)
    print(M.format_table(rows))
    print(f"mIoU: {summary['miou'] if summary['miou'] is None else round(summary['miou'], 2)}  "
          f"({res['evaluated']} images, {res['images_per_s']} img/s)")
    print_failures(res["errors"], out)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
