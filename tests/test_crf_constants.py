"""The dense CRF's settings and rules that no parity test pins: the preset each model family's
inference uses (what ``make predict ... --crf`` runs), the tie rules of the upsampled maximum and of
both confidence rules, and the resolution cap's bound."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.eval.infer import InferConfig, checkpoint_infer_config
from pipeline.labels.crf import capped_size, crf_low_confidence, raw_low_confidence, scores_argmax
from pipeline.train.config import load_config

# (iters, Gaussian sxy, Gaussian compat, bilateral sxy, bilateral srgb, bilateral compat), guide
WECLIP = ((10, 3.0, 3.0, 64.0, 5.0, 4.0), "rgb")        # WeCLIP's test script DenseCRF, RGB image
EXCEL = ((10, 1.0, 3.0, 67.0, 3.0, 4.0), "rgb")         # ExCEL's DenseCRF, RGB image
DEEPLAB = ((10, 1.0, 3.0, 67.0, 3.0, 4.0), "wrapped")   # deeplab-pytorch: BGR minus mean, cast to uint8


def _setup(cfg: InferConfig):
    p, guide = cfg.crf_setup()
    return (p.iters, p.pos_xy, p.pos_w, p.bi_xy, p.bi_rgb, p.bi_w), guide


@pytest.mark.parametrize("family, want", [("weclip", WECLIP), ("excel", EXCEL), ("deeplab", DEEPLAB)])
def test_inference_crf_preset_follows_the_model_family_when_none_is_set(family, want):
    assert _setup(InferConfig.from_dict({"crf": True}, model=family)) == want


@pytest.mark.parametrize("config, family, want", [
    ("configs/weclip_voc.yaml", "weclip", WECLIP), ("configs/weclip-online_voc.yaml", "weclip", WECLIP),
    ("configs/weclip_coco.yaml", "weclip", WECLIP), ("configs/excel_voc.yaml", "excel", EXCEL),
    ("configs/excel_coco.yaml", "excel", EXCEL), ("configs/deeplab_voc.yaml", "deeplab", DEEPLAB),
    ("configs/deeplab_coco.yaml", "deeplab", DEEPLAB)])
def test_a_checkpoints_crf_is_its_methods(config, family, want):
    """The CRF ``--crf`` runs for a checkpoint trained with each shipped config (its stored ``infer``
    section and family, as the training loop writes them into the checkpoint)."""
    cfg = load_config(config)
    meta = {"family": family, "model": cfg["model"], "infer": cfg["infer"], "normalize": cfg["data"]["normalize"]}
    assert _setup(checkpoint_infer_config(meta, {"crf": True})) == want


def test_upsampled_maximum_ties_go_to_the_lowest_channel():
    """CRF marginals of two identical channels tie exactly (two classes with the same CAM, or both
    clipped at the unary floor): at the capped size and upsampled alike, the lowest channel wins, as
    ``np.argmax`` of the upsampled scores does; the maximum is the bilinear (half-pixel) upsampling's."""
    rng = np.random.default_rng(0)
    top = rng.random((4, 5)).astype(np.float32) + 1
    scores = np.stack([top, top, rng.random((4, 5)).astype(np.float32), top])   # channels 0, 1, 3 tie
    for size in ((4, 5), (9, 11)):
        arg, best = scores_argmax(scores, size)
        up = np.stack([cv2.resize(s, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for s in scores])
        assert (arg == 0).all()
        np.testing.assert_array_equal(arg, np.argmax(up, axis=0))
        np.testing.assert_allclose(best, up.max(axis=0), rtol=0, atol=1e-6)
    arg, _ = scores_argmax(scores[1:], (9, 11))
    assert (arg == 0).all()                                     # channels 1 and 3 of the original: the first


def test_confidence_rules_keep_a_pixel_exactly_at_the_threshold():
    """The reference ignores pixels whose confidence is strictly below ``conf`` (``< 0.95``); a pixel at
    exactly the threshold keeps its label under both rules."""
    q = np.array([[[0.5, 0.25]], [[0.5, 0.75]]], np.float32)          # (C=2, 1, 2): max 0.5 and 0.75
    np.testing.assert_array_equal(crf_low_confidence(q, 0.5), [[False, False]])
    np.testing.assert_array_equal(crf_low_confidence(q, 0.75), [[True, False]])
    cams = np.array([[[0.25, 0.5]]], np.float32)                       # max(1 - m, m): 0.75 and 0.5
    np.testing.assert_array_equal(raw_low_confidence(cams, 0.75), [[False, True]])


@pytest.mark.parametrize("max_pixels", [1_000_000, 250_000, 12_345])
def test_capped_size_never_exceeds_the_cap(max_pixels):
    """The documented bound: the CRF of a capped image runs on at most ``max_pixels`` pixels, for sizes
    whose scaled sides end just above an integer (rounding them up would break the bound)."""
    for H in range(900, 1300, 7):
        for W in (1500, 1777, 2048, 3001):
            h, w = capped_size(H, W, max_pixels)
            assert h * w <= max_pixels, (H, W, h, w)
            assert (h + 1) * (w + 1) > max_pixels           # and not needlessly small
    assert capped_size(100, 120, max_pixels) == (100, 120)   # small images keep their size
