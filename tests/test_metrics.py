"""Confusion-matrix mIoU (CLIP-ES's eval_cam.py), CAM threshold sweep, pseudo-label metrics, tables, split runners."""
import csv
import json

import numpy as np
import pytest

from pipeline.eval import metrics as M
from pipeline.data import synthetic
from pipeline.data.datasets import build_dataset


def test_confusion_matrix_hand_computed_with_ignore():
    gt = np.array([[0, 0, 1, 255], [2, 2, 1, 0]])
    pred = np.array([[0, 1, 1, 2], [2, 0, 1, 0]])
    conf = M.confusion_matrix(pred, gt, 3)
    assert conf.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = M.class_metrics(conf)
    np.testing.assert_allclose(m["iou"], [2 / 4, 2 / 3, 1 / 2])
    np.testing.assert_allclose(m["precision"], [2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(m["recall"], [2 / 3, 1.0, 1 / 2])
    assert M.mean_iou(conf) == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert M.pixel_accuracy(conf) == pytest.approx(5 / 7)
    inter, union, pred_area, label_area = M.intersect_and_union(conf)
    assert inter.tolist() == [2, 2, 1] and union.tolist() == [4, 3, 2]
    assert pred_area.tolist() == [3, 3, 1] and label_area.tolist() == [3, 2, 2]


def test_classes_absent_from_gt_are_excluded_even_if_predicted():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 3, 1, 1])
    conf = M.confusion_matrix(pred, gt, 4)
    iou = M.class_metrics(conf)["iou"]
    assert iou[0] == 0.5 and iou[1] == 1.0 and np.isnan(iou[2]) and np.isnan(iou[3])
    assert M.mean_iou(conf) == pytest.approx(0.75)  # 0.5 if the predicted-but-absent class counted as 0


def test_prediction_out_of_range_is_an_error_but_255_under_ignored_gt_is_not():
    with pytest.raises(ValueError, match=r"\[255\]"):
        M.confusion_matrix(np.array([255, 0]), np.array([1, 0]), 3)
    assert M.confusion_matrix(np.array([255, 0]), np.array([255, 0]), 3).sum() == 1
    with pytest.raises(ValueError, match="differ in size"):
        M.confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)


def test_accumulated_confusion_equals_confusion_of_concatenation():
    rng = np.random.default_rng(0)
    a = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    b = [np.where(rng.random((7, 9)) < 0.1, 255, rng.integers(0, 5, (7, 9))) for _ in range(4)]
    total = sum(M.confusion_matrix(p, g, 5) for p, g in zip(a, b))
    assert np.array_equal(total, M.confusion_matrix(np.concatenate(a), np.concatenate(b), 5))


def test_cam_labels_power_const_and_ties():
    cams = np.array([[[0.9, 0.45, 0.3, 0.1]]], np.float16)  # K = 1, H = 1, W = 4
    keys = np.array([6])
    assert M.cam_labels(cams, keys, 1).tolist() == [[7, 0, 0, 0]]
    assert M.cam_labels(cams, keys, 2).tolist() == [[7, 7, 0, 0]]
    assert M.cam_labels(cams, keys, 0.4, "const").tolist() == [[7, 7, 0, 0]]
    s = M.cam_scores(cams, 2)
    assert s.dtype == np.float16 and s.shape == (2, 1, 4)
    tie = np.array([[[0.5]], [[0.25]]], np.float16)  # bg = 1 - 0.5 = 0.5 ties with class 0
    assert M.cam_labels(tie, np.array([2, 9]), 1).tolist() == [[0]]


def test_sweep_picks_the_best_tau():
    cams = np.array([[[0.9, 0.45, 0.3, 0.1]]], np.float16)
    gt = np.array([[1, 1, 0, 0]])
    confs = M.cam_sweep_confusions(cams, np.array([0]), gt, 2, (1.0, 2.0))
    assert confs.shape == (2, 2, 2)
    assert confs[0].tolist() == [[2, 0], [1, 1]] and confs[1].tolist() == [[2, 0], [0, 2]]
    assert M.mean_iou(confs[0]) == pytest.approx((2 / 3 + 1 / 2) / 2) and M.mean_iou(confs[1]) == 1.0


def test_default_taus():
    assert M.default_taus("power", refined=True) == (1.0, 2.0)
    assert M.default_taus("power", refined=False) == tuple(float(t) for t in range(1, 11))
    assert M.default_taus("const") == (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def test_pseudo_confusions_confident_bg255_and_coverage():
    gt = np.array([[0, 1, 1, 2], [0, 255, 2, 2]])
    label = np.array([[0, 255, 1, 255], [1, 255, 2, 0]], np.uint8)
    r = M.pseudo_confusions(label, gt, 3)
    assert r["confident"].tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert r["as_bg"].tolist() == [[1, 1, 0], [1, 1, 0], [2, 0, 1]]
    assert r["counts"].tolist() == [5, 8]


def test_tables_written_and_parseable(tmp_path):
    conf = np.array([[5, 1, 0], [0, 3, 0], [0, 0, 0]])
    rows = M.per_class_rows(conf, ["background", "cat", "dog"])
    assert rows[1]["iou"] == pytest.approx(75.0) and rows[2]["iou"] is None and rows[2]["precision"] is None
    paths = M.write_tables(tmp_path, "per_class", rows, {"miou": 79.16, "oracle": "yes"}, "title")
    with open(paths[0]) as f:
        table = list(csv.DictReader(f))
    assert [r["class"] for r in table] == ["background", "cat", "dog"]
    assert float(table[1]["iou"]) == pytest.approx(75.0) and table[2]["iou"] == ""
    doc = json.loads(paths[1].read_text())
    assert doc["summary"]["miou"] == 79.16 and doc["per_class"][2]["iou"] is None
    md = paths[2].read_text()
    assert "| class | iou |" in md and "| dog | - | - | - | 0 | 0 |" in md
    text = M.format_table(rows)
    assert text.splitlines()[0].split() == ["class", "iou", "precision", "recall", "gt_pixels", "pred_pixels"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    ids = synthetic.make_scenes(root, 6, (96, 128), seed=5)
    synthetic.make_noisy_cams(root, root / "cams", seed=5)
    return root, ids


def test_evaluate_cams_matches_direct_computation_and_logs_errors(scenes):
    from pipeline.data.camfile import load_cams, upsample_cams
    from pipeline.data.datasets import read_mask

    root, ids = scenes
    ds = build_dataset("voc", root)
    res = M.evaluate_cams(ds, ids, root / "cams", n_jobs=1, progress=False)
    want = np.zeros((2, 21, 21), np.int64)
    for i in ids:
        d = load_cams(root / "cams" / f"{i}.npz")
        gt = read_mask(root / "SegmentationClass" / f"{i}.png", 20)
        want += M.cam_sweep_confusions(upsample_cams(d["cams"], gt.shape), d["keys"], gt, 21, (1.0, 2.0))
    best = int(np.argmax([M.mean_iou(c) for c in want]))
    assert res["taus"] == [1.0, 2.0] and res["oracle"] is True and res["failed"] == 0
    assert res["best_tau"] == (1.0, 2.0)[best] and np.array_equal(res["conf"], want[best])
    # a missing CAM file and a missing GT give per-image errors; the rest is still evaluated
    res2 = M.evaluate_cams(ds, ids + ["nope"], root / "cams", bg="const", n_jobs=1, progress=False)
    assert res2["failed"] == 1 and "CAM file not found" in res2["errors"]["nope"] and res2["evaluated"] == 6
    assert len(res2["taus"]) == 12


def test_folder_dataset_with_masks_gives_the_same_numbers(scenes, tmp_path):
    root, ids = scenes
    voc = build_dataset("voc", root)
    labels = {i: [voc.classes.names[c] for c in voc.labels(i)] for i in ids}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "classes.yaml").write_text("classes: [" + ", ".join(voc.classes.names) + "]\n")
    folder = build_dataset("folder", root / "JPEGImages", tmp_path / "classes.yaml", tmp_path / "labels.json",
                           root / "SegmentationClass")
    a = M.evaluate_cams(voc, ids, root / "cams", n_jobs=1, progress=False)
    b = M.evaluate_cams(folder, folder.ids("all"), root / "cams", n_jobs=1, progress=False)
    assert b["failed"] == 0 and np.array_equal(a["conf"], b["conf"]) and a["miou"] == b["miou"]


def test_eval_cli_writes_tables_and_exit_codes(scenes, tmp_path):
    from stages.eval import main

    root, ids = scenes
    split = root / "ImageSets" / "Segmentation" / "train.txt"
    out = tmp_path / "ev"
    args = ["--what", "cams", "--dataset", "voc", "--root", str(root), "--split", str(split), "--cams",
            str(root / "cams"), "--out", str(out), "-j", "1", "--no-progress"]
    assert main(args) == 0
    doc = json.loads((out / "per_class.json").read_text())
    assert len(doc["per_class"]) == 21 and doc["summary"]["best_tau"] in (1.0, 2.0)
    assert "oracle" in doc["summary"]["oracle"] and (out / "per_class.csv").is_file() and (out / "per_class.md").is_file()
    assert not (out / "errors.json").exists()
    (root / "cams" / f"{ids[0]}.npz").rename(tmp_path / "moved.npz")
    try:
        assert main(args) == 1
        assert ids[0] in json.loads((out / "errors.json").read_text())
    finally:
        (tmp_path / "moved.npz").rename(root / "cams" / f"{ids[0]}.npz")


def test_coco_layout_uses_81_classes(tmp_path):
    from pipeline.classes import builtin

    coco = builtin("coco")
    ids = synthetic.make_scenes(tmp_path, 3, (64, 80), seed=3, classes=coco)
    synthetic.make_noisy_cams(tmp_path, tmp_path / "cams", classes=coco, seed=3)
    ds = build_dataset("coco", tmp_path)
    res = M.evaluate_cams(ds, ids, tmp_path / "cams", n_jobs=1, progress=False)
    assert res["failed"] == 0 and res["conf"].shape == (81, 81)
    from pipeline.data.datasets import read_mask

    gt_classes = set()
    for i in ids:
        gt_classes |= set(np.unique(read_mask(tmp_path / "SegmentationClass" / f"{i}.png", 80)).tolist()) - {255}
    assert {int(v) for v in np.nonzero(res["conf"].sum(1))[0]} == gt_classes
