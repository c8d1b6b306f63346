"""GPU checks, skipped without CUDA (``make gpu-check`` runs them, then the GPU benchmark rows).

On a random CLIP of the true ViT-B/16 shapes written to disk (``pipeline.clip.random``):
- fp16 CAMs stay within the reference computation's own fp16 spread (tolerance from evidence, see
  ``test_fp16_cams_within_the_references_own_fp16_spread``); batching same-size images changes nothing
  beyond the fp16 noise; the torch dense CRF agrees with the CPU and batches;
- every stage runs end to end on the GPU in its default precision, through its real entry point
  (``stages.*.main``), on small synthetic VOC-layout data with schedules of a few iterations: CAMs by both
  methods, pseudo labels and cams-pseudo with the torch CRF, training of weclip, weclip-online, excel,
  deeplab and weclip-plus (a random DINOv2 ViT-S/14), predict, and evaluation with the CRF.

``CLIP_WSSS_TEST_DEVICE=cpu`` runs the same tests on the CPU (a check of the tests themselves where no GPU is
at hand, about 1.5-3 minutes): the stages with a tiny CLIP and a tiny ResNet but in the precisions a GPU picks
(CLIP-ES CAMs in fp16, training under bf16 autocast), the fp16 bound with a random B/16 at 224 x 224.
``CLIP_WSSS_GPU_CLIP`` names a random ViT-B/16 file already written (``make gpu-check`` writes one for the tests
and the benchmarks); with ``CLIP_WSSS_GPU_REPORT`` set to a folder, the fp16 figures are written there as
``fp16_spread.json`` for the gpu-check table.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cams.gradcam import CAMEngine
from pipeline.classes import builtin
from pipeline.clip.model import load_clip, read_state_dict
from pipeline.clip.random import TINY, VIT_B_16, random_clip, save_clip
from pipeline.data import synthetic
from pipeline.dino.random import TINY as TINY_DINO, VIT_S_14, random_dino, save_dino
from reference import paired_spreads, precision_runs

DEVICE = os.environ.get("CLIP_WSSS_TEST_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp16 CAMs: ours may be this many times as far from our float32 maps as the reference's fp16 maps are from the
# reference's float32 maps, per kind of map and statistic (``reference.paired_spreads``: refined maps compared
# on the same maps on both sides). Measured on the CPU with random B/16s (docs/testing.md), ours / reference
# at most, sets of 16 images at 384 x 512 (as on the GPU) | of 4 at 224 x 224 (as on the CPU): GradCAM max
# 1.51 | 1.45, mean 1.42 | 1.44, 1 - r 2.24 | 2.29; refined max 1.78 | 2.66, mean 2.01 | 2.27, 1 - r 2.93 |
# 6.47. The mean is stable, the extremes of a few maps are not; each margin leaves 1.4-2x room. CAA in fp16
# exceeds them 18-500x; our engine in bf16 does not at 384 x 512 (GradCAM's gradients, ~1e-6, are subnormal in
# fp16, in the reference as in ours, not in bf16), and does in half the sets at 224 x 224.
FP16_MARGINS = {"init": {"max_abs": 2.5, "mean_abs": 2.0, "one_minus_r": 4.0},
                "cams": {"max_abs": 5.0, "mean_abs": 4.0, "one_minus_r": 12.0}}


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    given = os.environ.get("CLIP_WSSS_GPU_CLIP")
    if given and ON_GPU:
        return Path(given)
    return save_clip(random_clip(VIT_B_16 if ON_GPU else TINY, seed=1), tmp_path_factory.mktemp("gpu") / "ViT-B-16.pt")


@contextlib.contextmanager
def exact_float32():
    """float32 as float32: cuDNN's convolutions (the patch embedding) default to TF32 on Ampere and later."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


# the fp16 check on the CPU runs B/16 too, at 224 x 224 and on 4 images (a minute or two): a tiny CLIP's maps
# are too few and too chaotic for the bound to mean anything (its ratios spread over 0.06-9x, docs/testing.md).
# 16 images on the GPU: at 384 x 512 few refined maps keep their boxes in both precisions, and 16 images make
# a set with none improbable (none in 300 drawn sets, 1 in 300 with 12 images)
IMAGES = (384, 512) if ON_GPU else (224, 224)
LABELS = [[14, 8, 11], [2], [7, 11], [0, 5], [9, 12, 16], [3, 10, 18], [1, 4], [13, 19, 6], [15], [17, 8], [5, 14],
          [11], [0, 2, 19], [6, 9], [12], [4, 16, 7]][:16 if ON_GPU else 4]


@pytest.fixture(scope="module")
def fp16_runs(clip_path, tmp_path_factory):
    """On random images with a random B/16: the reference's float32 and fp16 maps
    (``reference.precision_runs``), our float32 maps and our batched fp16 maps."""
    path = clip_path if ON_GPU else save_clip(random_clip(VIT_B_16, seed=1), tmp_path_factory.mktemp("b16") / "b16.pt")
    voc = builtin("voc")
    x = torch.randn(len(LABELS), 3, *IMAGES, generator=torch.Generator().manual_seed(0))
    with exact_float32():
        reference = precision_runs(read_state_dict(path), x, LABELS, list(voc.prompts) + list(voc.background),
                                   voc.template, voc.num_classes, voc.box_threshold, DEVICE)
        ref = CAMEngine(load_clip(path, DEVICE, torch.float32), voc)(x.to(DEVICE), LABELS)
    engine = CAMEngine(load_clip(path, DEVICE, torch.float16), voc)
    return {"reference": reference, "float32": pairs(ref), "fp16": pairs(engine(x.to(DEVICE).half(), LABELS)),
            "engine": engine, "x": x}


def statistics(d: dict) -> dict[str, float]:
    return {"max_abs": d["max_abs"], "mean_abs": d["mean_abs"], "one_minus_r": 1 - d["min_pearson"]}


def within_spread(spreads: dict) -> None:
    """Each statistic of ours at most its margin times the reference's, for GradCAM and refined maps."""
    for kind in ("init", "cams"):
        ref, ours = spreads["reference"][kind], spreads["ours"][kind]
        assert ours["maps"] > 0, f"{kind}: no map to compare ({spreads})"
        r, o, m = statistics(ref), statistics(ours), FP16_MARGINS[kind]
        over = {s: f"{o[s]:.3g} > {m[s]} x {r[s]:.3g}" for s in r if o[s] > m[s] * r[s]}
        assert not over, (kind, over, spreads)


def pairs(results) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(r.cams, r.init) for r in results]


def test_fp16_cams_within_the_references_own_fp16_spread(fp16_runs):
    """CLIP-ES runs its CAMs in fp16 on CUDA. How far the reference's own fp16 maps lie from its float32
    maps on the same inputs bounds how far ours may (``FP16_MARGINS``): GradCAM maps, and the refined maps
    whose box masks agree between the precisions in both (elsewhere a pixel crossed the box threshold and a
    whole box appears or goes, in the reference as in ours)."""
    spreads = paired_spreads(fp16_runs["reference"], (fp16_runs["float32"], fp16_runs["fp16"]),
                             builtin("voc").box_threshold)
    if os.environ.get("CLIP_WSSS_GPU_REPORT"):
        Path(os.environ["CLIP_WSSS_GPU_REPORT"], "fp16_spread.json").write_text(
            json.dumps({**spreads, "margins": FP16_MARGINS}, indent=1))
    within_spread(spreads)


def test_batched_equals_single_within_the_fp16_spread(fp16_runs):
    """Batching same-size images moves the fp16 maps no more than fp16 itself does (same bound)."""
    engine, x = fp16_runs["engine"], fp16_runs["x"].to(DEVICE).half()
    single = pairs([engine(x[b:b + 1], [LABELS[b]])[0] for b in range(len(LABELS))])
    within_spread(paired_spreads(fp16_runs["reference"], (single, fp16_runs["fp16"]), builtin("voc").box_threshold))


def test_torch_crf_on_gpu_agrees_with_the_cpu_and_batches():
    from pipeline.labels import crf
    from pipeline.data.camfile import upsample_cams
    from pipeline.labels.crf import torch_backend

    rng = np.random.default_rng(0)
    H, W = (375, 500) if ON_GPU else (60, 80)
    us, gs = [], []
    for labels in (2, 8, 20):  # one C per batch: pad with labels of the largest energy (-log 1e-5)
        img, keys, cams = synthetic.scene_with_cams(rng, (H, W), labels)
        u = crf.unary_energy(crf.background_probs(upsample_cams(cams, (H, W))))
        pad = np.full((21 - u.shape[0], u.shape[1]), u.max(), np.float32)
        us.append(np.concatenate([u, pad]).reshape(21, H, W))
        gs.append(crf.wrapped_guide(img))
    u, g = torch.from_numpy(np.stack(us)), torch.from_numpy(np.stack(gs))
    params = crf.CRFParams()
    cpu = torch_backend.dense_crf(u[:1], g[:1], params)
    one = torch_backend.dense_crf(u[:1].to(DEVICE), g[:1].to(DEVICE), params).cpu()
    assert (one.argmax(1) == cpu.argmax(1)).float().mean() >= 0.999  # float sums in another order only
    assert ((one.max(1).values >= 0.95) == (cpu.max(1).values >= 0.95)).float().mean() >= 0.999
    batch = torch_backend.dense_crf(u.to(DEVICE), g.to(DEVICE), params).cpu()
    torch.testing.assert_close(batch[:1], one, atol=1e-4, rtol=0)
    half = torch_backend.dense_crf(u.to(DEVICE).half(), g.to(DEVICE), params)
    assert half.dtype == torch.float16 and (half.float().cpu().argmax(1) == batch.argmax(1)).float().mean() >= 0.99


# ------------------------------------------------------------------------ every stage, end to end
N_TRAIN, N_VAL = 8, 4
SHORT = ["--set", "schedule.iters=4", "--set", "schedule.warmup_iters=1", "--set", "train.batch_size=2",
         "--set", f"data.crop={224 if ON_GPU else 32}", "--set", "data.workers=2", "--set", "train.val_every=4",
         "--set", "train.ckpt_every=4", "--set", "train.log_every=1", "--no-progress", "--no-tensorboard"]
TINY_RESNET = [] if ON_GPU else ["--set", "model.layers=[1,1,1,1]", "--set", "model.base_width=8"]
# On the CPU the stages run in the precisions a GPU picks by default (CLIP-ES CAMs in fp16, training under bf16
# autocast), so a dtype leaking out of a half-precision path fails here rather than first on the GPU.
PRECISION = {"clipes": [] if ON_GPU else ["--precision", "fp16"], "excel": []}
AMP = [] if ON_GPU else ["--set", "train.amp=bf16"]


class Work:
    """The synthetic dataset, the id lists and the folders the stages write, shared by the tests below."""

    def __init__(self, base: Path, clip: Path):
        size = (240, 320) if ON_GPU else (48, 64)
        self.root, self.base, self.clip = base / "VOC2012", base, clip
        train = synthetic.make_scenes(self.root, N_TRAIN, size, seed=1, split="train", prefix="tr")
        val = synthetic.make_scenes(self.root, N_VAL, size, seed=2, split="val", prefix="va")
        self.train_ids, self.val_ids = train, val
        self.train, self.val = base / "train.txt", base / "val.txt"
        self.train.write_text("\n".join(train) + "\n")
        self.val.write_text("\n".join(val) + "\n")
        self.dino = save_dino(random_dino(VIT_S_14 if ON_GPU else TINY_DINO, seed=2),
                              base / "dinov2_vits14_pretrain.pth")  # WeCLIP+'s default backbone, random
        self.images = base / "photos"
        self.images.mkdir()
        for i in val:
            shutil.copy(self.root / "JPEGImages" / f"{i}.jpg", self.images)

    def data(self, split: Path | None = None) -> list[str]:
        return ["--dataset", "voc", "--root", str(self.root), "--split", str(split or self.train)]


@pytest.fixture(scope="module")
def work(tmp_path_factory, clip_path) -> Work:
    return Work(tmp_path_factory.mktemp("stages"), clip_path)


def pngs(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.png")}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def run(main, argv: list[str]) -> None:
    assert main(argv) == 0, argv


@pytest.mark.parametrize("method,precision", [("clipes", "float16"), ("excel", "float32")])
def test_cams_stage(work, method, precision):
    from stages.cams import main

    out = work.base / f"cams_{method}"
    run(main, ["--method", method, *work.data(), "--clip", str(work.clip), "--out", str(out), "--device", DEVICE,
               "--workers", "2", "--batch-size", "4", "--no-progress", *PRECISION[method]])
    assert {p.stem for p in out.glob("*.npz")} == set(work.train_ids)
    assert manifest(out)["config"]["precision"] == precision  # the method's default on a GPU


@pytest.mark.parametrize("method", ["clipes", "excel"])
def test_pseudo_stage_with_the_torch_crf(work, method):
    from stages.pseudo import main

    out = work.base / f"pseudo_{method}"
    refine = ["--refine", "par"] if method == "excel" else ["--crf-backend", "torch"]
    run(main, [*work.data(), "--cams", str(work.base / f"cams_{method}"), "--out", str(out), "--device", DEVICE,
               *refine, "--no-progress"])
    assert pngs(out) == set(work.train_ids)


def test_cams_pseudo_with_the_torch_crf(work):
    from stages.cams import main

    out = work.base / "cams_pseudo"
    run(main, [*work.data(), "--clip", str(work.clip), "--pseudo-out", str(out), "--no-keep-cams",
               "--crf-backend", "torch", "--device", DEVICE, "--workers", "2", "--batch-size", "4", "--no-progress",
               *PRECISION["clipes"]])
    assert pngs(out) == set(work.train_ids)


TRAIN = {"weclip": ["--pseudo", "pseudo_clipes", "--clip", "CLIP"],
         "weclip-online": ["--clip", "CLIP", "--set", "online.switch_iter=2"],   # both label phases in 4 iterations
         "excel": ["--clip", "CLIP", "--set", "online.switch_iter=2", "--set", "online.segmentation_targets_from=3"],
         "deeplab": ["--pseudo", "pseudo_clipes", *TINY_RESNET],
         # the replacement of confident pixels (and the Dice and cross-branch losses) from the third iteration
         "weclip-plus": ["--clip", "CLIP", "--set", "model.dino=DINO", "--set", "online.replace_from=3"]}


@pytest.mark.parametrize("model", list(TRAIN))
def test_train(work, model):
    from stages.train import main

    extra = [str(work.base / a) if a.startswith("pseudo_") else str(work.clip) if a == "CLIP" else
             a.replace("DINO", str(work.dino)) for a in TRAIN[model]]
    out = work.base / "runs" / model
    run(main, ["--config", f"configs/{model}_voc.yaml", "--root", str(work.root), "--split", str(work.train),
               "--val-split", str(work.val), "--out", str(out),
               "--set", f"train.device={DEVICE}", *SHORT, *AMP, *extra])
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["iteration"] == 4
    last = (out / "log.csv").read_text().splitlines()[-1].split(",")
    header = (out / "log.csv").read_text().splitlines()[0].split(",")
    row = dict(zip(header, last))
    assert float(row["loss"]) == float(row["loss"])                                  # not NaN
    assert bool(row["peak_mem_mb"]) == ON_GPU                                       # it ran on the GPU


def test_predict(work):
    from stages.predict import main

    out = work.base / "predict"
    run(main, ["--checkpoint", str(work.base / "runs" / "weclip"), "--images", str(work.images), "--out", str(out),
               "--device", DEVICE, "--no-progress"])
    assert pngs(out) == set(work.val_ids)


@pytest.mark.parametrize("model", list(TRAIN))
def test_eval_model_with_the_crf(work, model):
    from stages.evaluate_model import main

    out = work.base / "eval" / model
    run(main, ["--checkpoint", str(work.base / "runs" / model), *work.data(work.val), "--out", str(out), "--crf",
               "--device", DEVICE, "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == N_VAL
