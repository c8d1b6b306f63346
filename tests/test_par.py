"""PAR against an independent restatement of AFA's conv-based formulation, and hand-checkable cases."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.labels.par import DILATIONS, RING, affinity, par, ring_offsets


def reference_par(imgs, masks, dilations=(1, 2, 4, 8, 12, 24), num_iter=20):
    """AFA's PAR as published: neighbours by a one-hot 3x3 dilated convolution, everything
    materialised with the 48 neighbours on axis 2."""
    kernel = torch.zeros(8, 1, 3, 3, dtype=imgs.dtype)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        kernel[i, 0, r, c] = 1

    def dilated(x):
        b, c, h, w = x.shape
        out = []
        for d in dilations:
            p = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
            out.append(F.conv2d(p, kernel, dilation=d).view(b, c, -1, h, w))
        return torch.cat(out, dim=2)

    ker = torch.ones(1, 1, 8, 1, 1, dtype=imgs.dtype)
    for i in (0, 2, 5, 7):
        ker[0, 0, i] = math.sqrt(2)
    pos = torch.cat([ker * d for d in dilations], dim=2)
    imgs = F.interpolate(imgs, size=masks.shape[-2:], mode="bilinear", align_corners=True)
    b, c, h, w = imgs.shape
    nb = dilated(imgs)
    rep = imgs.unsqueeze(2).repeat(1, 1, nb.shape[2], 1, 1)
    pos_rep = pos.repeat(b, 1, 1, h, w)
    aff = -((nb - rep).abs() / (torch.std(nb, dim=2, keepdim=True) + 1e-8) / 0.3) ** 2
    aff = aff.mean(dim=1, keepdim=True)
    pos_aff = -(pos_rep / (torch.std(pos_rep, dim=2, keepdim=True) + 1e-8) / 0.3) ** 2
    aff = F.softmax(aff, dim=2) + 0.01 * F.softmax(pos_aff, dim=2)
    for _ in range(num_iter):
        masks = (dilated(masks) * aff).sum(2)
    return masks


@pytest.mark.parametrize("image_size", [(40, 52), (20, 26)])
def test_par_matches_reference(image_size):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, *image_size, generator=g, dtype=torch.float64)
    masks = torch.rand(2, 4, 40, 52, generator=g, dtype=torch.float64)
    ours = par(img, masks)
    ref = reference_par(img, masks)
    assert ours.shape == (2, 4, 40, 52)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_par_batch_independent():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(3, 3, 24, 30, generator=g)
    masks = torch.rand(3, 2, 24, 30, generator=g)
    whole = par(img, masks, iterations=5)
    for b in range(3):
        torch.testing.assert_close(whole[b:b + 1], par(img[b:b + 1], masks[b:b + 1], iterations=5))


def test_constant_map_grows_by_101_percent_per_iteration():
    """Weights sum to 1 + 0.01 for every pixel, so a constant map is scaled by 1.01 each iteration."""
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w = affinity(img)
    assert w.shape == (1, 48, 16, 16)
    torch.testing.assert_close(w.sum(dim=1), torch.full((1, 16, 16), 1.01, dtype=torch.float64))
    out = par(img, torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64), iterations=3)
    torch.testing.assert_close(out, torch.full_like(out, 0.5 * 1.01 ** 3))


def test_colour_edge_stops_propagation():
    """A score on the left half of a two-colour image stays on the left: the colour term dominates."""
    img = torch.zeros(1, 3, 32, 32)
    img[..., 16:] = 1.0
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1.0
    out = par(img, mask)[0, 0].numpy()
    left, right = out[:, :16].mean(), out[:, 16:].mean()
    assert left > 0.9 and right < 0.15 * left
    # without the edge the same score spreads across
    flat = par(torch.zeros(1, 3, 32, 32), mask)[0, 0].numpy()
    assert flat[:, 16:].mean() > 2 * right
    assert np.isfinite(out).all()


def test_neighbours_in_the_references_order():
    """The 48 offsets, made on the device, follow AFA's kernel order (3 x 3 ring row by row, per dilation),
    so the weighted sum adds them in the reference's order."""
    dy, dx = ring_offsets(DILATIONS, torch.device("cpu"))
    assert list(zip(dy.tolist(), dx.tolist())) == [(d * (r - 1), d * (c - 1)) for d in DILATIONS for r, c in RING]
