"""CAMs: parity with the per-class reference computation, batching, affinity and box rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.labels import affinity
from pipeline.labels.affinity import sinkhorn, transition_matrix
from pipeline.cams.gradcam import CAMConfig, CAMEngine, class_scores, gradcam
from pipeline.classes import builtin
from pipeline.clip.model import load_clip, read_state_dict
from pipeline.clip.random import VIT_B_16, random_clip, save_clip
from reference import ReferenceCLIP, reference_cams, reference_text, scoremap2bbox


@pytest.fixture(scope="module")
def tiny(tiny_clip_path):
    model = load_clip(tiny_clip_path)
    ref = ReferenceCLIP(read_state_dict(tiny_clip_path))
    voc = builtin("voc")
    return model, ref, voc, CAMEngine(model, voc), reference_text(ref, list(voc.prompts) + list(voc.background), voc.template)


# 64x304 has exactly 76 patches: the reference runs block 12 twice there (CLIP-ES's clip/model.py)
@pytest.mark.parametrize("size,labels", [((96, 128), [14, 8, 3]), ((160, 96), [0]), ((64, 304), [7, 11]),
                                         ((32, 48), [19, 4])])
def test_matches_reference_per_class_loop(tiny, size, labels):
    model, ref, voc, engine, ref_text = tiny
    torch.manual_seed(sum(size))
    x = torch.randn(1, 3, *size)
    assert torch.allclose(engine.text[0], ref_text, atol=1e-5)
    got = engine(x, [labels])[0]
    want_cams, want_init = reference_cams(ref, x, labels, ref_text, voc.num_classes, voc.box_threshold)
    assert got.cams.shape == got.init.shape == (len(labels), size[0] // 16, size[1] // 16)
    np.testing.assert_allclose(got.init, want_init, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.cams, want_cams, atol=1e-4, rtol=0)
    assert got.cams.dtype == np.float32 and got.init.max() < 1.0


def test_fixed_mode_runs_block12_once_for_76_patches_and_draws_whole_boxes(tiny):
    model, ref, voc, _, ref_text = tiny
    x = torch.randn(1, 3, 64, 304)
    fixed = CAMEngine(model, voc, CAMConfig(exact=False))(x, [[7]])[0]
    exact = CAMEngine(model, voc, CAMConfig(exact=True))(x, [[7]])[0]
    ref.full_depth_tokens = -1  # the reference without its bugs (block 12 twice, clipped boxes)
    try:
        want, _ = reference_cams(ref, x, [7], ref_text, voc.num_classes, voc.box_threshold, clip_boxes=False)
    finally:
        ref.full_depth_tokens = 77
    np.testing.assert_allclose(fixed.cams, want, atol=1e-4, rtol=0)
    assert np.abs(fixed.cams - exact.cams).max() > 1e-3


@pytest.mark.slow
def test_real_vit_b16_shapes_match_reference(tmp_path):
    """Random weights of the true ViT-B/16 shapes, loaded from an OpenAI-style archive.

    Random attention is nearly uniform, so A^2 smooths every refined map to almost a constant and
    the final min-max divides by a range ~1e-3 of its mean: float32 rounding (in either
    implementation) is amplified to ~1e-3 there. Float64 removes that noise and shows the two
    computations are the same to 1e-6; float32 is checked for correlation and GradCAM to 1e-4.
    """
    path = save_clip(random_clip(VIT_B_16, seed=1), tmp_path / "ViT-B-16.pt")
    voc = builtin("voc")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 128, 176)
    labels = [14, 8, 3]
    for dtype in (torch.float64, torch.float32):
        model, ref = load_clip(path, dtype=dtype), ReferenceCLIP(read_state_dict(path)).to(dtype)
        engine = CAMEngine(model, voc)
        ref_text = reference_text(ref, list(voc.prompts) + list(voc.background), voc.template)
        assert torch.nn.functional.cosine_similarity(engine.text[0], ref_text).min() >= 0.9999
        got = engine(x.to(dtype), [labels])[0]
        want_cams, want_init = reference_cams(ref, x.to(dtype), labels, ref_text, 20, 0.4)
        np.testing.assert_allclose(got.init, want_init, atol=1e-4 if dtype == torch.float32 else 1e-6, rtol=0)
        if dtype == torch.float64:
            np.testing.assert_allclose(got.cams, want_cams, atol=1e-6, rtol=0)
        else:
            for a, b in zip(got.cams, want_cams):
                assert np.abs(a - b).max() < 3e-3
                if b.std() > 0:
                    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9999


def test_batch_equals_single_images_and_uses_one_backward(tiny, monkeypatch):
    model, _, voc, engine, _ = tiny
    torch.manual_seed(1)
    x = torch.randn(3, 3, 80, 112)
    labels = [[1, 2, 3], [14], [5, 6]]
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    batched = engine(x, labels)
    assert len(calls) == 1, "all classes of all images must share one backward pass"
    for b in range(3):
        single = engine(x[b:b + 1], [labels[b]])[0]
        np.testing.assert_allclose(batched[b].cams, single.cams, atol=1e-4, rtol=0)
        np.testing.assert_allclose(batched[b].init, single.init, atol=1e-4, rtol=0)


def test_class_scores_match_per_image_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 20 + 5)
    labels = [[3, 1], [7]]
    got = class_scores(logits, labels, 20)
    for b, lab in enumerate(labels):
        want = torch.cat([logits[b, lab], logits[b, 20:]]).softmax(0)[: len(lab)]
        assert torch.allclose(got[b, : len(lab)], want)
    assert got[1, 1] == 0


@pytest.mark.parametrize("grid,d", [((5, 7), 768), ((24, 32), 768), ((3, 3), 100)])
def test_gradcam_fp16_host_arithmetic_is_bit_exact(grid, d):
    """CLIP-ES's pytorch_grad_cam GradCAM on fp16 tensors: numpy run on arrays with the reference's memory layout
    (its reshape_transform of the (L, 1, D) hooked tensor, moved to host without a copy)."""
    g = torch.Generator().manual_seed(d)
    h, w = grid
    L = 1 + h * w
    act = (torch.randn(L, 1, d, generator=g) * 3).half()
    grads = (torch.randn(2, L, 1, d, generator=g) * 1e-2).half()

    def reshape_transform(t):  # as the reference's generate_cams_*.py
        t = t.permute(1, 0, 2)
        return t[:, 1:, :].reshape(1, h, w, d).transpose(2, 3).transpose(1, 2)

    got = gradcam(act[1:, 0], grads[:, 1:, 0], grid, exact=True).numpy()
    A = reshape_transform(act).cpu().detach().numpy()
    for k in range(2):
        G = reshape_transform(grads[k]).cpu().detach().numpy()
        weights = np.mean(G, axis=(2, 3))
        cam = (weights[:, :, None, None] * A).sum(axis=1)
        assert cam.dtype == np.float16
        cam = np.maximum(cam, 0).astype(np.float32)
        for _ in range(2):
            cam = cam - np.min(cam)
            cam = cam / (1e-7 + np.max(cam))
        np.testing.assert_array_equal(got[k], cam[0])


def test_sinkhorn_column_first_three_rounds():
    w = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) + 0.1
    d = w.clone()
    for _ in range(3):
        d = d / d.sum(0, keepdim=True)
        d = d / d.sum(1, keepdim=True)
    assert torch.allclose(sinkhorn(w), d)
    assert torch.allclose(sinkhorn(w).sum(1), torch.ones(6), atol=1e-6)
    s = (d + d.t()) / 2
    assert torch.allclose(transition_matrix(w), s @ s)


def box_mask(cam: np.ndarray, threshold: float, exact: bool = True) -> np.ndarray:
    """One (h, w) map through the batched tensor function."""
    return affinity.box_masks(torch.from_numpy(cam)[None], threshold, exact)[0].numpy()


def reference_box_mask(cam: np.ndarray, threshold: float, clip_boxes: bool = True) -> np.ndarray:
    """The reference's boxes (``reference.scoremap2bbox``) filled as its generate_cams script fills them."""
    mask = np.zeros(cam.shape, np.float32)
    boxes, n = scoremap2bbox(cam, threshold, clip_boxes)
    for x0, y0, x1, y1 in boxes[:n]:
        mask[y0:y1, x0:x1] = 1
    return mask


def test_box_mask_rules():
    cam = np.zeros((6, 8), np.float32)
    cam[1:3, 2:5] = 0.9999999  # double min-max keeps the max below 1: uint8 max 254
    cam[3, 2] = 101 / 255 + 1e-4  # u = 101 = int(0.4 * 254): strict '>' leaves it out
    assert (cam * 255).astype(np.uint8).max() == 254
    m = box_mask(cam, 0.4)
    want = np.zeros_like(m)
    want[1:3, 2:5] = 1
    np.testing.assert_array_equal(m, want)
    # a box reaching the last row/column is clipped to size-1 and filled half-open
    edge = np.zeros((4, 4), np.float32)
    edge[2:, 2:] = 0.99
    em = box_mask(edge, 0.4)
    assert em[2, 2] == 1 and em[3].sum() == 0 and em[:, 3].sum() == 0
    whole = box_mask(edge, 0.4, exact=False)                  # the fix: the box reaches the grid's edge
    assert whole[2:, 2:].all() and whole.sum() == 4
    np.testing.assert_array_equal(box_mask(cam, 0.4, exact=False), m)   # boxes inside the grid are unchanged
    assert box_mask(np.zeros((4, 4), np.float32), 0.4).sum() == 0
    # nested contours (RETR_TREE): a ring's hole yields its own box, as in the reference
    ring = np.zeros((9, 9), np.float32)
    ring[1:8, 1:8] = 0.9
    ring[3:6, 3:6] = 0.0
    assert scoremap2bbox(ring, 0.4)[1] == 2
    np.testing.assert_array_equal(box_mask(ring, 0.4), reference_box_mask(ring, 0.4))
    # diagonal neighbours are one component (OpenCV's contours are 8-connected): one box, not two
    diag = np.zeros((5, 5), np.float32)
    diag[1, 1] = diag[2, 2] = 0.9
    assert scoremap2bbox(diag, 0.4)[1] == 1
    np.testing.assert_array_equal(box_mask(diag, 0.4), reference_box_mask(diag, 0.4))


@pytest.mark.parametrize("exact", [True, False])
def test_batched_box_masks_equal_the_references_opencv_boxes(exact):
    """Many maps at once, on smooth blobs, noisy maps (many small components, nested ones, snakes) and
    flat ones, at three thresholds and several grid shapes, against the reference's per-map OpenCV rule."""
    rng = np.random.default_rng(0)
    for h, w in ((20, 20), (7, 13), (1, 6), (24, 32)):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        maps = []
        for _ in range(24):
            blobs = sum(rng.uniform(0.2, 1) * np.exp(-((yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2)
                                                     / (2 * rng.uniform(0.5, 4) ** 2)) for _ in range(rng.integers(1, 5)))
            maps.append(blobs + rng.uniform(0, 0.6) * rng.random((h, w)))
        maps.append(rng.random((h, w)))                          # pure noise: many components
        maps.append(np.zeros((h, w)))                            # nothing fires: empty mask
        maps.append(np.full((h, w), 0.5))                        # flat: nothing above int(t * max)
        maps = np.stack([(m - m.min()) / (1e-7 + (m - m.min()).max()) for m in maps]).astype(np.float32)
        for t in (0.4, 0.79, 0.88):
            got = affinity.box_masks(torch.from_numpy(maps).view(3, -1, h, w), t, exact)
            assert got.shape == (3, len(maps) // 3, h, w) and got.dtype == torch.float32
            want = np.stack([reference_box_mask(m, t, clip_boxes=exact) for m in maps])
            np.testing.assert_array_equal(got.reshape(-1, h, w).numpy(), want, err_msg=f"{h}x{w} t={t}")
            f64 = affinity.box_masks(torch.from_numpy(maps.astype(np.float64)), t, exact)
            np.testing.assert_array_equal(f64.numpy(), np.stack([reference_box_mask(m.astype(np.float64), t, exact)
                                                                 for m in maps]))


def _snake(h, w):
    """A one-pixel path that runs along every other row, turning at alternate ends."""
    g = np.zeros((h, w), bool)
    g[::2] = True
    for i in range(1, h, 2):
        g[i, w - 1 if i % 4 == 1 else 0] = True
    return g


def _spiral(n):
    """A one-pixel square spiral winding inwards (its path is about n²/2 long): walk ahead, turn right
    when the next cell or the one after it is taken or off the grid, stop when both ways are shut."""
    def free(y, x, dy, dx):
        inside = 0 <= y + dy < n and 0 <= x + dx < n
        beyond = 0 <= y + 2 * dy < n and 0 <= x + 2 * dx < n
        return inside and not g[y + dy, x + dx] and not (beyond and g[y + 2 * dy, x + 2 * dx])

    g = np.zeros((n, n), bool)
    y, x, dy, dx = 0, 0, 0, 1
    while True:
        g[y, x] = True
        if not free(y, x, dy, dx):
            dy, dx = dx, -dy
            if not free(y, x, dy, dx):
                return g
        y, x = y + dy, x + dx


def test_components_of_long_paths_rings_and_noise_in_fixed_rounds():
    """The box masks' connected components run a fixed number of rounds, set by the grid size: enough
    for the longest paths a grid holds (snakes both ways, spirals), rings around holes, diagonal-only
    links, combs and noise, against scipy's 8-connected labelling."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    shapes = []
    for h, w in ((1, 9), (9, 1), (2, 2), (7, 13), (20, 20), (24, 32), (45, 45)):
        ring = np.zeros((h, w), bool)
        ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
        comb = np.zeros((h, w), bool)
        comb[-1], comb[:, ::2] = True, True
        diagonal = np.add.outer(np.arange(h), np.arange(w)) % 2 == 0
        shapes += [_snake(h, w), _snake(h, w)[::-1, ::-1], _snake(w, h).T, ring, comb, comb[::-1], diagonal,
                   np.ones((h, w), bool), np.zeros((h, w), bool)] + [rng.random((h, w)) < p for p in (0.4, 0.6)]
    shapes += [_spiral(n)[::s, ::s] for n in (9, 20, 31, 45) for s in (1, -1)]
    for g in shapes:
        labels, k = ndimage.label(g, structure=np.ones((3, 3)))
        ids = np.arange(1, g.size + 1).reshape(g.shape)
        want = np.zeros(g.shape, np.int64)
        for c in range(1, k + 1):                            # every component carries its largest 1-based index
            want[labels == c] = ids[labels == c].max()
        got = affinity._components(torch.from_numpy(g.copy())[None])[0].numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"{g.shape}")


def test_refine_masks_columns_only():
    trans = torch.rand(4, 4)
    cams = torch.tensor([[[0.2, 1.0], [0.5, 0.0]]])
    masks = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    r = affinity.refine(trans, cams, masks)
    raw = trans[:, 1] * 1.0  # only column 1 survives; every row still receives mass
    want = (raw - raw.min()) / (1e-7 + (raw - raw.min()).max())
    assert torch.allclose(r.flatten(), want, atol=1e-6)
