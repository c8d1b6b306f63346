"""Evaluate CAMs (seed quality, background threshold sweep) or pseudo labels against ground truth, as
CLIP-ES's eval_cam.py and eval_cam_with_crf.py do.

    python -m stages.eval --what cams   --dataset voc --root data/VOC2012 --split train
    python -m stages.eval --what pseudo --dataset voc --root data/VOC2012 --split train

cams: mIoU of keys_ext[argmax] with background (1 - max cam)^tau (tau in {1, 2}; {1..10} for
--cam-key cams_init) or a constant plane (--bg const, 0.05..0.60); the best tau is an ORACLE choice
(picked on the evaluated ground truth), as in the field's reported seed numbers.
pseudo: mIoU on confident pixels, coverage (share of pixels not 255), mIoU with 255 read as background.
Per-class IoU / precision / recall go to <out>/per_class.{csv,json,md}; summary to <out>/summary.json.
Exit status: 0 ok, 1 some images failed (see errors.json), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.common import DEFAULT_SPLIT, add_dataset_args, fail, open_dataset, outputs, print_failures


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", required=True, choices=("cams", "pseudo"))
    add_dataset_args(p)
    p.add_argument("--cams", default=None, help="CAM folder (default outputs/<dataset>/cams)")
    p.add_argument("--pseudo", default=None, help="pseudo-label folder (default outputs/<dataset>/pseudo)")
    p.add_argument("--cam-key", default="cams", choices=("cams", "cams_init"),
                   help="cams: CAA-refined ('attn', tau in {1,2}); cams_init: GradCAM before CAA (tau 1..10)")
    p.add_argument("--bg", default="power", choices=("power", "const"), help="background: (1 - max)^tau or constant tau")
    p.add_argument("--taus", default=None, help="comma-separated values to sweep instead of the default set")
    p.add_argument("--out", default=None, help="report folder (default outputs/<dataset>/eval/<CAM or label folder name>_<split>)")
    p.add_argument("--overwrite", action="store_true", help="replace tables made with other options or inputs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.eval import metrics as M
    from pipeline.io import (FolderInUse, StaleOutputError, check_manifest, output_lock, write_errors, write_json,
                             write_manifest)

    try:
        ds, ids = open_dataset(args, needs=("masks",))
        split = Path(args.split or DEFAULT_SPLIT[args.dataset]).stem
        names = ["background", *ds.classes.names]
        args.cams = str(Path(args.cams or outputs(args.dataset, "cams")).resolve())
        args.pseudo = str(Path(args.pseudo or outputs(args.dataset, "pseudo")).resolve())
        # named after the evaluated folder, so cams_excel's tables never meet cams'
        source = Path(args.cams if args.what == "cams" else args.pseudo).name
        out = Path(args.out) if args.out else outputs(args.dataset, "eval") / f"{source}_{split}"
        args.root = str(Path(args.root).resolve())
        config = {"stage": "eval", **{k: v for k, v in vars(args).items()
                                      if k not in ("jobs", "no_progress", "out", "overwrite")}}
        with output_lock(out):
            check_manifest(out, config, args.overwrite, outputs="per_class.*")
            if args.what == "cams":
                taus = [float(t) for t in args.taus.split(",")] if args.taus else None
                res = M.evaluate_cams(ds, ids, args.cams, taus=taus, bg=args.bg,
                                      cam_key=args.cam_key, n_jobs=args.jobs, progress=not args.no_progress)
                rows = M.per_class_rows(res["conf"], names)
                summary = {"what": "cams", "split": split, "images": res["evaluated"], "failed": res["failed"],
                           "bg": res["bg"], "cam_key": res["cam_key"], "taus": res["taus"],
                           "miou_per_tau": [None if v is None else 100 * v for v in res["miou"]],
                           "best_tau": res["best_tau"], "miou": 100 * res["best_miou"],
                           "oracle": "best_tau is chosen on the evaluated ground truth (oracle choice)"}
                title = f"{args.dataset} {split}: CAM seeds, best tau {res['best_tau']} (oracle)"
            else:
                res = M.evaluate_pseudo(ds, ids, args.pseudo, n_jobs=args.jobs,
                                        progress=not args.no_progress)
                rows = M.per_class_rows(res["conf"], names)
                bg_iou = M.class_metrics(res["conf_bg255"])["iou"]
                for r, v in zip(rows, bg_iou):
                    r["iou_bg255"] = None if v != v else 100 * float(v)
                summary = {"what": "pseudo", "split": split, "images": res["evaluated"], "failed": res["failed"],
                           "miou_confident": 100 * res["miou_confident"], "coverage": 100 * res["coverage"],
                           "miou_bg255": 100 * res["miou_bg255"], "accuracy_confident": 100 * res["accuracy_confident"]}
                title = f"{args.dataset} {split}: pseudo labels"
            summary = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}
            M.write_tables(out, "per_class", rows, summary, title)
            write_json(out / "summary.json", summary)
            write_errors(out, res["errors"])
            write_manifest(out, config)
    except (FolderInUse, ValueError, OSError, StaleOutputError) as e:
        return fail(e)
    print(title)
    print(M.format_table(rows))
    for k, v in summary.items():
        if k not in ("what", "split"):
            print(f"{k}: {f'{v:.2f}' if isinstance(v, float) else v}")
    print(f"tables: {out}/per_class.csv|json|md")
    print_failures(res["errors"], out)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
