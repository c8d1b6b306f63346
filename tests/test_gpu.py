"""GPU checks (skipped without CUDA; run them on a lent GPU machine): fp16 CAMs, the reference's GPU
precision, agree with the float32 computation within our tolerances (max abs 2e-2, Pearson 0.999), and batching
same-size images changes nothing beyond them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cams.gradcam import CAMEngine
from pipeline.classes import builtin
from pipeline.clip.model import load_clip
from pipeline.clip.random import VIT_B_16, random_clip, save_clip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def b16(tmp_path_factory):
    return save_clip(random_clip(VIT_B_16, seed=1), tmp_path_factory.mktemp("gpu") / "ViT-B-16.pt")


def test_fp16_gradcam_within_spec_tolerance(b16):
    voc = builtin("voc")
    x = torch.randn(2, 3, 384, 512, generator=torch.Generator().manual_seed(0))
    labels = [[14, 8, 11], [2]]
    ref = CAMEngine(load_clip(b16, "cuda", torch.float32), voc)(x.cuda(), labels)
    got = CAMEngine(load_clip(b16, "cuda", torch.float16), voc)(x.cuda().half(), labels)
    for r, g in zip(ref, got):
        for a, b in zip(g.init, r.init):  # our tolerance: max abs <= 2e-2 and Pearson >= 0.999
            assert np.abs(a - b).max() <= 2e-2
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.999


def test_batched_equals_single_on_gpu(b16):
    engine = CAMEngine(load_clip(b16, "cuda", torch.float16), builtin("voc"))
    x = torch.randn(4, 3, 384, 512, generator=torch.Generator().manual_seed(1)).cuda().half()
    labels = [[14, 8, 11], [2], [7, 11], [0, 5]]
    batched = engine(x, labels)
    for b in range(4):
        single = engine(x[b:b + 1], [labels[b]])[0]
        np.testing.assert_allclose(batched[b].init, single.init, atol=2e-2)


def test_torch_crf_on_gpu_agrees_with_the_cpu_and_batches():
    from pipeline.labels import crf
    from pipeline.data import synthetic
    from pipeline.data.camfile import upsample_cams
    from pipeline.labels.crf import torch_backend

    rng = np.random.default_rng(0)
    us, gs = [], []
    for labels in (2, 8, 20):  # one C per batch: pad with labels of the largest energy (-log 1e-5)
        img, keys, cams = synthetic.scene_with_cams(rng, (375, 500), labels)
        u = crf.unary_energy(crf.background_probs(upsample_cams(cams, (375, 500))))
        pad = np.full((21 - u.shape[0], u.shape[1]), u.max(), np.float32)
        us.append(np.concatenate([u, pad]).reshape(21, 375, 500))
        gs.append(crf.wrapped_guide(img))
    u, g = torch.from_numpy(np.stack(us)), torch.from_numpy(np.stack(gs))
    params = crf.CRFParams()
    cpu = torch_backend.dense_crf(u[:1], g[:1], params)
    one = torch_backend.dense_crf(u[:1].cuda(), g[:1].cuda(), params).cpu()
    assert (one.argmax(1) == cpu.argmax(1)).float().mean() >= 0.999  # float sums in another order only
    assert ((one.max(1).values >= 0.95) == (cpu.max(1).values >= 0.95)).float().mean() >= 0.999
    batch = torch_backend.dense_crf(u.cuda(), g.cuda(), params).cpu()
    torch.testing.assert_close(batch[:1], one, atol=1e-4, rtol=0)
    half = torch_backend.dense_crf(u.cuda().half(), g.cuda(), params)
    assert half.dtype == torch.float16 and (half.float().cpu().argmax(1) == batch.argmax(1)).float().mean() >= 0.99
