"""make demo: CAMs, pseudo labels and pictures for a few real photos (scikit-image samples) in VOC layout.

    python -m stages.demo                      # tiny random CLIP: runs, but the maps mean nothing
    python -m stages.demo --clip ~/models/ViT-B-16.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.clip.model import CheckpointError
from pipeline.data.datasets import build_dataset
from pipeline.data.demo import make_demo_voc
from pipeline.labels.pseudo import PseudoConfig, run_pseudo
from pipeline.clip.random import TINY, random_clip, save_clip
from pipeline.cams.stage import CamsConfig, run_cams
from pipeline.eval.viz import run_viz
from pipeline.io import FolderInUse, StaleOutputError, output_lock
from stages.common import fail

BANNER = """
############################################################################
#  NO CLIP WEIGHTS GIVEN: using a tiny RANDOM model.                       #
#  The pipeline runs end to end, but the CAMs are MEANINGLESS.             #
#  For real maps: make demo CLIP=/path/to/ViT-B-16.pt  (see README).       #
############################################################################
"""


RANDOM_NOTE = "RANDOM WEIGHTS (no CLIP given): these maps and labels are meaningless"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default=None, help="OpenAI ViT-B-16.pt; without it a tiny random model is used")
    p.add_argument("--out", default="outputs/demo", help="demo folder (data, CAMs)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    try:
        with output_lock(a.out):
            return _run(a)
    except (FolderInUse, StaleOutputError, CheckpointError, ValueError, OSError) as e:
        return fail(e)


def _run(a: argparse.Namespace) -> int:
    out = Path(a.out)
    split = make_demo_voc(out / "VOC2012")
    clip = a.clip
    if clip is None:
        print(BANNER, file=sys.stderr)
        clip = str(save_clip(random_clip(TINY, seed=0), out / "random-tiny-clip.pt"))
    tag = "" if a.clip else "-random"
    cams, pseudo, viz = out / f"cams{tag}", out / f"pseudo{tag}", out / f"viz{tag}"
    summary = run_cams(CamsConfig(dataset="voc", root=str(out / "VOC2012"), split=str(split), clip=clip,
                                  out=str(cams), save_init=True, device=a.device, overwrite=True, workers=0))
    data = build_dataset("voc", out / "VOC2012")
    ids = data.ids(str(split))
    labels = run_pseudo(data, ids, cams, pseudo, PseudoConfig(require_gt=False), overwrite=True, progress=False)
    pictures = run_viz(data, ids, viz, cams_dir=cams, pseudo_dir=pseudo, progress=False,
                       banner="" if a.clip else RANDOM_NOTE)
    print(f"demo: {summary.written} CAM files in {cams}, {labels['done']} pseudo labels in {pseudo}, "
          f"panels in {pictures['index']} ({summary.failed + labels['failed'] + pictures['failed']} failed)")
    if a.clip is None:
        print(BANNER, file=sys.stderr)
    return 1 if summary.failed or labels["failed"] or pictures["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
