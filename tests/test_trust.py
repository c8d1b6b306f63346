"""Trustworthy under mistakes: bad inputs get a message naming the file, failed runs never lock their
folder, outputs get the user's permissions, and nothing is written silently wrong."""
from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest

from conftest import make_voc
from pipeline import synthetic
from pipeline.datasets import build_dataset
from pipeline.io import write_bytes, write_manifest
from pipeline.pseudo import PseudoConfig, run_pseudo
from pipeline.stage_cams import CamsConfig, run_cams

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
