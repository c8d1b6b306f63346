"""Resume: typed config values, inputs compared by content (the CLIP file, the pseudo-label folder), a run
killed between a checkpoint and its pointer; inference refusing another CLIP than the run's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import checkpoint as ckpt_io
from pipeline.clip.random import TINY, random_clip, save_clip
from pipeline.data.labelio import read_label, write_label
from pipeline.train.config import ConfigError, load_config
from pipeline.train.loop import train
from seg_helpers import make_data, overrides

QUIET = {"progress": False, "tensorboard": False, "log": lambda *_: None}
TINY_DEEPLAB = {"model.name": "deeplabv2", "model.layers": "[1,1,1,1]", "model.base_width": 8, "data.crop": 32,
                "train.batch_size": 2, "schedule.iters": 4, "schedule.warmup_iters": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("resume"), 4, 0, size=(48, 64), seed=2)


def deeplab(data, **extra):
    return load_config(None, overrides(data, **{**TINY_DEEPLAB, **extra}))


def test_resume_with_the_same_lr_written_another_way(data, tmp_path):
    train(deeplab(data, **{"optim.lr": "1e-3"}), tmp_path, stop_at=1, **QUIET)
    res = train(deeplab(data, **{"optim.lr": "0.001"}), tmp_path, resume=True, **QUIET)
    assert res["iteration"] == 4 and ckpt_io.load(tmp_path)["meta"]["config"]["optim"]["lr"] == 0.001


def _labels_copy(data, to: Path, manifest: dict | None = None) -> Path:
    shutil.copytree(data["pseudo"], to)
    if manifest is not None:
        (to / "manifest.json").write_text(json.dumps({"config": manifest, "status": "complete"}))
    return to


@pytest.mark.parametrize("with_manifest", [True, False])
def test_resume_compares_the_pseudo_labels_by_content(data, tmp_path, with_manifest):
    made = {"stage": "pseudo", "cams_config": {"cam": {"threshold": 0.4}}} if with_manifest else None
    first = _labels_copy(data, tmp_path / "labels", made)
    run = tmp_path / "run"
    train(deeplab(data, **{"data.pseudo": first}), run, stop_at=1, **QUIET)
    assert json.loads((run / "config.json").read_text())["inputs"]["pseudo"] is not None
    moved = tmp_path / "moved"
    first.rename(moved)   # same labels elsewhere: the run goes on
    assert train(deeplab(data, **{"data.pseudo": moved}), run, resume=True, stop_at=2, **QUIET)["iteration"] == 2
    other = _labels_copy(data, tmp_path / "other", {**made, "cams_config": {"cam": {"threshold": 0.5}}}
                         if with_manifest else None)
    if not with_manifest:   # one pixel of one label file changed
        victim = other / f"{data['train_ids'][0]}.png"
        lab = read_label(victim)
        lab[0, 0] = (lab[0, 0] + 1) % 5
        write_label(victim, lab)
    match = r"differs in: cams_config\.cam\.threshold" if with_manifest else "other label files than the run's"
    with pytest.raises(ConfigError, match=rf"cannot resume with other inputs: data\.pseudo {other} .*{match}"):
        train(deeplab(data, **{"data.pseudo": other}), run, resume=True, **QUIET)
    assert ckpt_io.load(run)["iteration"] == 2


def test_resume_and_inference_compare_the_clip_by_content(data, tmp_path):
    from pipeline.eval.infer import load_model
    from stages.predict import main as predict_main

    clip, same, other = tmp_path / "clip.pt", tmp_path / "elsewhere" / "clip.pt", tmp_path / "other.pt"
    save_clip(random_clip(TINY, seed=3), clip)
    save_clip(random_clip(TINY, seed=4), other)
    same.parent.mkdir()
    shutil.copy(clip, same)
    weclip = {"model.name": "weclip", "data.crop": 32, "train.batch_size": 2, "schedule.iters": 3}
    run = tmp_path / "run"
    train(load_config(None, overrides(data, **weclip, **{"model.clip": clip})), run, stop_at=1, **QUIET)
    train(load_config(None, overrides(data, **weclip, **{"model.clip": same})), run, resume=True, stop_at=2, **QUIET)
    with pytest.raises(ConfigError, match=rf"model\.clip {other} is not the CLIP the run started with"):
        train(load_config(None, overrides(data, **weclip, **{"model.clip": other})), run, resume=True, **QUIET)

    load_model(run, clip=same, log=lambda *_: None)
    with pytest.raises(ckpt_io.CheckpointMismatch, match=rf"{other}: not the CLIP that .* was trained with"):
        load_model(run, clip=other, log=lambda *_: None)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photos / "a.png")
    args = ["--checkpoint", str(run), "--images", str(photos), "--out", str(tmp_path / "pred"), "--no-progress",
            "--device", "cpu"]
    assert predict_main(args + ["--clip", str(other)]) == 2
    assert not (tmp_path / "pred" / "a.png").exists()
    # a checkpoint saved before the CLIP's sha256 was recorded loads with any CLIP of the right shape
    path = ckpt_io.resolve(run)
    ck = torch.load(path, weights_only=True)
    del ck["meta"]["inputs"]
    torch.save(ck, path)
    load_model(run, clip=other, log=lambda *_: None)


KILL = """
import os, signal, sys
from pipeline import checkpoint as ckpt_io
from pipeline.train.config import load_config
from pipeline.train.loop import train

write_latest = ckpt_io.write_latest
def killed_before_the_pointer(folder, file, iteration):
    if iteration == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    write_latest(folder, file, iteration)
ckpt_io.write_latest = killed_before_the_pointer
train(load_config(None, sys.argv[4:]), sys.argv[1], resume=sys.argv[2] == "resume", progress=False, tensorboard=False)
"""


def test_sigkill_between_a_checkpoint_and_its_pointer(data, tmp_path):
    """The checkpoint of iteration 3 is whole, its pointer never written; a temp file of an interrupted
    write lies next to it. --resume continues from iteration 3, and the temp file is gone."""
    run = tmp_path / "run"
    sets = overrides(data, **{**TINY_DEEPLAB, "train.ckpt_every": 1, "schedule.iters": 5})
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL, str(run), "new", "3", *sets], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckdir = run / "checkpoints"
    assert json.loads((ckdir / "latest.json").read_text())["iteration"] == 2 and (ckdir / "iter_0000003.pt").is_file()
    (ckdir / ".iter_0000004.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")   # as a write killed midway leaves it
    with pytest.raises(ConfigError, match="already holds a run"):
        train(load_config(None, sets), run, **QUIET)
    assert ckpt_io.resolve(run).name == "iter_0000003.pt"
    starts = []
    train(load_config(None, sets), run, resume=True, **{**QUIET, "log": starts.append})
    assert any("at iteration 3" in line for line in starts)
    assert ckpt_io.load(run)["iteration"] == 5 and not list(run.rglob("*.tmp"))
