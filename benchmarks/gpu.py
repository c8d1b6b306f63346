"""The GPU rows of the benchmarks: every speed figure the GPU must reach, with its floor, in one table.

    python -m benchmarks.gpu                     # on a CUDA machine (make gpu-check runs it after the GPU tests)
    python -m benchmarks.gpu --quick --device cpu   # tiny sizes: a check of this code, figures meaningless

Random CLIP of the true ViT-B/16 shapes, synthetic VOC-layout scenes of 375x500 (32 drawn, copied to make
larger splits), 3 labels per image where labels are given. One row per figure:
  - CAM engines (CLIP-ES fp16, ExCEL fp16), batch 64 at 512x384, as a share of a plain no-grad encoder
    forward of the same batch (floor 50 %)
  - `make cams` end to end, both methods, 12 decoding workers, batch 64, the method's default precision
    (stage rate: decoding, CAMs, writing; model loading excluded) (floor 600 img/s)
  - torch dense CRF, fp32, batch 8, at each label count 2-21 (floor 300 img/s)
  - `make pseudo` with the torch CRF on the GPU, on CAMs made from the scenes' ground truth, and
    `make cams-pseudo` (floor 200 img/s each)
  - training, batch 4, crop 320, bf16: offline WeCLIP (the reference point), online WeCLIP (floor 30 it/s),
    ExCEL in its second phase (floor 20 it/s) (``benchmarks.train``)
  - `make eval WHAT=model` with `--crf`: a WeCLIP model with its inference settings (long side 512, scales
    1 and 0.75, flip) and WeCLIP's CRF (floor 60 img/s)
Peak memory: ``torch.cuda.max_memory_allocated`` during the row. A row that fails says why in the table
and the others still run.
"""
from __future__ import annotations

import argparse
import faulthandler
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
LABELS = [[14, 8, 11], [2, 6, 14], [7, 11, 17], [0, 5, 6], [9, 12, 16], [3, 10, 18]]
# a section still running after this long is hung (each should take under a minute on an H200): its stacks
# are printed and the process ends, so a hang cannot eat a GPU session's device time
SECTION_LIMIT_S = 200
COLUMNS = ["what", "measured", "unit", "floor", "meets", "reference_point", "peak_gib", "note"]


@dataclass(frozen=True)
class Sizes:
    arch: str                      # pipeline.clip.random architecture
    engine_batch: int
    engine_input: tuple[int, int]  # (H', W') fed to the engines
    scene: tuple[int, int]         # synthetic scenes (H, W)
    distinct: int                  # scenes drawn; splits copy them
    stage_images: int
    pseudo_images: int
    crf_batch: int
    crf_labels: tuple[int, ...]
    train_iters: int
    train_warmup: int
    eval_images: int
    workers: int
    repeat: int


FULL = Sizes("VIT_B_16", 64, (384, 512), (375, 500), 32, 512, 96, 8, tuple(range(2, 22)), 20, 3, 48,
             min(12, os.cpu_count() or 1), 3)
QUICK = Sizes("TINY", 2, (64, 80), (48, 64), 4, 6, 4, 2, (2, 21), 1, 0, 3, 0, 1)


@dataclass
class Setup:
    device: torch.device
    sizes: Sizes
    clip: Path
    work: Path
    quick: bool


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


# ------------------------------------------------------------------------------------------- data
def make_split(s: Setup, name: str, n: int) -> Path:
    """A VOC-layout folder under ``s.work/VOC`` with ``n`` ids (copies of ``distinct`` drawn scenes) and
    its id list ``<work>/<name>.txt``."""
    from pipeline.data import synthetic

    root = s.work / "VOC"
    if not (root / "JPEGImages").is_dir():
        synthetic.make_scenes(root, s.sizes.distinct, s.sizes.scene, seed=0, prefix="scene")
    ids = []
    for i in range(n):
        src, image_id = f"scene_{i % s.sizes.distinct:05d}", f"{name}_{i:05d}"
        for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png"), ("Annotations", "xml")):
            dst = root / sub / f"{image_id}.{ext}"
            if not dst.exists():
                shutil.copyfile(root / sub / f"{src}.{ext}", dst)
        ids.append(image_id)
    lst = s.work / f"{name}.txt"
    lst.write_text("\n".join(ids) + "\n")
    return lst


def load(s: Setup, dtype: torch.dtype = torch.float32):
    from pipeline.clip.model import load_clip

    return load_clip(s.clip, s.device, dtype)


# ------------------------------------------------------------------------------------------- rows
def engine_rows(s: Setup) -> list[dict]:
    """Both CAM engines in fp16 against a plain forward of the same batch."""
    from pipeline.cams.excel import ExcelConfig, ExcelEngine
    from pipeline.cams.gradcam import CAMEngine
    from pipeline.classes import builtin

    voc, z = builtin("voc"), s.sizes
    dtype = torch.float16
    model = load(s, dtype)
    x = torch.randn(z.engine_batch, 3, *z.engine_input, device=s.device, dtype=dtype)
    labels = [LABELS[i % len(LABELS)] for i in range(z.engine_batch)]
    with torch.no_grad():
        forward = timed(lambda: model.visual(x), s.device, z.repeat)
    rows = []
    for name, engine in (("CLIP-ES", CAMEngine(model, voc)), ("ExCEL", ExcelEngine(model, voc, ExcelConfig(tse=False)))):
        row = {"what": f"{name} CAM engine, fp16, batch {z.engine_batch}", "unit": "x forward", "floor": 0.5}
        try:
            with peak(s.device, row):
                per = timed(lambda: engine(x, labels), s.device, z.repeat)
            row.update(measured=forward / per, reference_point=f"forward {z.engine_batch / forward:.0f} img/s",
                       note=f"{z.engine_batch / per:.1f} img/s")
        except Exception as e:  # noqa: BLE001 - a failed row is reported in the table
            row.update(note=failure(e))
        rows.append(row)
    return rows


def cams_stage_rows(s: Setup) -> list[dict]:
    """``run_cams`` (what make cams runs) over a split of ``stage_images``."""
    from pipeline.cams.stage import CamsConfig, run_cams

    z = s.sizes
    split = make_split(s, "stage", z.stage_images)
    rows = []
    for method in ("clipes", "excel"):
        row = {"what": f"make cams METHOD={method}, {z.workers} workers, batch {z.engine_batch}", "unit": "img/s",
               "floor": 600.0}

        def go():
            summary = run_cams(CamsConfig(
                dataset="voc", root=str(s.work / "VOC"), split=str(split), clip=str(s.clip),
                out=str(s.work / f"cams_{method}"), method=method, device=str(s.device), batch_size=z.engine_batch,
                workers=z.workers, overwrite=True, progress=False,
                cam_options={"tse": False} if method == "excel" else {}))
            assert summary.failed == 0, summary.errors
            row.update(measured=summary.written / summary.seconds, note=f"{summary.written} images")
        attempt(row, s.device, go)
        rows.append(row)
    return rows


def crf_rows(s: Setup) -> list[dict]:
    """The torch dense CRF on batches of ``crf_batch`` scenes at each label count."""
    from pipeline.data import synthetic
    from pipeline.data.camfile import upsample_cams
    from pipeline.labels import crf
    from pipeline.labels.crf import torch_backend

    z = s.sizes
    rng = np.random.default_rng(0)
    us, gs = [], []
    for _ in range(z.crf_batch):  # the most labels; fewer labels use the first rows
        img, _, cams = synthetic.scene_with_cams(rng, z.scene, max(z.crf_labels) - 1)
        us.append(crf.unary_energy(crf.background_probs(upsample_cams(cams, z.scene))).reshape(-1, *z.scene))
        gs.append(crf.wrapped_guide(img))
    u_all = torch.from_numpy(np.stack(us)).to(s.device)
    g = torch.from_numpy(np.stack(gs)).to(s.device)
    params = crf.CRFParams()
    rows = []
    for c in z.crf_labels:
        row = {"what": f"torch dense CRF, fp32, batch {z.crf_batch}, {c} labels", "unit": "img/s", "floor": 300.0}
        u = u_all[:, :c].contiguous()

        def go():
            row["measured"] = z.crf_batch / timed(lambda: torch_backend.dense_crf(u, g, params), s.device, z.repeat)
        attempt(row, s.device, go)
        rows.append(row)
    return rows


def pseudo_rows(s: Setup) -> list[dict]:
    """make pseudo with the torch CRF on the device, on CAMs made from the ground truth; make cams-pseudo."""
    from pipeline.cams.stage import CamsConfig, run_cams
    from pipeline.data import synthetic
    from pipeline.data.datasets import build_dataset
    from pipeline.labels.pseudo import PseudoConfig, run_pseudo

    z = s.sizes
    split = make_split(s, "pseudo", z.pseudo_images)
    ids = split.read_text().split()
    cams = s.work / "noisy_cams"
    synthetic.make_noisy_cams(s.work / "VOC", cams, ids, seed=0)
    torch_crf = PseudoConfig(backend="torch", device=str(s.device))
    row = {"what": "make pseudo, torch CRF", "unit": "img/s", "floor": 200.0}

    def pseudo():
        res = run_pseudo(build_dataset("voc", s.work / "VOC"), ids, cams, s.work / "pseudo", torch_crf,
                         n_jobs=1 if s.quick else None, overwrite=True, progress=False)
        assert res["failed"] == 0, res["errors"]
        row.update(measured=res["images_per_s"], note=f"{res['done']} images")
    attempt(row, s.device, pseudo)
    both = {"what": f"make cams-pseudo, torch CRF, batch {z.engine_batch}", "unit": "img/s", "floor": 200.0}

    def cams_pseudo():
        summary = run_cams(CamsConfig(
            dataset="voc", root=str(s.work / "VOC"), split=str(split), clip=str(s.clip), out=str(s.work / "unused"),
            device=str(s.device), batch_size=z.engine_batch, workers=z.workers, overwrite=True, progress=False,
            pseudo_out=str(s.work / "cams_pseudo"), pseudo=PseudoConfig(backend="torch"), keep_cams=False,
            pseudo_jobs=1 if s.quick else None))
        assert summary.failed == 0, summary.errors
        both.update(measured=summary.written / summary.seconds, note=f"{summary.written} images")
    attempt(both, s.device, cams_pseudo)
    return [row, both]


def training_rows(s: Setup) -> list[dict]:
    """``benchmarks.train``'s steps (random inputs, bf16 autocast) for the offline and online models."""
    from benchmarks.train import Rows, bench_one

    z = s.sizes
    floors = {"weclip": None, "weclip-online": 30.0, "excel": 20.0}
    rows, offline = [], None
    for name, floor in floors.items():
        row = {"what": f"training {name}", "unit": "it/s", "floor": floor}
        got = Rows()

        def go():
            bench_one(name, z.train_iters, z.train_warmup, str(s.device), "auto", got, quick=s.quick)
            r = got[0]
            row.update(what=f"training {name}, batch {r['batch']}, crop {r['crop']}, {r['amp']}",
                       measured=r["iters_per_s"], note=f"{r['trainable_params']:,} trainable")
        attempt(row, s.device, go)
        if name == "weclip":
            offline = row.get("measured")
        elif offline:
            row["reference_point"] = f"offline WeCLIP {offline:.1f} it/s"
        rows.append(row)
    return rows


def eval_rows(s: Setup) -> list[dict]:
    """make eval WHAT=model --crf: ``predict_split`` with WeCLIP's inference settings and its CRF."""
    from pipeline.classes import builtin
    from pipeline.data.datasets import build_dataset
    from pipeline.eval.infer import InferConfig, predict_split
    from pipeline.models import build_model
    from pipeline.train.config import load_config

    split = make_split(s, "eval", s.sizes.eval_images)
    row = {"what": "make eval WHAT=model --crf (WeCLIP)", "unit": "img/s", "floor": 60.0}

    def go():
        torch.manual_seed(0)
        model = build_model({"name": "weclip"}, builtin("voc").num_classes + 1, clip=load(s)).to(s.device).eval()
        cfg = InferConfig.from_dict({**load_config(ROOT / "configs" / "weclip_voc.yaml")["infer"], "crf": True},
                                    model="weclip").resolved(s.device)
        ds = build_dataset("voc", s.work / "VOC")
        res = predict_split(model, ds, ds.ids(str(split)), None, cfg, s.device, gt=True, progress=False)
        assert res["failed"] == 0, res["errors"]
        row.update(measured=res["images_per_s"], note=f"{res['done']} images, CRF backend {cfg.crf_backend}")
    attempt(row, s.device, go)
    return [row]


SECTIONS = {"engines": engine_rows, "cams": cams_stage_rows, "crf": crf_rows, "pseudo": pseudo_rows,
            "train": training_rows, "eval": eval_rows}


# ------------------------------------------------------------------------------------------ helpers
class peak:
    """Records the device's peak allocated memory (GiB) during the block into ``row['peak_gib']``."""

    def __init__(self, device: torch.device, row: dict):
        self.device, self.row = device, row

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.row["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return False


def failure(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1]
    return f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''} ({Path(where.filename).name}:{where.lineno})"


def attempt(row: dict, device: torch.device, fn: Callable[[], None]) -> None:
    """Run one measurement into ``row``; a failure becomes the row's note."""
    try:
        with peak(device, row):
            fn()
    except Exception as e:  # noqa: BLE001 - reported in the table, the other rows still run
        row["note"] = failure(e)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def verdicts(rows: list[dict]) -> list[dict]:
    for r in rows:
        m, f = r.get("measured"), r.get("floor")
        r["meets"] = "-" if m is None or f is None else ("yes" if m >= f else "NO")
    return rows


def write_clip(arch: str, path: Path) -> Path:
    from pipeline.clip import random as rnd

    return rnd.save_clip(rnd.random_clip(getattr(rnd, arch), seed=0), path)


def collect(device: torch.device, clip: Path | None, work: Path, quick: bool = False,
            sections: list[str] | None = None, log=print, deadline: float | None = None,
            stop: float | None = None) -> list[dict]:
    """All rows (or those of ``sections``); each section's time and figures go to ``log`` as it ends (what
    a stopped run still shows). A section running past ``SECTION_LIMIT_S``, or past ``stop``, ends the process
    with its stacks; none starts after ``deadline`` (``time.perf_counter()`` values): it gets a row saying so."""
    sizes = QUICK if quick else FULL
    clip = clip or write_clip(sizes.arch, work / "clip.pt")
    s = Setup(device, sizes, Path(clip), work, quick)
    rows = []
    for name in sections or list(SECTIONS):
        t = time.perf_counter()
        if deadline is not None and t > deadline:
            rows.append({"what": name, "note": "FAILED: not run, the time limit was reached"})
            log(f"  [{name}: not run, the time limit was reached]", flush=True)
            continue
        faulthandler.dump_traceback_later(max(1.0, min(SECTION_LIMIT_S, (stop or math.inf) - t)), exit=True)
        try:
            got = SECTIONS[name](s)
        except Exception as e:  # noqa: BLE001 - a section that cannot even set up
            got = [{"what": name, "note": failure(e)}]
        finally:
            faulthandler.cancel_dump_traceback_later()
        rows += got
        figures = "; ".join(f"{r['what']}: " + (f"{r['measured']:.4g} {r['unit']}" if r.get("measured") is not None
                                                 else r.get("note", "-")) for r in got)
        log(f"  [{name}: {time.perf_counter() - t:.0f} s] {figures}", flush=True)
    return verdicts(rows)


def format_rows(rows: list[dict]) -> str:
    from pipeline.eval.metrics import format_table

    def figure(v: float) -> str:  # 3 significant digits: the fp16 spreads are small numbers
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"

    shown = [{k: (figure(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return format_table(shown, COLUMNS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny CLIP, a few small images: checks the code only")
    p.add_argument("--clip", default=None, help="a random CLIP already written (default: write one)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here; nothing measured (on a CPU: --quick --device cpu checks the code)")
        return 0
    with tempfile.TemporaryDirectory() as d:
        rows = collect(device, a.clip, Path(d), a.quick, a.sections.split(","))
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
