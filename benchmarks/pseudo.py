"""Pseudo-label stage benchmark on synthetic VOC-sized scenes.

    python -m benchmarks.pseudo [--n 12] [--size 375x500] [--jobs 1,2]

Prints (1) images/s of ``run_pseudo`` at each worker count, side by side, and the speed-up;
(2) per-image time against a straightforward single-process pydensecrf loop (OpenCV read, CRF,
OpenCV write) and the pixel agreement of the two; (3) CRF label quality with the reference's
wrapped guide image vs the plain image (SPEC 10.8), with and without the 0.95 confidence mask.
Worker pools are warmed up first (pool start-up is printed apart); timed runs alternate between worker
counts and the best of --repeat is reported, as other load on a shared machine would otherwise decide.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline import crf, metrics, synthetic
from pipeline.camfile import load_cams, upsample_cams
from pipeline.datasets import build_dataset, read_mask
from pipeline.image import load_rgb
from pipeline.labelio import read_label
from pipeline.pseudo import PseudoConfig, run_pseudo


def straightforward_loop(root: Path, ids: list[str], out: Path) -> float:
    """The baseline: one process, CLIP-ES's per-image steps written out plainly. Returns seconds."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in ids:
        bgr = cv2.imread(str(root / "JPEGImages" / f"{i}.jpg"))
        d = load_cams(root / "cams" / f"{i}.npz")
        cams = upsample_cams(d["cams"], bgr.shape[:2])
        prob = np.concatenate([1 - cams.max(0, keepdims=True), cams])
        guide = np.mod(np.trunc(bgr.astype(np.float32) - np.float32(crf.BGR_MEAN)), 256).astype(np.uint8)
        C, H, W = prob.shape
        c = dcrf.DenseCRF2D(W, H, C)
        c.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
        c.addPairwiseGaussian(sxy=1, compat=3)
        c.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(guide), compat=4)
        q = np.array(c.inference(10)).reshape(C, H, W)
        label = np.concatenate([[0], d["keys"] + 1])[q.argmax(0)].astype(np.uint8)
        label[q.max(0) < 0.95] = 255
        cv2.imwrite(str(out / f"{i}.png"), label)
    return time.perf_counter() - t0


def guide_quality(root: Path, ids: list[str], conf: float = 0.95) -> list[dict]:
    """mIoU of CAM argmax (tau 1) and of CRF labels for each guide, without and with the confidence mask."""
    n = 21
    acc = {k: np.zeros((n, n), np.int64) for k in ("cams", "wrapped", "plain", "wrapped_conf", "plain_conf")}
    kept = {"wrapped": 0, "plain": 0}
    total = 0
    for i in ids:
        rgb = load_rgb(root / "JPEGImages" / f"{i}.jpg")
        gt = read_mask(root / "SegmentationClass" / f"{i}.png", 20)
        d = load_cams(root / "cams" / f"{i}.npz")
        cams = upsample_cams(d["cams"], rgb.shape[:2])
        acc["cams"] += metrics.confusion_matrix(metrics.cam_labels(cams, d["keys"], 1.0), gt, n)
        unary = crf.unary_energy(crf.background_probs(cams))
        for g in ("wrapped", "plain"):
            q = crf.dense_crf(unary, crf.guide_image(rgb, g))
            label = crf.labels_from_scores(q, d["keys"])
            acc[g] += metrics.confusion_matrix(label, gt, n)
            label[crf.crf_low_confidence(q, conf)] = 255
            r = metrics.pseudo_confusions(label, gt, n)
            acc[f"{g}_conf"] += r["confident"]
            kept[g] += int(r["counts"][0])
        total += gt.size
    rows = [{"labels": "CAM argmax (bg = 1 - max, tau 1)", "miou": 100 * metrics.mean_iou(acc["cams"]),
             "pixel_acc": 100 * metrics.pixel_accuracy(acc["cams"]), "coverage": 100.0}]
    for g in ("wrapped", "plain"):
        rows.append({"labels": f"CRF, {g} guide, no 255", "miou": 100 * metrics.mean_iou(acc[g]),
                     "pixel_acc": 100 * metrics.pixel_accuracy(acc[g]), "coverage": 100.0})
        rows.append({"labels": f"CRF, {g} guide, conf {conf} (kept pixels)", "miou": 100 * metrics.mean_iou(acc[f"{g}_conf"]),
                     "pixel_acc": 100 * metrics.pixel_accuracy(acc[f"{g}_conf"]), "coverage": 100 * kept[g] / total})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pseudo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=12, help="synthetic images")
    p.add_argument("--size", default="375x500", help="HxW of each image (VOC-like)")
    p.add_argument("--jobs", default="1,2", help="worker counts to time")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per worker count (best is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="keep the synthetic data here (default: a temp folder)")
    a = p.parse_args(argv)
    H, W = (int(v) for v in a.size.lower().split("x"))
    jobs = [int(j) for j in a.jobs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.dir or tmp)
        ids = synthetic.make_scenes(root, a.n, (H, W), a.seed)
        synthetic.make_noisy_cams(root, root / "cams", seed=a.seed)
        ds = build_dataset("voc", root)
        print(f"{a.n} synthetic images of {H}x{W}, default CLIP-ES CRF (10 iterations), {root}")

        # Pools are warmed up first; runs alternate between worker counts and the best of --repeat counts,
        # so other load on a shared machine does not decide the comparison.
        for j in jobs:
            t0 = time.perf_counter()
            run_pseudo(ds, ids[: max(j, 1)], root / "cams", root / f"warm_j{j}", n_jobs=j, progress=False)
            print(f"  warm-up -j {j} (incl. pool start): {time.perf_counter() - t0:.1f} s")
        best_s = {j: float("inf") for j in jobs}
        for r in range(a.repeat):
            for j in jobs:
                s = run_pseudo(ds, ids, root / "cams", root / f"pseudo_j{j}", PseudoConfig(), n_jobs=j,
                               progress=False)
                assert s["failed"] == 0, s["errors"]
                (root / f"pseudo_j{j}" / "manifest.json").unlink()  # next repeat recomputes everything
                best_s[j] = min(best_s[j], s["seconds"])
                print(f"  run {r + 1} -j {j}: {a.n / s['seconds']:.2f} images/s   (load avg {os.getloadavg()[0]:.2f})")
        rates = {j: a.n / best_s[j] for j in jobs}
        print("throughput   " + "   ".join(f"-j {j}: {rates[j]:.2f} img/s" for j in jobs)
              + f"   (best of {a.repeat}; {os.cpu_count()} cores)")
        if 1 in rates and len(rates) > 1:
            most = max(rates)
            print(f"speed-up     {rates[most] / rates[1]:.2f}x with {most} workers vs 1")

        base_s = min(straightforward_loop(root, ids, root / "baseline") for _ in range(a.repeat))
        ours = a.n / rates[jobs[0]]
        print(f"per image    straightforward pydensecrf loop {1000 * base_s / a.n:.0f} ms (best of {a.repeat}); "
              f"run_pseudo -j {jobs[0]} {1000 * ours / a.n:.0f} ms "
              f"({(ours - base_s) / base_s * 100:+.1f}%)")
        agree = np.mean([np.mean(read_label(root / f"pseudo_j{jobs[0]}" / f"{i}.png")
                                 == cv2.imread(str(root / "baseline" / f"{i}.png"), cv2.IMREAD_UNCHANGED)) for i in ids])
        print(f"agreement    {100 * agree:.3f}% of pixels identical to the straightforward loop (incl. 255)")

        print("\nguide image (SPEC 5.3 step 1 / 10.8): wrapped = reference uint8 wrap-around, plain = image")
        print(metrics.format_table(guide_quality(root, ids)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
