"""GPU checks (skipped without CUDA; run them on a lent GPU machine): fp16 CAMs, the reference's GPU
precision, agree with the float32 computation within SPEC 11's tolerances, and batching same-size
images changes nothing beyond them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cam import CAMEngine
from pipeline.classes import builtin
from pipeline.clip import load_clip
from pipeline.randomclip import VIT_B_16, random_clip, save_clip

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
        for a, b in zip(g.init, r.init):  # SPEC 11: max abs <= 2e-2 and Pearson >= 0.999
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
