"""The PyTorch dense CRF: its lattice, agreement with pydensecrf, batching, dtypes, presets and guide order,
the backend choice, the resolution cap, and bad inputs."""
import numpy as np
import pytest
import torch

from pipeline.labels import crf
from pipeline.data import synthetic
from pipeline.data.camfile import upsample_cams
from pipeline.labels.crf import permutohedral, torch_backend


pytestmark = pytest.mark.usefixtures("one_thread")


def scene(seed, size, labels):
    """RGB image, keys, full-resolution float16 CAMs (as the reference's CAM files hold them)."""
    img, keys, cams = synthetic.scene_with_cams(np.random.default_rng(seed), size, labels)
    return img, keys, upsample_cams(cams, size)


def marginals(img, cams, params, guide, backend):
    """Written out without ``crf.refine``: fp16 background row and unary, then the backend's Q."""
    probs = np.concatenate([np.float16(1) - cams.max(0, keepdims=True), cams])
    u = -np.log(np.clip(probs, np.float16(1e-5), np.float16(1))).astype(np.float32).reshape(len(probs), -1)
    guide_img = {"wrapped": crf.wrapped_guide(img), "rgb": np.ascontiguousarray(img)}[guide]
    return crf.dense_crf(u, guide_img, params, backend=backend)


def test_lattice_weights_are_barycentric_and_vertices_distinct():
    f = torch.tensor(np.random.default_rng(0).uniform(-20, 20, (500, 5)), dtype=torch.float32)
    lat = permutohedral.build(f)
    assert lat.weights.shape == (500, 6) and (lat.weights >= -1e-6).all()
    torch.testing.assert_close(lat.weights.sum(1), torch.ones(500), atol=1e-5, rtol=0)
    # the d+1 vertices of a point's simplex are distinct lattice points, and row 0 (empty) is never used
    assert (lat.offsets.sort(1).values.diff(1) > 0).all() and (lat.offsets > 0).all()
    # blur neighbours are symmetric: if b is a's n1 along direction j, a is b's n2
    for j in range(6):
        n1, n2 = lat.blur[j, 0], lat.blur[j, 1]
        has = n1[1:] > 0
        rows = torch.arange(1, lat.vertices + 1)[has]
        assert torch.equal(n2[n1[rows]], rows)


def test_filter_approximates_a_gaussian_of_the_features():
    # 1-D features on a fine grid: the lattice filter of a unit impulse is a bump centred on it,
    # decaying with distance, symmetric to lattice accuracy
    x = torch.arange(0, 40, 0.25).view(-1, 1)
    lat = permutohedral.build(x)
    v = torch.zeros(len(x), 1)
    v[80] = 1
    out = lat.filter(v)[:, 0]
    assert out.argmax() == 80 and out[80] > 0
    assert out[80 + 20] < 0.2 * out[80] and out[80 + 40] < 1e-3 * out[80]  # 5 and 10 feature units away
    assert abs(float(out[78] - out[82])) < 0.2 * float(out[80])


def test_agrees_with_pydensecrf_clipes_and_weclip_2_to_21_labels():
    pytest.importorskip("pydensecrf.densecrf", reason="the agreement test compares with pydensecrf")
    cases = [("clipes", 1, 0), ("clipes", 4, 1), ("clipes", 10, 2), ("clipes", 20, 3),
             ("weclip", 2, 4), ("weclip", 13, 5)]
    arg_same = conf_same = total = 0
    for name, labels, seed in cases:
        img, keys, cams = scene(seed, (120, 160), labels)
        p = crf.PRESETS[name]
        q_ref = marginals(img, cams, p.params, p.guide, "pydensecrf")
        q = marginals(img, cams, p.params, p.guide, "torch")
        assert q.shape == q_ref.shape == (labels + 1, 120, 160)
        a = (q.argmax(0) == q_ref.argmax(0)).mean()
        c = ((q.max(0) >= 0.95) == (q_ref.max(0) >= 0.95)).mean()
        assert a >= 0.98 and c >= 0.98, (name, labels, a, c)
        arg_same, conf_same, total = arg_same + a * q.shape[1] * q.shape[2], conf_same + c * q[0].size, total + q[0].size
        assert np.abs(q - q_ref).max() < 1e-3  # same lattice, same operation order: float rounding only
    assert arg_same / total >= 0.995 and conf_same / total >= 0.995


def test_batch_equals_images_one_at_a_time_and_float64_matches():
    rng = np.random.default_rng(7)
    B, C, H, W = 3, 4, 24, 32
    u = torch.tensor(rng.uniform(0, 5, (B, C, H, W)), dtype=torch.float32)
    g = torch.tensor(rng.integers(0, 256, (B, H, W, 3)), dtype=torch.uint8)
    params = crf.CRFParams(iters=5)
    batch = torch_backend.dense_crf(u, g, params)
    for b in range(B):  # each image in its own group: no messages between images
        torch.testing.assert_close(batch[b], torch_backend.dense_crf(u[b:b + 1], g[b:b + 1], params)[0],
                                   atol=1e-6, rtol=0)
    q64 = torch_backend.dense_crf(u.double(), g, params)
    assert q64.dtype == torch.float64
    torch.testing.assert_close(q64.float(), batch, atol=1e-5, rtol=0)


def test_no_pairwise_terms_gives_softmax_of_minus_unary():
    rng = np.random.default_rng(2)
    u = rng.uniform(0, 3, (3, 6 * 9)).astype(np.float32)
    guide = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    q = crf.dense_crf(u, guide, crf.CRFParams(iters=3, pos_w=0, bi_w=0), backend="torch")
    e = np.exp(-u - (-u).max(0))
    np.testing.assert_allclose(q, (e / e.sum(0)).reshape(3, 6, 9), atol=1e-6)


def test_presets_and_guide_channel_order_changes_labels():
    assert crf.PRESETS["clipes"].guide == crf.PRESETS["deeplab"].guide == "wrapped"
    assert crf.PRESETS["weclip"].guide == crf.PRESETS["excel"].guide == "rgb"
    assert crf.PRESETS["weclip"].params == crf.CRFParams(10, 3.0, 3.0, 64.0, 5.0, 4.0)
    assert crf.PRESETS["clipes"].params == crf.CRFParams(10, 1.0, 3.0, 67.0, 3.0, 4.0)
    with pytest.raises(ValueError, match="unknown CRF preset"):
        crf.preset("densecrf")
    img, keys, cams = scene(11, (96, 128), 3)
    probs = crf.background_probs(cams)
    p = crf.PRESETS["weclip"].params
    rgb = crf.crf_scores(img, probs, p, guide="rgb", backend="torch").argmax(0)
    bgr = crf.crf_scores(img, probs, p, guide="plain", backend="torch").argmax(0)
    assert (rgb != bgr).any()  # the lattice is not symmetric in the feature dimensions
    assert np.array_equal(crf.guide_image(img, "rgb"), img) and np.array_equal(crf.guide_image(img, "plain"),
                                                                                 img[..., ::-1])


def test_backend_choice(monkeypatch):
    assert crf.resolve_backend("torch", "cpu") == "torch"
    assert crf.resolve_backend("auto", "cuda:0") == "torch"
    with pytest.raises(ValueError, match="unknown CRF backend"):
        crf.resolve_backend("gpu")
    monkeypatch.setattr("pipeline.labels.crf.pydensecrf_backend.available", lambda: False)
    notes = []
    assert crf.resolve_backend("auto", "cpu", log=notes.append) == "torch"
    assert "pydensecrf is not installed" in notes[0]
    with pytest.raises(ValueError, match="pip install pydensecrf2"):
        crf.resolve_backend("pydensecrf", "cpu")
    monkeypatch.setattr("pipeline.labels.crf.pydensecrf_backend.available", lambda: True)
    assert crf.resolve_backend("auto", "cpu") == "pydensecrf"


def test_large_image_runs_at_the_capped_resolution():
    img, keys, cams = scene(5, (240, 320), 2)
    probs = crf.background_probs(cams)
    assert crf.capped_size(240, 320, 20000) == (122, 163)
    q = crf.crf_scores(img, probs, guide="wrapped", backend="torch", max_pixels=20000)
    assert q.shape == (3, 122, 163)
    capped = crf.refine(img, keys, cams, backend="torch", max_pixels=20000, confidence="none")
    full = crf.refine(img, keys, cams, backend="torch", max_pixels=None, confidence="none")
    assert capped.shape == full.shape == (240, 320)
    assert (capped == full).mean() > 0.95  # the same smoothing, at a quarter of the pixels


def test_bad_inputs_get_clear_errors():
    img = np.zeros((4, 5, 3), np.uint8)
    cams = np.full((1, 4, 5), 0.5, np.float16)
    with pytest.raises(ValueError, match="NaN or Inf"):
        crf.refine(img, np.array([0]), np.where(np.eye(4, 5, dtype=bool), np.nan, cams).astype(np.float16))
    with pytest.raises(ValueError, match=">= 0"):
        crf.unary_energy(np.full((2, 4, 5), -0.1, np.float32))
    with pytest.raises(ValueError, match="at least one"):
        crf.refine(img, np.zeros(0, np.int64), np.zeros((0, 4, 5), np.float16))
    u = np.ones((2, 20), np.float32)
    with pytest.raises(ValueError, match="uint8"):
        crf.dense_crf(u, img.astype(np.float32), backend="torch")
    with pytest.raises(ValueError, match="does not match guide"):
        crf.dense_crf(u, np.zeros((5, 5, 3), np.uint8), backend="torch")
    with pytest.raises(ValueError, match="NaN or Inf"):
        crf.dense_crf(np.full((2, 20), np.inf, np.float32), img, backend="torch")
    with pytest.raises(ValueError, match="at least one"):
        torch_backend.dense_crf(torch.zeros(1, 0, 4, 5), torch.zeros(1, 4, 5, 3, dtype=torch.uint8), crf.CRFParams())
    with pytest.raises(ValueError, match="uint8"):
        torch_backend.dense_crf(torch.zeros(1, 2, 4, 5), torch.zeros(1, 4, 5, 3), crf.CRFParams())
