"""The CAM stage end to end: output contract, resume, refusal to mix, bad inputs, kill, torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_voc, textured_image, write_voc_xml
from pipeline.data.camfile import load_cams, upsample_cams
from pipeline.io import StaleOutputError, sha256_file
from pipeline.cams.stage import CamsConfig, run_cams
from stages.cams import main as cams_main


def cfg_for(root, split, clip, out, **kw) -> CamsConfig:
    return CamsConfig(dataset="voc", root=str(root), split=str(split), clip=str(clip), out=str(out),
                      workers=0, progress=False, **kw)


def read_all(out: Path) -> dict[str, dict[str, np.ndarray]]:
    return {p.stem: load_cams(p) for p in sorted(out.glob("*.npz"))}


def test_output_contract_and_manifest(voc_small, tiny_clip_path, tmp_path):
    root, split = voc_small
    out = tmp_path / "cams"
    s = run_cams(cfg_for(root, split, tiny_clip_path, out, save_init=True))
    assert (s.written, s.failed) == (6, 0)
    files = read_all(out)
    assert len(files) == 6
    d = files["2007_000002"]
    with np.load(out / "2007_000002.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["cams", "cams_init", "image_size", "keys"]
    assert d["keys"].dtype == np.int64 and d["keys"].tolist() == [14, 8]  # first appearance, de-duplicated
    assert d["cams"].dtype == np.float32 and d["cams"].shape == (2, 5, 7)  # 80x112 -> 5x7 patches
    assert d["image_size"].tolist() == [80, 112]
    assert d["cams"].min() >= 0 and d["cams"].max() <= 1 and d["cams_init"].shape == d["cams"].shape
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["checkpoint_sha256"] == sha256_file(tiny_clip_path)
    assert manifest["counts"] == {"images": 6, "written": 6, "failed": 0} and manifest["status"] == "complete"
    assert "code_version" in manifest and not (out / "errors.json").exists()


def test_files_are_written_while_the_next_images_compute(voc_small, tiny_clip_path, tmp_path, monkeypatch):
    """The device loop does not wait for a file's encode, fsync and rename: the first file's write is held
    until the second image has been computed, and the run still writes every file, identically."""
    import threading

    from pipeline.cams import stage

    root, split = voc_small
    run_cams(cfg_for(root, split, tiny_clip_path, tmp_path / "plain"))
    want = read_all(tmp_path / "plain")
    computed, second = [], threading.Event()
    compute, save = stage._compute, stage.save_cams

    def counting(*args):
        for pair in compute(*args):
            computed.append(threading.current_thread().name)
            if len(computed) == 2:
                second.set()
            yield pair

    def held(path, *args):
        if not second.wait(timeout=20):
            raise AssertionError("the second image waited for the first file's write")
        assert threading.current_thread() is not threading.main_thread()
        save(path, *args)

    monkeypatch.setattr(stage, "_compute", counting)
    monkeypatch.setattr(stage, "save_cams", held)
    s = run_cams(cfg_for(root, split, tiny_clip_path, tmp_path / "cams"))
    assert (s.written, s.failed) == (6, 0) and len(computed) == 6
    got = read_all(tmp_path / "cams")
    assert got.keys() == want.keys() and all(np.array_equal(got[i][k], want[i][k]) for i in want for k in want[i])


def test_upsample_matches_reference_highres(voc_small, tiny_clip_path, tmp_path):
    root, split = voc_small
    run_cams(cfg_for(root, split, tiny_clip_path, tmp_path / "cams"))
    d = load_cams(tmp_path / "cams" / "2007_000001.npz")
    full = upsample_cams(d["cams"], d["image_size"])
    assert full.shape == (2, 96, 128) and full.dtype == np.float16
    # CLIP-ES: cv2.resize(map, (W, H)) with INTER_LINEAR, stacked, float16
    want = np.stack([cv2.resize(c, (128, 96)) for c in d["cams"]]).astype(np.float16)
    np.testing.assert_array_equal(full, want)


def test_resume_skips_and_config_change_is_refused(voc_small, tiny_clip_path, tmp_path):
    root, split = voc_small
    out = tmp_path / "cams"
    run_cams(cfg_for(root, split, tiny_clip_path, out))
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    (out / "2007_000003.npz").unlink()
    s = run_cams(cfg_for(root, split, tiny_clip_path, out))
    assert (s.written, s.skipped) == (1, 5)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.exists() and p.stem != "2007_000003")
    with pytest.raises(StaleOutputError, match="box_threshold"):
        run_cams(cfg_for(root, split, tiny_clip_path, out, box_threshold=0.5))
    s = run_cams(cfg_for(root, split, tiny_clip_path, out, box_threshold=0.5, overwrite=True))
    assert s.written == 6
    # another checkpoint is refused too, through the CLI with exit code 2
    other = tmp_path / "other.pt"
    other.write_bytes(tiny_clip_path.read_bytes() + b"")
    from pipeline.clip.random import TINY, random_clip, save_clip
    save_clip(random_clip(TINY, seed=9), other)
    rc = cams_main(["--dataset", "voc", "--root", str(root), "--split", str(split), "--clip", str(other),
                    "--out", str(out), "--box-threshold", "0.5", "--workers", "0", "--no-progress"])
    assert rc == 2


def _save_as(arr_or_img, path: Path, **kw) -> None:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path, **kw)


def test_bad_inputs_are_handled_or_reported(tmp_path, tiny_clip_path):
    root = tmp_path / "VOC"
    good = [("gray", (40, 56)), ("rgba", (48, 48)), ("palette", (33, 47)), ("cmyk", (40, 40)), ("png16", (32, 64)),
            ("exif", (24, 56)), ("tiny", (9, 12)), ("huge", (700, 1100)), ("plain", (64, 80))]
    make_voc(root, [(i, s, ["cat"]) for i, s in good] + [("corrupt", (40, 40), ["cat"]), ("cut", (64, 64), ["cat"])],
             split="all")
    jpg = root / "JPEGImages"
    arr = {i: textured_image(*s, seed=k) for k, (i, s) in enumerate(good)}
    _save_as(Image.fromarray(arr["gray"]).convert("L"), jpg / "gray.jpg")
    _save_as(Image.fromarray(arr["rgba"]).convert("RGBA"), jpg / "rgba.jpg", format="PNG")
    _save_as(Image.fromarray(arr["palette"]).convert("P"), jpg / "palette.jpg", format="PNG")
    _save_as(Image.fromarray(arr["cmyk"]).convert("CMYK"), jpg / "cmyk.jpg")
    _save_as(arr["png16"][..., 0].astype(np.uint16) * 257, jpg / "png16.jpg", format="PNG")
    exif_img = Image.fromarray(arr["exif"])
    exif = exif_img.getexif()
    exif[0x0112] = 8
    _save_as(exif_img, jpg / "exif.jpg", exif=exif)
    (jpg / "corrupt.jpg").write_bytes(b"\xff\xd8garbage")
    data = (jpg / "cut.jpg").read_bytes()
    (jpg / "cut.jpg").write_bytes(data[: len(data) // 3])
    # label problems
    for image_id, names in [("unknown", ["cat", "dragon"]), ("nolabels", [])]:
        _save_as(textured_image(32, 32, 0), jpg / f"{image_id}.jpg")
        write_voc_xml(root / "Annotations" / f"{image_id}.xml", names, (32, 32))
    _save_as(textured_image(32, 32, 0), jpg / "noxml.jpg")
    split = root / "all.txt"
    split.write_text(split.read_text() + "unknown\nnolabels\nnoxml\nmissingimage\n")
    write_voc_xml(root / "Annotations" / "missingimage.xml", ["cat"], (32, 32))

    out = tmp_path / "cams"
    args = ["--dataset", "voc", "--root", str(root), "--split", str(split), "--clip", str(tiny_clip_path),
            "--out", str(out), "--workers", "0", "--no-progress", "--max-patches", "256"]
    assert cams_main(args) == 1
    errors = json.loads((out / "errors.json").read_text())
    assert set(errors) == {"corrupt", "cut", "unknown", "nolabels", "noxml", "missingimage"}
    assert "corrupt.jpg" in errors["corrupt"] and "cut.jpg" in errors["cut"] and "dragon" in errors["unknown"]
    assert "no foreground labels" in errors["nolabels"] and "noxml.xml" in errors["noxml"]
    assert "not found" in errors["missingimage"]
    files = read_all(out)
    assert set(files) == {i for i, _ in good}
    for image_id, (h, w) in good:
        assert files[image_id]["image_size"].tolist() == [h, w]  # EXIF not applied by default
    huge = files["huge"]["cams"]
    assert huge.shape[1] * huge.shape[2] <= 256 and upsample_cams(files["huge"]["cams"], (700, 1100)).shape == (1, 700, 1100)
    assert files["tiny"]["cams"].shape == (1, 1, 1)
    # a re-run retries only the failures: nothing new is written, the same errors stand
    assert cams_main(args) == 1
    assert set(json.loads((out / "errors.json").read_text())) == set(errors)


def _cams_cmd(root, split, clip, out, *extra):
    return [sys.executable, "-m", "stages.cams", "--dataset", "voc", "--root", str(root), "--split", str(split),
            "--clip", str(clip), "--out", str(out), "--workers", "0", "--no-progress", "--batch-size", "1", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_files(tmp_path, tiny_clip_path):
    root = tmp_path / "VOC"
    split = make_voc(root, [(f"img{i:02d}", (64 + 16 * (i % 3), 96), ["dog", "person"][: 1 + i % 2]) for i in range(24)])
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cams_cmd(root, split, tiny_clip_path, full), check=True, env=_env(), cwd=ROOT)
    proc = subprocess.Popen(_cams_cmd(root, split, tiny_clip_path, killed), env=_env(), cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("*.npz"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(killed.glob("*.npz")))
    assert 3 <= n_before < 24, "the run must be killed part-way"
    subprocess.run(_cams_cmd(root, split, tiny_clip_path, killed), check=True, env=_env(), cwd=ROOT)
    names = sorted(p.name for p in full.glob("*.npz"))
    assert names == sorted(p.name for p in killed.glob("*.npz")) and len(names) == 24
    assert not list(killed.glob(".*.tmp"))
    for name in names:
        assert (full / name).read_bytes() == (killed / name).read_bytes(), name


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(voc_small, tiny_clip_path, tmp_path):
    root, split = voc_small
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(_cams_cmd(root, split, tiny_clip_path, single), check=True, env=_env(), cwd=ROOT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    subprocess.run(torchrun + _cams_cmd(root, split, tiny_clip_path, multi)[1:], check=True, env=_env(), cwd=ROOT,
                   timeout=300)
    names = sorted(p.name for p in single.glob("*.npz"))
    assert names == sorted(p.name for p in multi.glob("*.npz")) and len(names) == 6
    for name in names:
        assert (single / name).read_bytes() == (multi / name).read_bytes(), name
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 6 and not list(multi.glob(".rank*.json"))


def test_cams_straight_into_pseudo_labels_equal_the_two_stage_run(tmp_path, tiny_clip_path):
    from pipeline.data.datasets import build_dataset
    from pipeline.labels.pseudo import PseudoConfig, run_pseudo
    from pipeline.data.synthetic import make_scenes, split_file

    root = tmp_path / "VOC"
    make_scenes(root, 5, seed=3)
    split = split_file(root)
    run_cams(cfg_for(root, split, tiny_clip_path, tmp_path / "cams"))
    data = build_dataset("voc", root)
    run_pseudo(data, data.ids(str(split)), tmp_path / "cams", tmp_path / "two_stage", PseudoConfig(), n_jobs=1,
               progress=False)
    s = run_cams(cfg_for(root, split, tiny_clip_path, tmp_path / "unused", pseudo_out=str(tmp_path / "streamed"),
                         keep_cams=False, pseudo_jobs=2))
    assert (s.written, s.failed) == (5, 0)
    assert not (tmp_path / "unused").exists()
    names = sorted(p.name for p in (tmp_path / "two_stage").glob("*.png"))
    assert len(names) == 5 and names == sorted(p.name for p in (tmp_path / "streamed").glob("*.png"))
    for name in names:
        assert (tmp_path / "two_stage" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes()
    manifest = json.loads((tmp_path / "streamed" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["cams_config"]["stage"] == "cams"
    again = run_cams(cfg_for(root, split, tiny_clip_path, tmp_path / "unused", pseudo_out=str(tmp_path / "streamed"),
                             keep_cams=False))
    assert (again.written, again.skipped) == (0, 5)


def test_decoding_processes_by_default(monkeypatch):
    """A GPU outruns two decoders: on CUDA one per core (one left for the device loop) up to 8, shared among
    torchrun's processes on the machine; on the CPU 2, which leave the model its cores."""
    import torch

    from pipeline.cams.stage import default_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, gpu, cpu in ((2, 1, 2), (1, 1, 1), (6, 5, 2), (32, 8, 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))
        assert (default_workers(torch.device("cuda")), default_workers(torch.device("cpu"))) == (gpu, cpu), cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers(torch.device("cuda", 1)) == 7  # 32 cores / 4 processes, one left
