"""make bench (CAM part): seconds per image of the CAM stage vs the floor and the reference loop.

Random weights of the true ViT-B/16 shapes, VOC-sized images (500x375 -> 512x384, 768 patches),
3 labels each, all measured side by side in one process:
  - stage:      ``run_cams`` over a VOC-layout folder (decode, forward, one backward, CAA, write)
  - floor:      one plain no-grad image-encoder forward per image at the same size
  - excel:      ExCEL's training-free CAMs (calibrated forward, patch-text CAMs, refinement), engine
                and stage (text enrichment off: it only changes the text rows, computed once)
  - reference:  CLIP-ES's per-class loop (block 12 forward + backward per class, hooks, numpy,
                Sinkhorn per class), from tests/reference.py
The GPU figures (engines at batch 64 against a forward, the stage end to end) are ``benchmarks.gpu``'s.
``--quick``: a tiny CLIP and two small images, a check of this code (figures meaningless).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pipeline.cams.gradcam import CAMEngine  # noqa: E402
from pipeline.cams.excel import ExcelConfig, ExcelEngine  # noqa: E402
from pipeline.classes import builtin  # noqa: E402
from pipeline.clip.model import load_clip, read_state_dict  # noqa: E402
from pipeline.data.image import load_image, preprocess, target_size  # noqa: E402
from pipeline.clip.random import TINY, VIT_B_16, random_clip, save_clip  # noqa: E402
from pipeline.cams.stage import CamsConfig, run_cams  # noqa: E402
from reference import ReferenceCLIP, reference_cams, reference_text  # noqa: E402

LABELS = [[14, 8, 11], [2, 6, 14], [7, 11, 17], [0, 5, 6], [9, 12, 16], [3, 10, 18]]


def make_images(root: Path, n: int, size=(375, 500)) -> Path:
    rng = np.random.default_rng(0)
    names = builtin("voc").names
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    ids = []
    for i in range(n):
        image_id = f"bench_{i:03d}"
        h, w = size  # one size, the floor's: VOC's most common 500x375
        img = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(img).resize((w, h), Image.BICUBIC).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        objs = "".join(f"<object><name>{names[c]}</name></object>" for c in LABELS[i % len(LABELS)])
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objs}</annotation>")
        ids.append(image_id)
    (root / "bench.txt").write_text("\n".join(ids) + "\n")
    return root / "bench.txt"


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def cpu_bench(args, ckpt: Path, tmp: Path) -> None:
    split = make_images(tmp / "VOC", args.images, size=args.size)
    ids = split.read_text().split()
    model = load_clip(ckpt)
    voc = builtin("voc")
    image = preprocess(load_image(tmp / "VOC" / "JPEGImages" / f"{ids[0]}.jpg"), target_size(*args.size)).unsqueeze(0)

    with torch.no_grad():
        floor = timed(lambda: model.visual(image), args.repeat)

    engine = CAMEngine(model, voc)
    engine_s = timed(lambda: engine(image, [LABELS[0]]), args.repeat)
    excel = ExcelEngine(model, voc, ExcelConfig(tse=False))
    excel_s = timed(lambda: excel(image, [LABELS[0]]), args.repeat)

    ref = ReferenceCLIP(read_state_dict(ckpt))
    ref_text = reference_text(ref, list(voc.prompts) + list(voc.background), voc.template)
    reference_s = timed(lambda: reference_cams(ref, image, LABELS[0], ref_text, 20, 0.4), max(1, args.repeat // 2))

    def stage(out: str, ids_file: Path, method: str = "clipes"):
        return run_cams(CamsConfig(dataset="voc", root=str(tmp / "VOC"), split=str(ids_file), clip=str(ckpt), out=out,
                                   workers=args.workers, progress=False, method=method,
                                   cam_options={"tse": False} if method == "excel" else {}))

    (tmp / "warm.txt").write_text(ids[0] + "\n")
    stage(str(tmp / "warm"), tmp / "warm.txt")  # warm-up, as for the other two timings
    summary = stage(str(tmp / "cams"), split)
    stage_s = summary.seconds / max(summary.written, 1)
    ex_summary = stage(str(tmp / "cams_excel"), split, "excel")
    ex_stage_s = ex_summary.seconds / max(ex_summary.written, 1)

    grid = image.shape[-2] // 16, image.shape[-1] // 16
    print(f"CPU, {torch.get_num_threads()} threads, random {args.arch}, {image.shape[-1]}x{image.shape[-2]} input "
          f"({grid[0] * grid[1]} patches), 3 labels/image")
    print(f"  floor (plain no-grad encoder forward) : {floor:7.3f} s/img   1.00x")
    print(f"  CAM engine (forward+backward+CAA)     : {engine_s:7.3f} s/img   {engine_s / floor:.2f}x floor")
    print(f"  stage (decode, CAMs, write; {summary.written} imgs)   : {stage_s:7.3f} s/img   {stage_s / floor:.2f}x floor"
          f"   (target <= 1.3x)")
    print(f"  reference per-class loop              : {reference_s:7.3f} s/img   {reference_s / floor:.2f}x floor")
    print(f"  ExCEL engine (calibrated fwd+refine)  : {excel_s:7.3f} s/img   {excel_s / floor:.2f}x floor")
    print(f"  ExCEL stage (decode, CAMs, write)     : {ex_stage_s:7.3f} s/img   "
          f"{ex_stage_s / floor:.2f}x floor")
    print(f"  speed-up of the stage over the reference loop: {reference_s / stage_s:.2f}x   (target >= 3x)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cams", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="decoding processes of the stage (2 cores here: 0)")
    p.add_argument("--quick", action="store_true", help="tiny CLIP, 2 small images, no repeats: checks the code only")
    args = p.parse_args(argv)
    args.arch, args.size = "ViT-B/16", (375, 500)  # VOC's most common size
    if args.quick:
        args.arch, args.size, args.images, args.repeat, args.workers = "tiny ViT", (48, 64), 2, 1, 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ckpt = save_clip(random_clip(TINY if args.quick else VIT_B_16, seed=0), tmp / "ViT-B-16-random.pt")
        cpu_bench(args, ckpt, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
