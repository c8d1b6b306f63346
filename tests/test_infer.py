"""Inference: sliding window and multi-scale/flip, the CRF on model probabilities, palette PNG outputs,
and make eval WHAT=model scored with pipeline.eval.metrics."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline import checkpoint as ckpt_io
from pipeline.eval import metrics
from pipeline.labels.crf import CRFParams
from pipeline.data.datasets import build_dataset, read_mask
from pipeline.eval.infer import InferConfig, crf_refine, evaluate_model, msc_logits, tile_starts, window_logits
from pipeline.train.config import load_config
from pipeline.train.loop import train
from seg_helpers import make_data, overrides


class Pointwise(nn.Module):
    """A 1x1 conv: each output pixel depends on its input pixel only (flip- and tile-equivariant)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_tiles_cover_the_image_and_window_equals_whole_image():
    assert tile_starts(100, 40, 30) == [0, 30, 60] and tile_starts(30, 40, 10) == [0]
    model = Pointwise().eval()
    x = torch.randn(1, 3, 70, 95)
    whole = model(x)
    assert torch.allclose(window_logits(model, x, 32, 20, batch_tiles=3), whole, atol=1e-6)
    assert torch.allclose(msc_logits(model, x, InferConfig(scales=(1.0,), flip=True)), whole, atol=1e-6)
    smooth = nn.functional.interpolate(torch.randn(1, 3, 7, 10), size=(70, 95), mode="bilinear")
    two = msc_logits(model, smooth, InferConfig(scales=(1.0, 0.75), flip=True, window=48))
    assert two.shape == whole.shape and (two.argmax(1) == model(smooth).argmax(1)).float().mean() > 0.9


class PatchMean(Pointwise):
    """Patch-resolution 'logits': the mean of each 4 x 4 patch (inputs must be multiples of 4)."""
    patch = 4

    def forward_patch_logits(self, x):
        B, C, H, W = x.shape
        assert H % 4 == 0 and W % 4 == 0
        return x.reshape(B, C, H // 4, 4, W // 4, 4).mean(dim=(3, 5))


def test_average_at_logits_matches_weclips_test_script_by_hand():
    x = torch.randn(1, 3, 22, 30)
    cfg = InferConfig(scales=(1.0, 0.5), flip=True, average_at="logits")
    got = msc_logits(PatchMean(), x, cfg)

    def pooled(a):                                   # 4 x 4 patch means, remainder rows / columns dropped
        h, w = a.shape[-2] // 4, a.shape[-1] // 4
        return torch.stack([torch.stack([a[0, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean(dim=(1, 2))
                                         for j in range(w)], dim=-1) for i in range(h)], dim=-2)[None]

    bil = lambda a, size: nn.functional.interpolate(a, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    one = (pooled(x) + pooled(x.flip(-1)).flip(-1)) / 2                      # (1, 3, 5, 7)
    half = nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)   # 11 x 15
    half = (pooled(half) + pooled(half.flip(-1)).flip(-1)) / 2               # (1, 3, 2, 3)
    want = bil((one + bil(half, (5, 7))) / 2, (22, 30))
    assert one.shape[-2:] == (5, 7) and got.shape == (1, 3, 22, 30)
    assert torch.allclose(got, want, atol=1e-6)
    # averaging at the image size instead gives other numbers: bilinear resizes do not compose
    at_image = (bil(one, (22, 30)) + bil(half, (22, 30))) / 2
    assert (at_image - want).abs().max() > 1e-3


def test_average_at_logits_refuses_models_without_patch_logits_and_windows():
    with pytest.raises(ValueError, match="forward_patch_logits"):
        msc_logits(Pointwise(), torch.randn(1, 3, 16, 16), InferConfig(average_at="logits"))
    with pytest.raises(ValueError, match="window: null"):
        InferConfig(average_at="logits", window=32)
    with pytest.raises(ValueError, match="average_at"):
        InferConfig(average_at="patch")


def test_crf_on_blurred_probabilities_recovers_edges():
    H, W = 60, 80
    gt = np.zeros((H, W), np.int64)
    gt[15:45, 20:60] = 1
    image = np.where(gt[..., None] == 1, [200, 40, 40], [40, 120, 60]).astype(np.uint8)
    import cv2

    fg = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), 6)
    fg = np.roll(fg, 5, axis=1)  # blurred and shifted, like an upsampled 1/16 prediction
    probs = np.stack([1 - fg, fg]).clip(0.02, 0.98)
    before = (probs.argmax(0) == gt).mean()
    for model in ("deeplabv2", "weclip"):
        cfg = InferConfig.from_dict({"crf": True}, model=model)
        q = crf_refine(image, probs, *cfg.crf_setup(), backend="torch")
        after = (q.argmax(0) == gt).mean()
        assert after > before + 0.02 and after > 0.97
    # defaults by model family: deeplab-pytorch's CRF (wrapped guide) for DeepLab, WeCLIP's (RGB guide) for WeCLIP
    assert InferConfig.from_dict({}, model="deeplabv3plus").crf_setup() == (CRFParams(10, 1, 3, 67, 3, 4), "wrapped")
    assert InferConfig.from_dict({}, model="weclip").crf_setup() == (CRFParams(10, 3, 3, 64, 5, 4), "rgb")
    assert InferConfig.from_dict({"crf_preset": "excel"}, model="weclip").crf_setup()[1] == "rgb"
    with pytest.raises(ValueError, match="unknown CRF preset"):
        InferConfig(crf_preset="dcrf")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = make_data(tmp_path_factory.mktemp("infer"), 16, 3, size=(96, 128), seed=3)
    cfg = load_config(None, overrides(d, **{"model.name": "deeplabv2", "model.layers": "[1,1,1,1]",
                                            "model.base_width": 8, "model.freeze_bn": "false", "optim.lr": 1e-3,
                                            "schedule.iters": 40, "data.crop": 64, "train.batch_size": 4,
                                            "infer.scales": "[1.0, 0.75]", "infer.window": 80}))
    run = tmp_path_factory.mktemp("run")
    train(cfg, run, progress=False, tensorboard=False, log=lambda *_: None)
    return d, run


def test_evaluate_model_scores_with_pipeline_metrics_and_writes_palette_pngs(trained, tmp_path):
    d, run = trained
    ds = build_dataset("voc", d["root"], d["classes"])
    res = evaluate_model(run, ds, d["val_ids"], out_dir=tmp_path / "pred", device="cpu", progress=False)
    assert res["evaluated"] == 3 and res["failed"] == 0 and res["infer"]["scales"] == (1.0, 0.75)
    conf = np.zeros((5, 5), np.int64)
    for i in d["val_ids"]:
        with Image.open(tmp_path / "pred" / f"{i}.png") as im:
            assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]  # VOC palette
            pred = np.asarray(im)
        gt = read_mask(ds.mask_path(i), 4)
        assert pred.shape == gt.shape and set(np.unique(pred)) <= set(range(5))
        conf += metrics.confusion_matrix(pred, gt, 5)
    assert np.array_equal(conf, res["conf"]) and res["miou"] == pytest.approx(metrics.mean_iou(conf))
    crf = evaluate_model(run, ds, d["val_ids"][:1], infer={"crf": True, "scales": [1.0], "crf_backend": "torch"},
                         device="cpu", progress=False)
    assert crf["infer"]["crf"] and crf["evaluated"] == 1
    assert crf["infer"]["crf_preset"] == "deeplab" and crf["infer"]["crf_backend"] == "torch"


def test_cli_predict_and_evaluate_model(trained, tmp_path):
    from stages import evaluate_model as ev
    from stages import predict

    d, run = trained
    common = ["--dataset", "voc", "--root", str(d["root"]), "--classes", str(d["classes"]), "--split", str(d["val"]),
              "--checkpoint", str(run), "--no-progress", "--device", "cpu"]
    assert predict.main(common + ["--out", str(tmp_path / "p"), "--scales", "1.0", "--no-flip"]) == 0
    assert sorted(p.stem for p in (tmp_path / "p").glob("*.png")) == sorted(d["val_ids"])
    assert predict.main(common + ["--out", str(tmp_path / "c"), "--scales", "1.0", "--no-flip", "--crf",
                                  "--crf-backend", "torch", "--crf-preset", "weclip", "--no-overlays"]) == 0
    infer = json.loads((tmp_path / "c" / "manifest.json").read_text())["config"]["infer"]
    assert (infer["crf"], infer["crf_backend"], infer["crf_preset"], infer["crf_params"]) == (True, "torch", "weclip", None)
    assert ev.main(common + ["--out", str(tmp_path / "e")]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["images"] == 3 and 0 <= summary["miou"] <= 100
    # a checkpoint for 5 classes cannot evaluate a 21-class dataset
    voc21 = ["--classes", "data/voc.yaml"]
    assert ev.main(common[:4] + voc21 + common[6:] + ["--out", str(tmp_path / "x")]) == 2


def test_evaluate_model_refuses_a_stale_folder_before_predicting(trained, tmp_path, monkeypatch, capsys):
    """A second evaluation with other settings into the same folder fails at once with the stale-output
    message: no model is loaded and no image predicted, and the first tables stay as they were."""
    from stages import evaluate_model as ev

    d, run = trained
    common = ["--dataset", "voc", "--root", str(d["root"]), "--classes", str(d["classes"]), "--split", str(d["val"]),
              "--checkpoint", str(run), "--no-progress", "--device", "cpu", "--out", str(tmp_path / "e")]
    assert ev.main(common + ["--scales", "1.0", "--no-flip"]) == 0
    before = (tmp_path / "e" / "per_class.csv").read_bytes()
    calls = []

    def must_not_run(*a, **k):
        calls.append(a)
        raise AssertionError("the evaluation started although its folder is refused")

    for name in ("load_model", "predict_split", "predict_image"):
        monkeypatch.setattr(f"pipeline.eval.infer.{name}", must_not_run)
    capsys.readouterr()
    assert ev.main(common + ["--scales", "1.0,0.75", "--no-flip"]) == 2
    err = capsys.readouterr().err
    assert "holds outputs made with a different configuration" in err and "infer.scales" in err and "--overwrite" in err
    assert not calls and (tmp_path / "e" / "per_class.csv").read_bytes() == before
    # the same settings again are not refused (the manifest records what the evaluation ran with)
    monkeypatch.undo()
    assert ev.main(common + ["--scales", "1.0", "--no-flip"]) == 0


def test_checkpoint_for_other_classes_is_refused(trained, tmp_path):
    d, run = trained
    ck = ckpt_io.load(run)
    ck["meta"]["class_names"] = ["background", "x", "y", "z", "w"]
    ckpt_io.save(tmp_path / "c.pt", {k: v for k, v in ck.items() if k not in ("format", "path")})
    ds = build_dataset("voc", d["root"], d["classes"])
    with pytest.raises(ckpt_io.CheckpointMismatch, match="c.pt"):
        evaluate_model(tmp_path / "c.pt", ds, d["val_ids"], device="cpu", progress=False)
    with pytest.raises(ValueError, match="forward_patch_logits"):   # DeepLab has no patch logits: one clear error
        evaluate_model(run, ds, d["val_ids"], device="cpu", progress=False,
                       infer={"average_at": "logits", "window": None})


def test_predict_cli_on_a_plain_image_folder(trained, tmp_path):
    """make predict IMAGES=folder: no dataset, labels or class list needed; PNGs and overlays."""
    from pipeline.data.labelio import read_label
    from stages.predict import main as predict_main

    _, run = trained
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (33, 47, 3), dtype=np.uint8)).save(folder / "sub" / "b.png")
    out = tmp_path / "pred"
    assert predict_main(["--checkpoint", str(run), "--images", str(folder), "--out", str(out), "--no-progress",
                         "--device", "cpu"]) == 0
    assert read_label(out / "a.png").shape == (40, 52) and read_label(out / "sub" / "b.png").shape == (33, 47)
    assert Image.open(out / "overlay" / "a.jpg").size == (52, 40)
