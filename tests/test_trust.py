"""Trustworthy under mistakes: bad inputs get a message naming the file, failed runs never lock their
folder, outputs get the user's permissions, and nothing is written silently wrong."""
from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest

from pipeline.data import synthetic
from pipeline.data.datasets import build_dataset
from pipeline.io import write_bytes, write_manifest
from pipeline.labels.pseudo import PseudoConfig, run_pseudo
from pipeline.cams.stage import CamsConfig, run_cams

N = 4


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    ids = synthetic.make_scenes(root, N, (48, 64), seed=5)
    return root, ids


@pytest.fixture
def scenes_copy(scenes, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(scenes[0], root)
    return root, list(scenes[1])


# ------------------------------------------------------------------------------- item 8: permissions
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_bytes(tmp_path / "x.bin", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o666 & ~umask


# ------------------------------------------------------------------- item 3: failed runs do not lock
def test_pseudo_before_cams_does_not_lock_the_folder(scenes_copy, tmp_path):
    root, ids = scenes_copy
    ds = build_dataset("voc", root)
    out = tmp_path / "pseudo"
    first = run_pseudo(ds, ids, root / "cams", out, PseudoConfig(), n_jobs=1, progress=False)
    assert first["failed"] == N and (out / "manifest.json").is_file()
    synthetic.make_noisy_cams(root, root / "cams", seed=5)
    write_manifest(root / "cams", {"stage": "cams", "made": "now"})  # the CAM provenance changed
    second = run_pseudo(ds, ids, root / "cams", out, PseudoConfig(), n_jobs=1, progress=False)
    assert second["failed"] == 0 and second["done"] == N
    # once something is finished, the manifest binds the folder
    with pytest.raises(Exception, match="different configuration"):
        run_pseudo(ds, ids, root / "cams", out, PseudoConfig(conf=0.5), n_jobs=1, progress=False)


def test_truncated_clip_then_the_right_one_runs(voc_small, tiny_clip_path, tmp_path):
    root, split = voc_small
    bad = tmp_path / "cut.pt"
    bad.write_bytes(tiny_clip_path.read_bytes()[:5000])
    out = tmp_path / "cams"
    cfg = dict(dataset="voc", root=str(root), split=str(split), out=str(out), workers=0, progress=False)
    with pytest.raises(Exception):
        run_cams(CamsConfig(clip=str(bad), **cfg))
    s = run_cams(CamsConfig(clip=str(tiny_clip_path), **cfg))
    assert s.written == 6 and s.failed == 0


# --------------------------------------------------------------------- item 6: messages, not tracebacks
def _weights_files(tmp_path):
    import io
    import pickle

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4000)}, buf)
    files = {"empty": b"", "truncated": buf.getvalue()[: len(buf.getvalue()) // 2],
             "pickled": pickle.dumps({"w": shutil.copy}, protocol=2)}  # a function: weights-only loading must refuse it
    for name, data in files.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
    return [tmp_path / f"{name}.pt" for name in files]


@pytest.mark.parametrize("loader", ["clip", "segmentation"])
def test_unreadable_weights_get_one_whole_safe_sentence(tmp_path, loader):
    from pipeline import checkpoint
    from pipeline.clip.model import read_state_dict

    load = read_state_dict if loader == "clip" else checkpoint.load
    for path in _weights_files(tmp_path):
        with pytest.raises(ValueError) as e:
            load(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: "), msg
        for unsafe in ("weights_only", "allow_pickle", "trust the source"):
            assert unsafe not in msg, msg
        # whole sentences: the message ends with the fix, not in the middle of torch's text
        assert msg.rstrip(")").endswith(("again", "checkpoints/")), msg
    assert "empty (0 bytes)" in str(pytest.raises(ValueError, load, tmp_path / "empty.pt").value)


def test_npz_with_objects_does_not_advise_allow_pickle(tmp_path):
    from pipeline.io import load_npz

    np.savez(tmp_path / "x.npz", a=np.array([{"k": 1}], dtype=object))
    with pytest.raises(ValueError) as e:
        load_npz(tmp_path / "x.npz")
    assert str(e.value).startswith(f"{tmp_path / 'x.npz'}: ") and "allow_pickle" not in str(e.value)


def test_out_naming_a_file_is_a_message(scenes, tiny_clip_path, tmp_path, capsys):
    from stages.cams import main as cams_main
    from stages.pseudo import main as pseudo_main
    from stages.train import main as train_main

    root, _ = scenes
    afile = tmp_path / "taken.txt"
    afile.write_text("not a folder")
    split = str(synthetic.split_file(root))
    runs = {
        "cams": lambda: cams_main(["--dataset", "voc", "--root", str(root), "--split", split, "--clip",
                                   str(tiny_clip_path), "--out", str(afile), "--workers", "0", "--no-progress"]),
        "pseudo": lambda: pseudo_main(["--dataset", "voc", "--root", str(root), "--split", split, "--out", str(afile),
                                       "-j", "1", "--no-progress"]),
        "train": lambda: train_main(["--config", "configs/weclip_voc.yaml", "--root", str(root), "--pseudo",
                                     str(root / "SegmentationClass"), "--clip", str(tiny_clip_path), "--out",
                                     str(afile / "run"), "--no-progress"]),
    }
    for name, run in runs.items():
        assert run() == 2, name
        err = capsys.readouterr().err
        assert f"{afile}: is a file, not a folder" in err, (name, err)
    assert afile.read_text() == "not a folder"


def test_disk_full_is_a_message(scenes, tiny_clip_path, tmp_path, capsys, monkeypatch):
    import errno

    from stages.cams import main as cams_main

    root, _ = scenes

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    rc = cams_main(["--dataset", "voc", "--root", str(root), "--split", str(synthetic.split_file(root)), "--clip",
                    str(tiny_clip_path), "--out", str(tmp_path / "cams"), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {tmp_path / 'cams'}" in err and ": no space left on device; free some space" in err, err
    assert not list((tmp_path / "cams").glob("*.tmp")) and not list((tmp_path / "cams").glob(".*.tmp"))


# ------------------------------------------------------------- item 5: unknown class in a labels file
def test_unknown_class_in_labels_file_fails_that_image_only(voc_small, tiny_clip_path, tmp_path):
    root, split = voc_small
    ids = split.read_text().split()
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{i},{'griffin;cat' if k == 2 else 'cat'}\n" for k, i in enumerate(ids)))
    out = tmp_path / "cams"
    s = run_cams(CamsConfig(dataset="voc", root=str(root), split=str(split), clip=str(tiny_clip_path), out=str(out),
                            labels=str(labels), workers=0, progress=False))
    assert (s.written, s.failed) == (len(ids) - 1, 1)
    assert "griffin" in s.errors[ids[2]] and str(labels) in s.errors[ids[2]]
    assert not (out / f"{ids[2]}.npz").exists() and (out / f"{ids[0]}.npz").is_file()


# ------------------------------------------------------------------------ item 11: silently wrong labels
def test_vocabulary_beyond_8_bit_labels_is_refused(tmp_path):
    import yaml

    from pipeline.classes import ClassList

    (tmp_path / "big.yaml").write_text(yaml.safe_dump({"classes": [f"thing{i}" for i in range(280)]}))
    with pytest.raises(ValueError, match=r"big\.yaml.*at most 254"):
        ClassList.from_yaml(tmp_path / "big.yaml")
    assert ClassList.from_yaml(_vocab(tmp_path, 254)).num_classes == 254


def _vocab(tmp_path, n):
    import yaml

    (tmp_path / f"v{n}.yaml").write_text(yaml.safe_dump({"classes": [f"thing{i}" for i in range(n)]}))
    return tmp_path / f"v{n}.yaml"


def test_pseudo_refuses_cams_outside_the_vocabulary_nan_or_wrong_grid(scenes_copy, tmp_path):
    from pipeline.data.camfile import load_cams, save_cams

    root, ids = scenes_copy
    synthetic.make_noisy_cams(root, root / "cams", seed=5)
    cams = {i: load_cams(root / "cams" / f"{i}.npz") for i in ids}
    d = cams[ids[0]]
    save_cams(root / "cams" / f"{ids[0]}.npz", d["keys"] + 30, d["cams"], d["image_size"])  # VOC has 0..19
    d = cams[ids[1]]
    nan = d["cams"].copy()
    nan[0, 0, 0] = np.nan
    save_cams(root / "cams" / f"{ids[1]}.npz", d["keys"], nan, d["image_size"])
    d = cams[ids[2]]  # 48x64 -> a 3x4 grid; a 6x8 grid belongs to another image size or setting
    save_cams(root / "cams" / f"{ids[2]}.npz", d["keys"], np.repeat(np.repeat(d["cams"], 2, 1), 2, 2), d["image_size"])
    res = run_pseudo(build_dataset("voc", root), ids, root / "cams", tmp_path / "pseudo", PseudoConfig(), n_jobs=1,
                     progress=False)
    errors = res["errors"]
    assert set(errors) == set(ids[:3]) and res["done"] == N - 3
    assert "class ids [3" in errors[ids[0]] and "outside this vocabulary's 0..19" in errors[ids[0]]
    assert "NaN" in errors[ids[1]]
    assert "6x8 patch grid" in errors[ids[2]] and "3x4" in errors[ids[2]]
    assert not (tmp_path / "pseudo" / f"{ids[0]}.png").exists() and (tmp_path / "pseudo" / f"{ids[3]}.png").is_file()


def test_crf_workers_die_with_a_killed_pseudo_stage(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    root = tmp_path / "voc"
    ids = synthetic.make_scenes(root, 60, (200, 260), seed=2)
    synthetic.make_noisy_cams(root, root / "cams", seed=2)
    out = tmp_path / "pseudo"
    proc = subprocess.Popen([sys.executable, "-m", "stages.pseudo", "--dataset", "voc", "--root", str(root), "--split",
                             str(synthetic.split_file(root)), "--cams", str(root / "cams"), "--out", str(out), "-j", "2",
                             "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children(pid):
        kids = []
        for stat_file in os.listdir("/proc"):
            if stat_file.isdigit():
                try:
                    fields = open(f"/proc/{stat_file}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:
                    kids.append(int(stat_file))
        return kids

    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.png")):
        time.sleep(0.1)
    workers = children(proc.pid)
    assert workers and list(out.glob("*.png")), "the stage did not start labelling"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"]
    try:
        assert not alive, f"worker processes {alive} outlived the killed stage"
    finally:
        for w in alive:
            os.kill(w, signal.SIGKILL)
    written = len(list(out.glob("*.png")))
    time.sleep(1)
    assert len(list(out.glob("*.png"))) == written < len(ids)


# ----------------------------------------------------------------- item 4: truncated training images
def test_truncated_training_image_is_caught_before_training(scenes_copy):
    from PIL import Image

    from pipeline.data.segdata import DataError, make_samples, validate_samples

    root, ids = scenes_copy
    jpg = root / "JPEGImages" / f"{ids[1]}.jpg"
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) * 2 // 3])
    with Image.open(jpg) as im:  # the header alone looks fine
        assert im.size == (64, 48)
    samples = make_samples(build_dataset("voc", root), ids, None)
    with pytest.raises(DataError) as e:
        validate_samples(samples, 20)
    msg = str(e.value)
    assert msg.startswith(f"1 of {N} training samples are unusable") and f"{jpg}: cannot decode image" in msg


# ------------------------------------------------------------------------------------ item 12
def test_folder_dataset_without_ground_truth_needs_none_for_pseudo_labels(scenes, tmp_path):
    import json

    from pipeline.classes import builtin

    root, ids = scenes
    folder = tmp_path / "photos"
    shutil.copytree(root / "JPEGImages", folder)
    voc = builtin("voc")
    (tmp_path / "labels.json").write_text(json.dumps(
        {i: [voc.names[k] for k in build_dataset("voc", root).labels(i)] for i in ids}))
    synthetic.make_noisy_cams(root, tmp_path / "cams", seed=5)
    ds = build_dataset("folder", folder, "data/voc.yaml", tmp_path / "labels.json")
    res = run_pseudo(ds, ids, tmp_path / "cams", tmp_path / "pseudo", PseudoConfig(), n_jobs=1, progress=False)
    assert res["failed"] == 0 and res["done"] == N
    # a dataset that has ground truth still requires it for every image, as the reference does
    (root_gt := tmp_path / "voc").mkdir()
    shutil.copytree(root, root_gt, dirs_exist_ok=True)
    (root_gt / "SegmentationClass" / f"{ids[0]}.png").unlink()
    res = run_pseudo(build_dataset("voc", root_gt), ids, tmp_path / "cams", tmp_path / "pseudo_gt", PseudoConfig(),
                     n_jobs=1, progress=False)
    assert list(res["errors"]) == [ids[0]] and "ground-truth mask not found" in res["errors"][ids[0]]


def test_resnet_clip_for_training_gets_a_training_message(tmp_path):
    import torch

    from pipeline.clip.model import CheckpointError
    from pipeline.models import build_model

    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1), "visual.attnpool.c_proj.weight": torch.zeros(1)},
               tmp_path / "RN50.pt")
    with pytest.raises(CheckpointError) as e:
        build_model({"name": "weclip", "clip": str(tmp_path / "RN50.pt")}, 21)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'RN50.pt'}: this is a ResNet CLIP") and "WeCLIP's decoder" in msg
    assert "CAMs need" not in msg


def test_random_weight_banner_on_panels_and_page():
    from pipeline.eval.viz import CAPTION_H, gallery_html, make_panel

    image = np.full((40, 60, 3), 128, np.uint8)
    plain = make_panel(image, label=np.zeros((40, 60), np.uint8))
    marked = make_panel(image, label=np.zeros((40, 60), np.uint8), banner="RANDOM WEIGHTS")
    assert marked.shape[0] == plain.shape[0] + CAPTION_H and np.array_equal(marked[CAPTION_H:], plain)
    strip = marked[:CAPTION_H].astype(int)
    assert ((strip[..., 0] > 120) & (strip[..., 1] < 80)).any()  # red text
    page = gallery_html([{"id": "a", "panel": "a.png", "iou": None}], banner="RANDOM WEIGHTS: meaningless")
    assert "RANDOM WEIGHTS: meaningless" in page and "RANDOM" not in gallery_html([])


def test_diverging_training_is_a_message(monkeypatch, capsys):
    import pipeline.train.loop
    from stages.train import main as train_main

    def diverge(*a, **k):
        raise FloatingPointError("loss became nan at iteration 2; lower optim.lr or use amp=bf16")

    monkeypatch.setattr(pipeline.train.loop, "train", diverge)
    assert train_main(["--config", "configs/weclip_voc.yaml", "--root", ".", "--no-progress"]) == 2
    assert "error: loss became nan at iteration 2" in capsys.readouterr().err


# ------------------------------------------------------ issue 22 item 6: no traceback, no misleading message
def test_attributes_refuse_an_existing_bank_untouched_and_a_folder(tmp_path, tiny_clip_path, capsys):
    from stages import attributes

    bank = tmp_path / "bank.npz"
    bank.write_bytes(b"my earlier bank")
    base = ["--dataset", "voc", "--clip", str(tiny_clip_path), "--device", "cpu"]
    assert attributes.main(base + ["--out", str(bank)]) == 2
    err = capsys.readouterr().err
    assert f"{bank}: already exists" in err and "--overwrite" in err and bank.read_bytes() == b"my earlier bank"
    assert attributes.main(base + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: is a folder") and "attributes.npz" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.npz"]  # no lock file left anywhere near


def test_demo_out_naming_a_file_is_a_message(tmp_path, capsys):
    from stages import demo

    (tmp_path / "f").write_text("keep")
    assert demo.main(["--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'f'}: is a file, not a folder")
    assert (tmp_path / "f").read_text() == "keep"


def test_missing_clip_gets_the_documented_sentence(voc_small, tmp_path, capsys):
    from stages import cams

    root, split = voc_small
    rc = cams.main(["--dataset", "voc", "--root", str(root), "--split", str(split), "--clip", str(tmp_path / "no.pt"),
                    "--out", str(tmp_path / "cams")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / 'no.pt'}: checkpoint not found. Download OpenAI's ViT-B-16.pt" in err


def test_predict_images_missing_or_empty_is_named(tmp_path, monkeypatch, capsys):
    from stages import predict

    meta = {"class_names": ["background", "cat"], "num_classes": 2}
    monkeypatch.setattr("pipeline.eval.infer.load_model", lambda *a, **k: (None, meta))
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for folder, says in ((tmp_path / "missing", "image folder not found"), (tmp_path / "empty", "no images (.jpg")):
        rc = predict.main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"error: {folder}: {says}") and "IMAGES=" in err and "ROOT" not in err
    assert not (tmp_path / "out").exists()


def test_a_clip_archive_or_an_npz_given_as_ckpt_is_named(tmp_path, tiny_clip_path, voc_small, capsys):
    from stages import predict

    np.savez(tmp_path / "cams.npz", keys=np.zeros(1), cams=np.zeros((1, 2, 2)))
    for ckpt, says in ((tiny_clip_path, "TorchScript model archive (OpenAI's CLIP ViT-B-16.pt is one)"),
                       (tmp_path / "cams.npz", "NumPy .npz archive")):
        rc = predict.main(["--checkpoint", str(ckpt), "--images", str(voc_small[0] / "JPEGImages"),
                           "--out", str(tmp_path / "out"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"error: {ckpt}: this is a {says}") and "pass another checkpoint" in err
        assert "Warning" not in err


@pytest.mark.parametrize("variables,says", [
    (["MODEL=foo"], "MODEL=foo is not a model; choose one of: weclip weclip-online excel deeplab"),
    (["DATASET=folder"], "there is no configs/weclip_folder.yaml for DATASET=folder; copy configs/weclip_voc.yaml"),
])
def test_make_train_without_a_config_names_the_fix(variables, says):
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["make", "-s", "-f", str(repo / "Makefile"), "train", "ROOT=/nowhere", *variables],
                          capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {says}"), proc.stderr
    assert "No such file" not in proc.stderr


def test_pseudo_after_a_cam_failure_names_that_failure(voc_small, tiny_clip_path, tmp_path):
    root, split = voc_small
    xml = root / "Annotations" / "2007_000003.xml"
    xml.write_text(xml.read_text().replace("bird", "griffin"))
    s = run_cams(CamsConfig(dataset="voc", root=str(root), split=str(split), clip=str(tiny_clip_path),
                            out=str(tmp_path / "cams"), workers=0, progress=False))
    assert s.failed == 1
    res = run_pseudo(build_dataset("voc", root), ["2007_000003"], tmp_path / "cams", tmp_path / "pseudo",
                     PseudoConfig(require_gt=False), n_jobs=1, progress=False)
    msg = res["errors"]["2007_000003"]
    assert "the CAM stage failed for this image" in msg and "unknown class 'griffin'" in msg
    assert "run the CAM stage for this image" not in msg


def test_a_non_cam_npz_says_to_delete_it(voc_small, tmp_path):
    root, split = voc_small
    (tmp_path / "cams").mkdir()
    np.savez(tmp_path / "cams" / "2007_000000.npz", centres=np.zeros((2, 3)))
    res = run_pseudo(build_dataset("voc", root), ["2007_000000"], tmp_path / "cams", tmp_path / "pseudo",
                     PseudoConfig(require_gt=False), n_jobs=1, progress=False)
    msg = res["errors"]["2007_000000"]
    assert "2007_000000.npz: not a CAM file" in msg and "delete it and re-run make cams" in msg
