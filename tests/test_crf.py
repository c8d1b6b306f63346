"""Dense CRF math (CLIP-ES's eval_cam_with_crf.py): guide image, probabilities, unary, marginals, labels,
confidence rules."""
import math

import numpy as np
import pytest

from pipeline.labels import crf


def test_wrapped_guide_matches_reference_example_and_channel_order():
    # RGB pixel (R=200, G=116, B=100): BGR minus mean = (-4.008, -0.669, 77.325) -> trunc -> (-4, 0, 77) -> wrap.
    img = np.array([[[200, 116, 100]]], np.uint8)
    assert crf.wrapped_guide(img).tolist() == [[[252, 0, 77]]]


def test_wrapped_guide_emulates_c_truncation_and_modulo_for_every_value():
    v = np.arange(256, dtype=np.uint8)
    img = np.stack([v, v, v], axis=-1)[None]  # (1, 256, 3), R = G = B = v
    got = crf.wrapped_guide(img)[0]
    for ch, mean in enumerate(crf.BGR_MEAN):  # guide is BGR: channel ch of the guide subtracts BGR_MEAN[ch]
        want = [int(float(np.float32(x) - np.float32(mean))) % 256 for x in range(256)]  # int() truncates
        assert got[:, ch].tolist() == want
    assert got.flags.c_contiguous and got.dtype == np.uint8


def test_plain_guide_is_bgr_copy_rgb_guide_is_the_image_and_unknown_guide_rejected():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    g = crf.guide_image(img, "plain")
    assert np.array_equal(g, img[..., ::-1]) and g.flags.c_contiguous
    assert np.array_equal(crf.guide_image(img, "rgb"), img)
    with pytest.raises(ValueError, match="unknown guide"):
        crf.guide_image(img, "fancy")
    with pytest.raises(ValueError, match="uint8"):
        crf.guide_image(img.astype(np.float32), "plain")


def test_background_row_and_dtype():
    cams = np.array([[[0.2, 0.9]], [[0.6, 0.1]]], np.float16)  # (K=2, 1, 2)
    p = crf.background_probs(cams)
    assert p.dtype == np.float16 and p.shape == (3, 1, 2)
    assert p[0].tolist() == [[np.float16(1) - np.float16(0.6), np.float16(1) - np.float16(0.9)]]
    assert np.array_equal(p[1:], cams)
    p2 = crf.background_probs(cams, power=2)
    assert np.allclose(p2[0].astype(np.float32), (1 - np.array([[0.6, 0.9]], np.float32)) ** 2, atol=1e-3)


def test_unary_exact_float16_values():
    # -log(clip(P, 1e-5, 1)) rounded to float16 (clip bound itself is float16: 1.0013580322265625e-05).
    p = np.array([0.5, 0.0, 1.0, 0.25], np.float16).reshape(4, 1, 1)
    u = crf.unary_energy(p)
    assert u.dtype == np.float32 and u.shape == (4, 1) and u.flags.c_contiguous
    assert u[:, 0].tolist() == [0.693359375, 11.5078125, 0.0, 1.38671875]
    # float32 input is not rounded to float16
    assert crf.unary_energy(p.astype(np.float32))[0, 0] == pytest.approx(-math.log(0.5), abs=1e-7)


def test_unary_layout_is_row_major_and_matches_pydensecrf_utils():
    unary_from_softmax = pytest.importorskip("pydensecrf.utils", reason="compares with pydensecrf's helper").unary_from_softmax
    rng = np.random.default_rng(1)
    p = rng.random((3, 4, 5)).astype(np.float16)
    u = crf.unary_energy(p)
    assert u.shape == (3, 20)
    assert u[1, 2 * 5 + 3] == np.float32(-np.log(np.clip(p[1, 2, 3], np.float16(1e-5), np.float16(1))))
    assert np.array_equal(u, unary_from_softmax(p))


def test_crf_without_pairwise_terms_is_softmax_of_minus_unary():
    rng = np.random.default_rng(2)
    H, W, C = 6, 9, 3
    u = rng.uniform(0, 3, (C, H * W)).astype(np.float32)
    guide = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    q = crf.dense_crf(u, guide, crf.CRFParams(iters=5, pos_w=0, bi_w=0))
    e = np.exp(-u - (-u).max(0))
    assert q.shape == (C, H, W)
    np.testing.assert_allclose(q, (e / e.sum(0)).reshape(C, H, W), atol=1e-5)


def test_crf_smooths_an_uncertain_pixel_towards_its_same_coloured_neighbours():
    # 12x20 image, left half black, right half white. Unary: left = class 1, right = class 0, except one
    # left pixel that mildly prefers class 0. The Gaussian and bilateral terms must flip it to class 1.
    H, W = 12, 20
    guide = np.zeros((H, W, 3), np.uint8)
    guide[:, W // 2:] = 255
    p = np.full((2, H, W), 0.05, np.float32)
    p[1, :, : W // 2] = 0.95
    p[0, :, W // 2:] = 0.95
    p[:, 5, 3] = (0.6, 0.4)
    q = crf.dense_crf(crf.unary_energy(p), guide)
    lab = crf.labels_from_scores(q, np.array([7]))
    assert lab[5, 3] == 8
    assert (lab[:, : W // 2] == 8).all() and (lab[:, W // 2:] == 0).all()


def test_dense_crf_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="does not match guide"):
        crf.dense_crf(np.zeros((2, 10), np.float32), np.zeros((3, 4, 3), np.uint8))


def test_keys_ext_and_argmax_ties_go_to_background_then_first_key():
    assert crf.keys_ext(np.array([14, 2])).tolist() == [0, 15, 3]
    scores = np.array([[[0.5, 0.2, 0.1]], [[0.5, 0.7, 0.6]], [[0.1, 0.7, 0.6]]], np.float32)
    assert crf.labels_from_scores(scores, np.array([14, 2])).tolist() == [[0, 15, 15]]


def test_confidence_rules():
    q = np.array([[[0.96, 0.5, 0.02]], [[0.04, 0.5, 0.98]]], np.float32)
    assert crf.crf_low_confidence(q, 0.95).tolist() == [[False, True, False]]
    # as in the reference, the float32 marginal is compared in float32: exactly 0.95 is kept
    edge = np.array([[[0.95]], [[0.05]]], np.float32)
    assert crf.crf_low_confidence(edge, 0.95).tolist() == [[False]]
    cams = np.array([[[0.97, 0.5, 0.02, 0.1]], [[0.1, 0.3, 0.04, 0.94]]], np.float16)
    # max_c X = (0.97, 0.5, 0.04, 0.94); confident iff max(1 - m, m) >= 0.95
    assert crf.raw_low_confidence(cams, 0.95).tolist() == [[False, True, False, True]]


def test_refine_places_255_exactly_where_the_marginal_is_low():
    rng = np.random.default_rng(3)
    H, W = 16, 24
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    cams = np.clip(rng.random((2, H, W)), 0, 1).astype(np.float16)
    keys = np.array([4, 11])
    q = crf.dense_crf(crf.unary_energy(crf.background_probs(cams)), crf.wrapped_guide(img))
    full = crf.labels_from_scores(q, keys)
    lab = crf.refine(img, keys, cams, conf=0.95)
    low = q.max(0) < 0.95
    assert low.any() and (~low).any()
    assert (lab[low] == 255).all() and np.array_equal(lab[~low], full[~low])
    assert np.array_equal(crf.refine(img, keys, cams, confidence="none"), full)
    raw = crf.refine(img, keys, cams, confidence="raw", conf=0.9)
    assert np.array_equal(raw == 255, crf.raw_low_confidence(cams, 0.9))
    with pytest.raises(ValueError, match="differ in size"):
        crf.refine(img[:-1], keys, cams)
