"""Panels and the worst-first gallery."""
import re

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.data import synthetic
from pipeline.eval import viz
from pipeline.classes import palette
from pipeline.data.datasets import build_dataset, read_mask
from pipeline.data.image import load_rgb
from pipeline.data.labelio import read_label, write_label
from pipeline.labels.pseudo import run_pseudo


def test_make_panel_layout_and_tiles():
    H, W, th = 60, 90, 40
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    cams = np.zeros((2, H, W), np.float32)
    cams[0, :, : W // 2] = 1.0
    label = np.zeros((H, W), np.uint8)
    label[:, W // 2:] = 3
    label[0, :] = 255
    gt = np.full((H, W), 12, np.uint8)
    panel = viz.make_panel(img, keys=[4, 7], cams=cams, label=label, gt=gt, names=[f"c{i}" for i in range(20)], tile_h=th)
    tw = 60  # 90 * 40 / 60
    assert panel.shape == (viz.CAPTION_H + th, 5 * tw, 3) and panel.dtype == np.uint8
    tiles = [panel[viz.CAPTION_H:, k * tw:(k + 1) * tw] for k in range(5)]
    assert np.array_equal(tiles[0], cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA))
    # CAM 1 is hot on the left: JET red dominates there, blue on the right; CAM 2 is cold everywhere
    left, right = tiles[1][:, : tw // 2 - 2].astype(int), tiles[1][:, tw // 2 + 2:].astype(int)
    assert (left[..., 0] - left[..., 2]).mean() > 40 and (right[..., 2] - right[..., 0]).mean() > 40
    assert (tiles[2][..., 2].astype(int) - tiles[2][..., 0]).mean() > 40
    # overlay: background keeps the image, class 3 blends its palette colour, 255 is white
    small = tiles[0].astype(np.float32)
    assert np.array_equal(tiles[3][5:, :20], tiles[0][5:, :20])
    want = viz.LABEL_ALPHA * palette()[3] + (1 - viz.LABEL_ALPHA) * small[5:, -10:]
    assert np.abs(tiles[3][5:, -10:] - want).max() <= 1
    assert (tiles[3][0] == 255).all()
    assert (tiles[4] == palette()[12]).all()
    # captions are drawn (dark text pixels on the white strip)
    assert (panel[: viz.CAPTION_H] < 128).any() and (panel[: viz.CAPTION_H, :, 0] == 255).mean() > 0.7
    # without CAMs and GT: two tiles
    assert viz.make_panel(img, label=label, tile_h=th).shape == (viz.CAPTION_H + th, 2 * tw, 3)


def test_gallery_sorted_worst_first():
    entries = [{"id": "b", "panel": "b.png", "iou": 0.9}, {"id": "a", "panel": "a.png", "iou": None},
               {"id": "c", "panel": "c.png", "iou": 0.2}, {"id": "d", "panel": "d.png", "iou": 0.55}]
    html = viz.gallery_html(entries)
    assert re.findall(r'<img src="([^"]+)"', html) == ["c.png", "d.png", "b.png", "a.png"]
    assert "IoU 20.0" in html and "IoU n/a" in html


@pytest.fixture
def scenes(tmp_path):
    root = tmp_path / "voc"
    ids = synthetic.make_scenes(root, 6, (96, 128), seed=21)
    synthetic.make_noisy_cams(root, root / "cams", seed=21)
    return root, ids


def test_run_viz_writes_panels_and_gallery_worst_first(scenes, tmp_path):
    root, ids = scenes
    ds = build_dataset("voc", root)
    assert run_pseudo(ds, ids, root / "cams", root / "pseudo", n_jobs=1, progress=False)["failed"] == 0
    write_label(root / "pseudo" / f"{ids[3]}.png", np.zeros((96, 128), np.uint8))  # a bad label: all background
    (root / "cams" / f"{ids[5]}.npz").unlink()  # panel without heat-maps
    (root / "pseudo" / f"{ids[4]}.png").unlink()
    (root / "cams" / f"{ids[4]}.npz").unlink()  # nothing to show: an error
    out = tmp_path / "viz"
    res = viz.run_viz(ds, ids, out, cams_dir=root / "cams", pseudo_dir=root / "pseudo", tile_h=48, n_jobs=1, progress=False)
    assert res["done"] == 5 and res["failed"] == 1 and "neither a CAM file nor a pseudo label" in res["errors"][ids[4]]
    html = (out / "index.html").read_text()
    order = re.findall(r'<img src="([^"]+)\.png"', html)
    assert order[0] == ids[3] and sorted(order) == sorted(set(ids) - {ids[4]})
    tw = 64  # 128 * 48 / 96
    for i in order:
        with Image.open(out / f"{i}.png") as im:
            panel = np.asarray(im.convert("RGB"))
        n_keys = len(ds.labels(i)) if i != ids[5] else 0
        assert panel.shape == (viz.CAPTION_H + 48, (3 + n_keys) * tw, 3)
        img = load_rgb(root / "JPEGImages" / f"{i}.jpg")
        assert np.array_equal(panel[viz.CAPTION_H:, :tw], cv2.resize(img, (tw, 48), interpolation=cv2.INTER_AREA))
        gt = read_mask(root / "SegmentationClass" / f"{i}.png", 20)
        gt_tile = palette()[cv2.resize(gt, (tw, 48), interpolation=cv2.INTER_NEAREST)]
        assert np.array_equal(panel[viz.CAPTION_H:, -tw:], gt_tile)
    lab = read_label(root / "pseudo" / f"{ids[0]}.png")
    assert lab.shape == (96, 128)
    # the CLI produces the same gallery and reports the failure through its exit code
    from stages.viz import main

    args = ["--dataset", "voc", "--root", str(root), "--split", str(synthetic.split_file(root)), "--cams",
            str(root / "cams"), "--pseudo", str(root / "pseudo"), "--out", str(tmp_path / "viz2"), "-j", "1",
            "--no-progress", "--tile-height", "48"]
    assert main(args) == 1
    assert re.findall(r'<img src="([^"]+)\.png"', (tmp_path / "viz2" / "index.html").read_text()) == order
