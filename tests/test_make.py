"""Every `make` command the README documents, run as written on synthetic VOC/COCO-layout data with a
tiny random CLIP and schedules of a few iterations: exit codes and where the outputs land.

Drift-proof: ``test_every_readme_command_has_an_entry`` reads every ``make ...`` line of the README's
code blocks and fails when one has no entry in COMMANDS (or an entry is no longer documented), so a
new README command must come with its test. Paths with spaces are used throughout (the Makefile
quotes its variables). The README's variable values are mapped onto the synthetic data by
``localize``; an entry's ``extra`` variables add what a real dataset would not need (the id lists of
the synthetic splits, short schedules through ARGS).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from pipeline.data import synthetic
from pipeline.classes import builtin

N_TRAIN, N_VAL = 6, 3
SIZE = (48, 64)  # 3x4 patches
# A few iterations on tiny crops; validation and checkpoint at the end; single-scale inference at image size.
SHORT = ("--set schedule.iters=2 --set schedule.warmup_iters=1 --set train.batch_size=2 --set data.crop=32 "
         "--set data.workers=0 --set train.val_every=2 --set train.ckpt_every=2 --set train.log_every=1 "
         "--set infer.long_side=null --set val.long_side=null --no-progress --no-tensorboard")
TINY_RESNET = "--set model.layers=[1,1,1,1] --set model.base_width=8 --set infer.window=null --set val.window=null"


@dataclass
class Run:
    """Run the documented command with ``extra`` variables added; ``check(ctx, proc)`` asserts outputs."""

    check: Callable
    extra: dict = field(default_factory=dict)
    rc: int = 0


@dataclass
class Skip:
    reason: str


# ---------------------------------------------------------------------------------- the checks
def _files(folder: Path, pattern: str) -> set[str]:
    return {p.stem for p in folder.glob(pattern)}


def check_demo(random: bool):
    def check(ctx, proc):
        tag = "-random" if random else ""
        demo = ctx.work / "outputs" / "demo"
        assert _files(demo / f"cams{tag}", "*.npz") and _files(demo / f"pseudo{tag}", "*.png")
        page = (demo / f"viz{tag}" / "index.html").read_text()
        assert ("RANDOM WEIGHTS" in page) == random
    return check


def check_cams(ctx, proc):
    cams = ctx.work / "outputs" / "voc" / "cams"
    assert _files(cams, "*.npz") == set(ctx.train_ids)
    assert json.loads((cams / "manifest.json").read_text())["status"] == "complete"


def check_pseudo(ctx, proc):
    assert _files(ctx.work / "outputs" / "voc" / "pseudo", "*.png") == set(ctx.train_ids)


def check_eval(what):
    def check(ctx, proc):
        folder = ctx.work / "outputs" / "voc" / "eval" / f"{what}_train"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["images"] == N_TRAIN and (folder / "per_class.csv").is_file()
        assert f"tables: outputs/voc/eval/{what}_train/per_class" in proc.stdout
    return check


def check_attributes(ctx, proc):
    bank = ctx.work / "outputs" / "voc" / "attributes.npz"
    with np.load(bank, allow_pickle=False) as z:
        assert z["membership"].shape == (20, 112) and z["centres"].shape[0] == 112  # 20 classes, 112 attributes


def check_cams_excel(ctx, proc):
    cams = ctx.work / "outputs" / "voc" / "cams_excel"
    assert _files(cams, "*.npz") == set(ctx.train_ids)
    assert json.loads((cams / "manifest.json").read_text())["config"]["method"] == "excel"


def check_pseudo_excel(ctx, proc):
    pseudo = ctx.work / "outputs" / "voc" / "pseudo_excel"
    assert _files(pseudo, "*.png") == set(ctx.train_ids)
    assert json.loads((pseudo / "manifest.json").read_text())["config"]["refine"] == "par"
    assert all(255 not in np.array(Image.open(p)) for p in pseudo.glob("*.png"))  # PAR labels have no ignore


def check_viz(ctx, proc):
    viz = ctx.work / "outputs" / "voc" / "viz"
    assert _files(viz, "*.png") == set(ctx.train_ids) and (viz / "index.html").is_file()


def check_prompts(ctx, proc):
    prompts = ctx.work / "outputs" / "voc" / "prompts"
    header = (prompts / "ranking.csv").read_text().splitlines()[0].split(",")
    assert header == ["rank", "template", "sharpness", "init_cam_miou_pct"]
    assert (prompts / "ranking.md").is_file() and (prompts / "sharpness.png").is_file()


def check_cams_best(ctx, proc):
    out = ctx.work / "outputs" / "voc" / "cams best"
    top = (ctx.work / "outputs" / "voc" / "prompts" / "ranking.csv").read_text().splitlines()[1].split(",")[1]
    assert json.loads((out / "manifest.json").read_text())["config"]["cam"]["template"] == top.strip('"')
    assert _files(out, "*.npz") == set(ctx.train_ids)


def check_cams_pseudo(ctx, proc):
    pseudo = ctx.work / "outputs" / "coco" / "pseudo"
    assert _files(pseudo, "*.png") == set(ctx.coco_ids)
    assert not (ctx.work / "outputs" / "coco" / "cams").exists()
    assert proc.stdout.rstrip().endswith("-> outputs/coco/pseudo")  # names the folder it wrote


def check_train(config, resumed_empty=False):
    def check(ctx, proc):
        run = ctx.work / "outputs" / "voc" / "train" / config
        assert json.loads((run / "checkpoints" / "latest.json").read_text())["iteration"] == 2
        assert f"data: {N_TRAIN} training images" in proc.stdout  # SPLIT reached the trainer
        assert f"{N_VAL} validation images" in proc.stdout  # and VAL_SPLIT
        res = json.loads(proc.stdout[proc.stdout.index("{\n"):])
        assert 0 <= res["val_miou_pct"] <= 100 and res["out"] == f"outputs/voc/train/{config}"
        assert "val_miou_pct" in (run / "log.csv").read_text().splitlines()[0].split(",")
        if resumed_empty:
            assert "holds no checkpoint yet" in proc.stdout
    return check


def check_eval_run(folder):
    def check(ctx, proc):
        summary = json.loads((ctx.work / "outputs" / "voc" / "eval" / folder / "summary.json").read_text())
        assert summary["images"] == N_VAL
    return check


def check_predict(ctx, proc):
    out = ctx.work / "outputs" / "images" / "predict" / "weclip_voc-iter_0000002" / ctx.images.name
    assert _files(out, "*.png") == set(ctx.val_ids) and _files(out / "overlay", "*.jpg") == set(ctx.val_ids)


def check_eval_model(ctx, proc):
    folder = ctx.work / "outputs" / "voc" / "eval" / "model_weclip_voc-iter_0000002_val"
    assert json.loads((folder / "summary.json").read_text())["images"] == N_VAL


def check_export(ctx, proc):
    out = ctx.work / "outputs" / "voc" / "mmseg"
    assert (out / "train.txt").read_text().split() == ctx.train_ids
    assert (out / "val.txt").read_text().split() == ctx.val_ids


def check_no_gpu(ctx, proc):
    assert "gpu-check: no CUDA device on this machine" in proc.stdout and "nothing to check" in proc.stdout


# README command (as written, comment dropped, spaces collapsed) -> how the test runs it.
COMMANDS: dict[str, Run | Skip] = {
    "make setup": Skip("creates .venv and installs packages from the network"),
    "make test": Skip("runs this very suite"),
    "make gpu-check": Run(check_no_gpu) if not torch.cuda.is_available() else Skip("the GPU checks themselves (minutes)"),
    "make demo": Run(check_demo(random=True)),
    "make demo CLIP=~/models/ViT-B-16.pt": Run(check_demo(random=False)),
    "make cams DATASET=voc ROOT=~/data/VOC2012 SPLIT=train_aug CLIP=~/models/ViT-B-16.pt": Run(check_cams),
    "make pseudo DATASET=voc ROOT=~/data/VOC2012 SPLIT=train_aug": Run(check_pseudo),
    "make eval DATASET=voc ROOT=~/data/VOC2012 SPLIT=train WHAT=cams": Run(check_eval("cams")),
    "make eval DATASET=voc ROOT=~/data/VOC2012 SPLIT=train WHAT=pseudo": Run(check_eval("pseudo")),
    "make viz DATASET=voc ROOT=~/data/VOC2012 SPLIT=train": Run(check_viz),
    "make prompts DATASET=voc ROOT=~/data/VOC2012 SPLIT=train CLIP=~/models/ViT-B-16.pt": Run(check_prompts),
    # "..." stands for the cams command above; a second template needs its own folder (manifest rule)
    "make cams ... PROMPT=best": Run(check_cams_best, {"DATASET": "voc", "ROOT": "~/data/VOC2012", "SPLIT": "train_aug",
                                                       "CLIP": "~/models/ViT-B-16.pt", "OUT": "outputs/voc/cams best"}),
    "make cams-pseudo DATASET=coco ROOT=~/data/coco CLIP=...": Run(check_cams_pseudo, {"SPLIT": "train", "JOBS": "2"}),
    "make attributes DATASET=voc CLIP=~/models/ViT-B-16.pt": Run(check_attributes),
    "make cams METHOD=excel DATASET=voc ROOT=~/data/VOC2012 SPLIT=train CLIP=~/models/ViT-B-16.pt": Run(check_cams_excel),
    "make pseudo METHOD=excel DATASET=voc ROOT=~/data/VOC2012 SPLIT=train": Run(check_pseudo_excel),
    "make eval METHOD=excel WHAT=pseudo DATASET=voc ROOT=~/data/VOC2012 SPLIT=train": Run(check_eval("pseudo_excel")),
    "make train MODEL=weclip DATASET=voc ROOT=~/data/VOC2012 LABELS=outputs/voc/pseudo CLIP=~/models/ViT-B-16.pt":
        Run(check_train("weclip_voc", resumed_empty=True),
            {"SPLIT": "train_aug", "VAL_SPLIT": "val", "ARGS": f"{SHORT} --resume"}),
    "make train MODEL=deeplab DATASET=voc ROOT=~/data/VOC2012 LABELS=outputs/voc/pseudo INIT=~/models/deeplabv1_resnet101-coco.pth":
        Run(check_train("deeplab_voc"), {"SPLIT": "train_aug", "VAL_SPLIT": "val", "ARGS": f"{SHORT} {TINY_RESNET}"}),
    "make predict CKPT=outputs/voc/train/weclip_voc IMAGES=some/folder": Run(check_predict),
    "make train MODEL=weclip-online DATASET=voc ROOT=~/data/VOC2012 SPLIT=train_aug CLIP=~/models/ViT-B-16.pt":
        Run(check_train("weclip-online_voc"), {"VAL_SPLIT": "val", "ARGS": SHORT}),
    'make eval WHAT=model CKPT=outputs/voc/train/weclip-online_voc ROOT=~/data/VOC2012 SPLIT=val ARGS="--crf"':
        Run(check_eval_run("model_weclip-online_voc-iter_0000002_val_crf")),
    "make train MODEL=excel DATASET=voc ROOT=~/data/VOC2012 SPLIT=train_aug CLIP=~/models/ViT-B-16.pt":
        Run(check_train("excel_voc"), {"VAL_SPLIT": "val", "ARGS": f"{SHORT} --set online.tse=false"}),
    'make eval WHAT=model CKPT=outputs/voc/train/excel_voc ROOT=~/data/VOC2012 SPLIT=val ARGS="--crf"':
        Run(check_eval_run("model_excel_voc-iter_0000002_val_crf")),
    'make eval WHAT=model CKPT=outputs/voc/train/excel_voc ROOT=~/data/VOC2012 SPLIT=val ARGS="--preset excel"':
        Run(check_eval_run("model_excel_voc-iter_0000002_val_preset-excel")),
    "make train MODEL=weclip-plus DATASET=voc ROOT=~/data/VOC2012 SPLIT=train_aug CLIP=~/models/ViT-B-16.pt "
    "DINO=~/models/dinov2_vits14_pretrain.pth":
        Run(check_train("weclip-plus_voc"), {"VAL_SPLIT": "val", "ARGS": f"{SHORT} --set model.width=64 --set model.heads=2"}),
    'make eval WHAT=model CKPT=outputs/voc/train/weclip-plus_voc ROOT=~/data/VOC2012 SPLIT=val ARGS="--crf"':
        Run(check_eval_run("model_weclip-plus_voc-iter_0000002_val_crf")),
    "make eval WHAT=model CKPT=outputs/voc/train/weclip_voc ROOT=~/data/VOC2012 SPLIT=val": Run(check_eval_model),
    "make export-mmseg DATASET=voc ROOT=~/data/VOC2012": Run(check_export, {"SPLIT": "train_aug", "VAL_SPLIT": "val"}),
    "make bench": Skip("speed figures at real model sizes take minutes; benchmarks are not correctness checks"),
}


def readme_commands() -> list[str]:
    """Every `make ...` line inside the README's code blocks, comment dropped, spaces collapsed."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("make ") or line == "make":
                found.append(" ".join(line.split()))
    return found


def test_every_readme_command_has_an_entry():
    documented = readme_commands()
    assert documented, "no make commands found in the README's code blocks"
    missing = [c for c in documented if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in documented]
    assert not missing, f"README commands without an entry in tests/test_make.py COMMANDS: {missing}"
    assert not stale, f"COMMANDS entries no longer in the README: {stale}"


# ------------------------------------------------------------------------------- the shared data
@dataclass
class Ctx:
    work: Path          # the folder make runs in (outputs/ lands here)
    voc: Path
    coco: Path
    lists: Path
    clip: Path
    dino: Path
    resnet: Path
    images: Path
    train_ids: list
    val_ids: list
    coco_ids: list


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_clip_path) -> Ctx:
    base = tmp_path_factory.mktemp("make") / "a dir with spaces"
    voc, coco, lists = base / "VOC 2012", base / "coco data", base / "id lists"
    train_ids = synthetic.make_scenes(voc, N_TRAIN, SIZE, seed=1, split="train", prefix="tr")
    val_ids = synthetic.make_scenes(voc, N_VAL, SIZE, seed=2, split="val", prefix="va")
    coco_ids = synthetic.make_scenes(coco, 3, SIZE, seed=3, classes=builtin("coco"), prefix="co")
    lists.mkdir()
    for name, ids in (("train_aug", train_ids), ("train", train_ids), ("val", val_ids), ("coco_train", coco_ids)):
        (lists / f"{name}.txt").write_text("\n".join(ids) + "\n")
    images = base / "my photos"
    images.mkdir()
    for i in val_ids:
        shutil.copy(voc / "JPEGImages" / f"{i}.jpg", images)
    clip = base / "models dir" / "ViT-B-16.pt"
    clip.parent.mkdir()
    shutil.copy(tiny_clip_path, clip)
    resnet = base / "models dir" / "deeplabv1_resnet101-coco.pth"
    import torch

    from pipeline.dino.random import TINY as TINY_DINO, random_dino, save_dino

    dino = save_dino(random_dino(TINY_DINO, seed=4), base / "models dir" / "dinov2_vits14_pretrain.pth")

    from pipeline.models import DeepLab

    # deeplab-pytorch's key layout, as its converted init files
    torch.save(DeepLab(21, "v2", (1, 1, 1, 1), 8, layout="caffe").backbone.state_dict(), resnet)
    work = base / "work dir"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    return Ctx(work, voc, coco, lists, clip, dino, resnet, images, train_ids, val_ids, coco_ids)


def localize(ctx: Ctx, var: str, value: str, dataset: str) -> str:
    """A README variable value -> the synthetic stand-in."""
    if var == "ROOT":
        return str(ctx.coco if dataset == "coco" else ctx.voc)
    if var == "CLIP":
        return str(ctx.clip)
    if var == "DINO":
        return str(ctx.dino)
    if var == "INIT":
        return str(ctx.resnet)
    if var == "IMAGES":
        return str(ctx.images)
    if var == "SPLIT":
        return str(ctx.lists / f"{'coco_' if dataset == 'coco' else ''}{value}.txt")
    if var == "VAL_SPLIT":
        return str(ctx.lists / f"{value}.txt")
    return value


def make(ctx: Ctx, target: str, variables: dict[str, str]) -> subprocess.CompletedProcess:
    args = ["make", "-f", str(ROOT / "Makefile"), *([target] if target else []), f"PY={sys.executable}"]
    args += [f"{k}={v}" for k, v in variables.items()]
    # run as a user's top-level make, also when the suite itself runs under `make test` (CI): no inherited
    # MAKELEVEL/MAKEFLAGS, which would add "Entering directory" lines and the parent's flags
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ctx.work, env=env, capture_output=True, text=True, timeout=600)


def run_documented(ctx: Ctx, command: str, spec: Run) -> subprocess.CompletedProcess:
    words = shlex.split(command)[1:]
    target = words[0]
    variables = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    variables.update(spec.extra)
    dataset = variables.get("DATASET", "voc")
    variables = {k: localize(ctx, k, v, dataset) for k, v in variables.items()}
    if "ARGS" not in variables and target in ("cams", "cams-pseudo", "pseudo", "eval", "viz", "prompts"):
        variables["ARGS"] = {"cams": "--no-progress --workers 0", "cams-pseudo": "--no-progress --workers 0",
                             "prompts": "--top 2"}.get(target, "--no-progress")
    return make(ctx, target, variables)


@pytest.mark.parametrize("command", list(COMMANDS), ids=lambda c: c[:60])
def test_readme_command(ctx, command):
    """The README's commands in README order (later ones use earlier outputs, as a user's would)."""
    spec = COMMANDS[command]
    if isinstance(spec, Skip):
        pytest.skip(spec.reason)
    proc = run_documented(ctx, command, spec)
    assert proc.returncode == spec.rc, f"{command}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    spec.check(ctx, proc)


# ----------------------------------------------------------------------- beyond the README lines
def test_make_alone_shows_help(ctx):
    proc = make(ctx, "", {})
    assert proc.returncode == 0 and "make cams" in proc.stdout and not (ctx.work / ".venv").exists()
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert all(f"make {t}" in proc.stdout for t in phony if t != "help")


def test_outputs_of_other_settings_never_mix(ctx):
    """Predictions and eval tables refuse a folder made with other settings (run after the README chain)."""
    if not (ctx.work / "outputs" / "voc" / "train" / "weclip_voc" / "checkpoints").is_dir():
        pytest.skip("needs the README chain above")
    proc = make(ctx, "predict", {"CKPT": "outputs/voc/train/weclip_voc", "IMAGES": str(ctx.images),
                                 "ARGS": "--scales 1.0 --no-progress"})
    assert proc.returncode == 2 and "different configuration" in proc.stderr and "infer.scales" in proc.stderr
    proc = make(ctx, "eval", {"WHAT": "cams", "ROOT": str(ctx.voc), "SPLIT": str(ctx.lists / "train.txt"),
                              "ARGS": "--bg const --no-progress"})
    assert proc.returncode == 2 and "different configuration" in proc.stderr and "bg" in proc.stderr


# Which header variables each target must pass on (checked on `make -n`, so it costs nothing).
REACH = {
    "cams": ["ROOT", "SPLIT", "CLIP", "OUT", "PROMPT", "ARGS", "NPROC"],
    "cams-pseudo": ["ROOT", "SPLIT", "CLIP", "OUT", "PROMPT", "JOBS", "ARGS"],
    "prompts": ["ROOT", "SPLIT", "CLIP", "OUT", "ARGS"],
    "pseudo": ["ROOT", "SPLIT", "CAMS", "OUT", "JOBS", "ARGS"],
    "eval": ["ROOT", "SPLIT", "CAMS", "LABELS", "OUT", "JOBS", "ARGS"],
    "viz": ["ROOT", "SPLIT", "CAMS", "LABELS", "OUT", "JOBS", "ARGS"],
    "train": ["ROOT", "SPLIT", "VAL_SPLIT", "LABELS", "CLIP", "INIT", "CONFIG", "OUT", "NPROC", "ARGS"],
    "predict": ["CKPT", "IMAGES", "CLIP", "OUT", "ARGS"],
    "export-mmseg": ["ROOT", "SPLIT", "VAL_SPLIT", "LABELS", "OUT", "ARGS"],
    "demo": ["CLIP", "OUT", "ARGS"],
}


@pytest.mark.parametrize("target", list(REACH))
def test_header_variables_reach_their_targets(target):
    values = {v: f"/some where/{v.lower()} it's" for v in REACH[target]}
    values.update({k: v for k, v in {"NPROC": "3", "JOBS": "5", "ARGS": "--an-extra-flag"}.items() if k in values})
    proc = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), target,
                           *[f"{k}={v}" for k, v in values.items()]], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    shell = proc.stdout.replace("\\\n", " ")
    words = shlex.split(" ".join(line for line in shell.splitlines() if " -m " in line))
    for var, value in values.items():  # each value arrives as one word: the shell did not split it
        assert var == "NPROC" or any(w == value or w.endswith(f"={value}") for w in words), (var, words)
    if "NPROC" in values:
        assert "--nproc_per_node 3" in shell
