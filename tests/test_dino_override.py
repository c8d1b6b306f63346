"""Inference from a WeCLIP+ checkpoint whose DINOv2 file has moved: ``--dino`` (make ``DINO=``) on
``stages.predict`` and ``stages.evaluate_model``, compared by content (sha256) with the file the run trained
with, as ``--clip`` is; refused for a model without a DINOv2 (and ``--clip`` for one without a CLIP); a missing
file named with the flag to pass."""
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from pipeline import checkpoint as ckpt_io
from pipeline.clip.random import TINY, random_clip, save_clip
from pipeline.dino.random import TINY as TINY_DINO, random_dino, save_dino
from pipeline.eval.infer import load_model
from pipeline.train.config import load_config
from pipeline.train.loop import train
from seg_helpers import make_data, overrides
from stages.evaluate_model import main as evaluate_main
from stages.predict import main as predict_main

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"progress": False, "tensorboard": False, "log": lambda *_: None}
TINY_PLUS = {"model.width": 32, "model.heads": 2, "model.depth": 1, "data.pseudo": None, "data.crop": 32,
             "train.batch_size": 2, "schedule.iters": 1, "schedule.warmup_iters": 0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A weclip-plus run trained with models/dino.pth, which then moved to moved/dino.pth (same content);
    other.pth, a DINOv2 of the same shape with other weights; a weclip-plus run without the DINO branch
    and a weclip run; a folder of one photo; the run's logits on it from before the move."""
    base = tmp_path_factory.mktemp("dino override")
    d = make_data(base / "data", 2, 1, size=(32, 48), seed=6)
    clip = save_clip(random_clip(TINY, seed=3), base / "models" / "clip.pt")
    trained_with = save_dino(random_dino(TINY_DINO, seed=4), base / "models" / "dino.pth")
    other = save_dino(random_dino(TINY_DINO, seed=5), base / "other.pth")
    plus = base / "plus"
    train(load_config("configs/weclip-plus_voc.yaml",
                      overrides(d, **TINY_PLUS, **{"model.clip": clip, "model.dino": trained_with})), plus, **QUIET)
    clip_only = base / "clip only"
    train(load_config("configs/weclip-plus_voc.yaml",
                      overrides(d, **TINY_PLUS, **{"model.clip": clip, "model.branches": "clip"})), clip_only, **QUIET)
    weclip = base / "weclip"
    train(load_config(None, overrides(d, **{"model.name": "weclip", "model.clip": clip, "data.crop": 32,
                                            "train.batch_size": 2, "schedule.iters": 1})), weclip, **QUIET)
    photos = base / "photos"
    photos.mkdir()
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8)
    Image.fromarray(image).save(photos / "a.png")
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests compare (``one_thread``): the sums' order depends on the threads
    try:
        with torch.no_grad():
            logits = load_model(plus, log=lambda *_: None)[0](x)
    finally:
        torch.set_num_threads(threads)
    moved = base / "moved" / "dino.pth"
    moved.parent.mkdir()
    shutil.move(trained_with, moved)
    return {"data": d, "plus": plus, "clip_only": clip_only, "weclip": weclip, "trained_with": trained_with,
            "moved": moved, "other": other, "photos": photos, "x": x, "logits": logits}


def predict(runs, run, out, *extra):
    return predict_main(["--checkpoint", str(runs[run]), "--images", str(runs["photos"]), "--out", str(out),
                         "--no-progress", "--device", "cpu", *map(str, extra)])


def evaluate(runs, run, out, *extra):
    d = runs["data"]
    return evaluate_main(["--checkpoint", str(runs[run]), "--dataset", "voc", "--root", str(d["root"]), "--classes",
                          str(d["classes"]), "--split", str(d["val"]), "--out", str(out), "--no-progress",
                          "--device", "cpu", *map(str, extra)])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_a_moved_dino_with_the_same_content_gives_the_same_model(runs, tmp_path):
    model, _ = load_model(runs["plus"], dino=runs["moved"], log=lambda *_: None)
    with torch.no_grad():
        torch.testing.assert_close(model(runs["x"]), runs["logits"], rtol=0, atol=0)
    assert predict(runs, "plus", tmp_path / "pred", "--dino", runs["moved"]) == 0
    assert (tmp_path / "pred" / "a.png").is_file()
    assert evaluate(runs, "plus", tmp_path / "eval", "--dino", runs["moved"]) == 0
    assert (tmp_path / "eval" / "summary.json").is_file()


def test_a_missing_dino_is_named_with_the_flag_to_pass(runs, tmp_path, capsys):
    for given, missing in ((None, runs["trained_with"]), (tmp_path / "nowhere.pth", tmp_path / "nowhere.pth")):
        with pytest.raises(ValueError) as e:
            load_model(runs["plus"], dino=given, log=lambda *_: None)
        assert str(missing) in str(e.value) and "--dino" in str(e.value) and "DINO=" in str(e.value), str(e.value)
        extra = ("--dino", given) if given else ()
        assert predict(runs, "plus", tmp_path / "pred", *extra) == 2
        err = one_error_line(capsys)
        assert str(missing) in err and "--dino" in err and "DINO=" in err, err
        assert evaluate(runs, "plus", tmp_path / "eval", *extra) == 2
        assert str(missing) in one_error_line(capsys)
    assert not (tmp_path / "pred" / "a.png").exists()


def test_a_dino_of_other_content_is_refused_naming_both_files(runs, tmp_path, capsys):
    with pytest.raises(ckpt_io.CheckpointMismatch) as e:
        load_model(runs["plus"], dino=runs["other"], log=lambda *_: None)
    for name in (runs["other"], runs["trained_with"], "--dino", "DINO="):
        assert str(name) in str(e.value), (name, str(e.value))
    assert predict(runs, "plus", tmp_path / "pred", "--dino", runs["other"]) == 2
    err = one_error_line(capsys)
    assert str(runs["other"]) in err and str(runs["trained_with"]) in err
    assert not (tmp_path / "pred" / "a.png").exists()
    assert evaluate(runs, "plus", tmp_path / "eval", "--dino", runs["other"]) == 2
    assert str(runs["other"]) in one_error_line(capsys)
    assert not (tmp_path / "eval" / "summary.json").exists()


@pytest.mark.parametrize("run, name", [("weclip", "'weclip'"), ("clip_only", "branches: clip")])
def test_dino_for_a_model_without_one_is_refused(runs, tmp_path, capsys, run, name):
    load_model(runs[run], log=lambda *_: None)   # the checkpoint itself loads
    with pytest.raises(ckpt_io.CheckpointMismatch, match=rf"{name}.*has no DINOv2.*drop --dino"):
        load_model(runs[run], dino=runs["moved"], log=lambda *_: None)
    assert predict(runs, run, tmp_path / "pred", "--dino", runs["moved"]) == 2
    err = one_error_line(capsys)
    assert str(runs[run]) in err and "has no DINOv2" in err, err
    assert not (tmp_path / "pred" / "a.png").exists()
    assert evaluate(runs, run, tmp_path / "eval", "--dino", runs["moved"]) == 2
    assert "has no DINOv2" in one_error_line(capsys)


def test_clip_for_a_model_without_one_is_refused(tmp_path, capsys):
    """As for the DINOv2: a CLIP given for a DeepLab checkpoint means the wrong checkpoint was named."""
    d = make_data(tmp_path / "data", 2, 1, size=(32, 48), seed=7)
    run = tmp_path / "deeplab"
    train(load_config(None, overrides(d, **{"model.name": "deeplabv2", "model.layers": "[1,1,1,1]",
                                            "model.base_width": 8, "data.crop": 32,
                                            "train.batch_size": 2, "schedule.iters": 1})), run, **QUIET)
    clip = save_clip(random_clip(TINY, seed=3), tmp_path / "clip.pt")
    load_model(run, log=lambda *_: None)
    with pytest.raises(ckpt_io.CheckpointMismatch, match=r"'deeplabv2' model.*has no CLIP.*drop --clip"):
        load_model(run, clip=clip, log=lambda *_: None)
    assert predict_main(["--checkpoint", str(run), "--images", str(d["root"] / "JPEGImages"), "--out",
                         str(tmp_path / "pred"), "--no-progress", "--device", "cpu", "--clip", str(clip)]) == 2
    assert "has no CLIP" in one_error_line(capsys)
    assert not (tmp_path / "pred").exists() or not list((tmp_path / "pred").glob("*.png"))


def test_a_checkpoint_without_the_dinos_sha256_loads_any_dino_of_the_right_shape(runs, tmp_path):
    old = tmp_path / "old.pt"
    ck = torch.load(ckpt_io.resolve(runs["plus"]), weights_only=True)
    del ck["meta"]["inputs"]["dino_sha256"]
    torch.save(ck, old)
    model, _ = load_model(old, dino=runs["other"], log=lambda *_: None)
    torch.testing.assert_close(model.dino.state_dict(), torch.load(runs["other"], weights_only=True))
    with pytest.raises(ValueError, match=rf"{runs['trained_with']}.*--dino"):  # still named when missing
        load_model(old, log=lambda *_: None)


@pytest.mark.parametrize("target", ["predict", "eval"])
def test_make_passes_dino_as_one_word_and_only_when_given(target):
    dino = "/some where/dino it's.pth"
    base = ["make", "-n", "-f", str(ROOT / "Makefile"), target, "CKPT=run", "ROOT=/r", "WHAT=model"]
    for extra, want in (([f"DINO={dino}"], ["--dino", dino]), ([], None)):
        proc = subprocess.run(base + extra, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        words = shlex.split(" ".join(line for line in proc.stdout.replace("\\\n", " ").splitlines() if " -m " in line))
        assert f"stages.{'predict' if target == 'predict' else 'evaluate_model'}" in words
        if want:
            i = words.index("--dino")
            assert words[i:i + 2] == want, words
        else:
            assert "--dino" not in words, words


def test_make_predict_with_the_moved_dino(runs, tmp_path):
    """The README's command for a moved DINOv2, run for real."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = tmp_path / "pred dir"
    proc = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "predict", f"PY={sys.executable}",
                           f"CKPT={runs['plus']}", f"IMAGES={runs['photos']}", f"DINO={runs['moved']}", f"OUT={out}",
                           "ARGS=--no-progress --device cpu"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "a.png").is_file()
