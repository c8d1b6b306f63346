"""The CRF backend, preset and resolution cap as the pseudo-label stage uses and records them."""
import json

import numpy as np
import pytest

from pipeline.labels import crf
from pipeline.data import synthetic
from pipeline.data.camfile import load_cams
from pipeline.data.datasets import build_dataset
from pipeline.data.image import load_rgb
from pipeline.data.labelio import read_label
from pipeline.labels.pseudo import PseudoConfig, pseudo_label, run_pseudo


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("crfscenes")
    ids = synthetic.make_scenes(root, 2, (72, 96), seed=5)
    synthetic.make_noisy_cams(root, root / "cams", seed=5)
    return root, ids


def test_cli_torch_backend_and_preset_reach_the_manifest_and_labels(voc, tmp_path):
    from stages.pseudo import main

    root, ids = voc
    out = tmp_path / "p"
    args = ["--dataset", "voc", "--root", str(root), "--split", str(synthetic.split_file(root)), "--cams",
            str(root / "cams"), "--out", str(out), "-j", "1", "--no-progress", "--crf-backend", "torch",
            "--crf-preset", "weclip", "--bi-w", "5", "--device", "cpu"]
    assert main(args) == 0
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    assert (cfg["backend"], cfg["preset"], cfg["guide"], cfg["max_pixels"]) == ("torch", "weclip", "rgb", 1_000_000)
    assert cfg["crf"] == {"iters": 10, "pos_xy": 3.0, "pos_w": 3.0, "bi_xy": 64.0, "bi_rgb": 5.0, "bi_w": 5.0}
    want_cfg = PseudoConfig(guide="rgb", crf=crf.CRFParams(10, 3.0, 3.0, 64.0, 5.0, 5.0), backend="torch")
    for i in ids:
        d = load_cams(root / "cams" / f"{i}.npz")
        want = pseudo_label(load_rgb(root / "JPEGImages" / f"{i}.jpg"), d["keys"], d["cams"], want_cfg)
        assert np.array_equal(read_label(out / f"{i}.png"), want)
    # another backend into the same folder is another configuration
    assert main(args[:-8] + ["--crf-backend", "pydensecrf", "--crf-preset", "weclip", "--bi-w", "5"]) == 2


def test_without_pydensecrf_auto_falls_back_to_torch_with_a_note(voc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("pipeline.labels.crf.pydensecrf_backend.available", lambda: False)
    root, ids = voc
    ds = build_dataset("voc", root)
    res = run_pseudo(ds, ids, root / "cams", tmp_path / "p", PseudoConfig(), n_jobs=1, progress=False)
    assert res["failed"] == 0
    assert "pydensecrf is not installed" in capsys.readouterr().err
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["config"]["backend"] == "torch"


def test_large_image_goes_through_the_capped_crf(tmp_path, monkeypatch):
    root = tmp_path / "big"
    ids = synthetic.make_scenes(root, 1, (300, 400), seed=9)
    synthetic.make_noisy_cams(root, root / "cams", seed=9)
    seen = []
    real = crf.dense_crf
    monkeypatch.setattr("pipeline.labels.crf.dense_crf", lambda u, g, p, **kw: seen.append((g.shape, p)) or real(u, g, p, **kw))
    cfg = PseudoConfig(max_pixels=30_000, backend="torch")
    res = run_pseudo(build_dataset("voc", root), ids, root / "cams", tmp_path / "out", cfg, n_jobs=1, progress=False)
    assert res["failed"] == 0
    (shape, params), = seen
    assert shape == (150, 200, 3) and params.bi_xy == pytest.approx(67 / 2) and params.pos_xy == pytest.approx(0.5)
    assert read_label(tmp_path / "out" / f"{ids[0]}.png").shape == (300, 400)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["max_pixels"] == 30_000
