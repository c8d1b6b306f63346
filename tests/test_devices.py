"""Every tensor the segmentation models, the training losses and inference keep or make follows the device
of their inputs (issue: a tensor made on the default device crashes on CUDA inputs, which no CPU test saw).

Models are built first; then, inside ``strict_device()`` (conftest: tensors made without ``device=`` land on
'meta'), each forward, loss and prediction runs on CPU inputs, so a forgotten ``device=`` raises here as it
would on a GPU. Each test also checks the outputs are real CPU tensors (nothing silently on 'meta')."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.clip.random import TINY, random_clip
from pipeline.eval.infer import InferConfig, msc_logits, predict_image, window_logits
from pipeline.models import build_model
from pipeline.models.excel import dynamic_relation
from pipeline.train.losses import Pool, affinity_labels, affinity_loss, segmentation_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def on_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


@pytest.fixture(scope="module")
def clip():
    return random_clip(TINY, seed=0)


@pytest.fixture(scope="module")
def models(clip):
    torch.manual_seed(0)
    return {
        "weclip": build_model({"name": "weclip"}, 5, clip=clip),
        "excel": build_model({"name": "excel"}, 5, clip=clip),
        "deeplabv2": build_model({"name": "deeplabv2", "layers": [1, 1, 1, 1], "base_width": 8,
                                  "msc_scales": [0.5, 0.75]}, 5, log=lambda *_: None),
        "deeplabv3plus": build_model({"name": "deeplabv3plus", "layers": [1, 1, 1, 1], "base_width": 8}, 5,
                                     log=lambda *_: None),
    }


@pytest.mark.parametrize("name", ["weclip", "excel", "deeplabv2", "deeplabv3plus"])
def test_model_forward_and_training_loss_follow_the_inputs(models, name, strict_device):
    model = models[name]
    x = torch.randn(2, 3, 40, 56, device="cpu")                      # not multiples of 16: padded inside
    y = torch.randint(0, 5, (2, 48, 64), device="cpu")
    y[:, :6] = 255
    crop = torch.randn(2, 3, 48, 64, device="cpu")
    with strict_device():
        model.eval()
        logits = model(x)
        model.train()
        out = model(crop)
        loss = model.training_loss(out, y, segmentation_loss) if hasattr(model, "training_loss") \
            else segmentation_loss(out, y, "bgfg")
        loss.backward()
    model.eval()
    assert logits.shape == (2, 5, 40, 56) and on_cpu(logits, loss) and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["weclip", "excel"])
def test_training_outputs_and_affinity_loss_follow_the_inputs(models, name, strict_device):
    model = models[name]
    crop = torch.randn(2, 3, 48, 64, device="cpu")
    labels = torch.randint(0, 5, (2, 48, 64), device="cpu")
    labels[0, :8] = 255
    with strict_device():
        model.train()
        out = model(crop, outputs="train", attention_blocks=(9, 10))
        targets = affinity_labels(labels, out["grid"], radius=2)
        loss = segmentation_loss(out["logits"], labels, "bgfg") + affinity_loss(out["affinity"], targets)
        loss.backward()
        extra = []
        if name == "excel":
            rel = dynamic_relation(out["fused"].detach(), model.statistics, model.relation_scale)
            extra = [rel, *model.encode_calibrated(crop, rel).features]
    model.eval()
    assert on_cpu(out["logits"], out["affinity"], targets, loss, *extra) and torch.isfinite(loss)


def test_losses_follow_the_inputs_with_a_pool_and_edge_cases(strict_device):
    logits = torch.randn(2, 4, 8, 8, device="cpu", requires_grad=True)
    fg_only = torch.randint(1, 4, (2, 8, 8), device="cpu")
    ignored = torch.full((2, 8, 8), 255, device="cpu")
    pool = Pool(world=2, total=lambda c: c * 2)                       # a stand-in for the all-reduce sum
    with strict_device():
        values = [segmentation_loss(logits, fg_only, kind, p) for kind in ("ce", "bgfg") for p in (Pool(), pool)]
        values.append(segmentation_loss(logits, ignored, "bgfg"))     # no pixel of either kind: 0
        aff = torch.sigmoid(logits[:, 0].flatten(1)[:, :, None] - logits[:, 1].flatten(1)[:, None])
        targets = affinity_labels(fg_only, (4, 4), radius=1)
        values.append(affinity_loss(aff[:, :16, :16], targets, pool))
        sum(values).backward()
    assert on_cpu(*values, targets, logits.grad) and all(torch.isfinite(v) for v in values)


INFER_CASES = {
    "msc+flip": {"scales": (1.0, 0.75), "flip": True},
    "long side": {"scales": (1.0,), "long_side": 64},
    "window": {"scales": (1.0,), "flip": False, "window": 32, "stride": 20, "batch_tiles": 3},
    "square": {"square": 48, "scales": (0.7, 1.0), "unflipped_scales": (1.0,)},
    "logits": {"scales": (1.0, 0.5), "average_at": "logits"},
    "crf": {"scales": (1.0,), "crf": True, "crf_backend": "torch"},
}


def stub_crf(image_rgb, probs, params, guide, backend, device, max_pixels):
    """The CRF's boundary (its own device tests are the CRF's): host arrays in, marginals out."""
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32 and probs.shape[1:] == image_rgb.shape[:2]
    return probs


@pytest.mark.parametrize("case", list(INFER_CASES))
def test_inference_follows_the_input_device(models, case, strict_device, monkeypatch):
    monkeypatch.setattr("pipeline.eval.infer.crf_scores", stub_crf)
    model = models["weclip"].eval()
    image = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    cfg = InferConfig(**INFER_CASES[case])
    x = torch.randn(1, 3, 45, 70, device="cpu")
    with strict_device():
        label = predict_image(model, image, cfg, torch.device("cpu"))
        logits = msc_logits(model, x, cfg)
        tiles = window_logits(model, x, 32, 20, 2)
    assert label.shape == (45, 70) and label.dtype == np.uint8 and label.max() <= 4
    assert on_cpu(logits, tiles) and logits.shape == tiles.shape == (1, 5, 45, 70)


@pytest.mark.parametrize("name", ["weclip", "excel", "deeplabv2"])
def test_a_model_used_then_moved_keeps_nothing_on_the_old_device(models, name):
    """What a model keeps (caches, tables) moves with ``.to``: used on the CPU, then moved to 'meta' (a
    stand-in for CUDA), a forward on 'meta' inputs would raise on a tensor left behind."""
    import copy

    model = copy.deepcopy(models[name]).eval()
    model(torch.randn(1, 3, 48, 64))
    if name != "deeplabv2":
        model.train()(torch.randn(1, 3, 48, 64), outputs="train", attention_blocks=(10,))
    moved = model.to("meta")
    out = moved.eval()(torch.randn(1, 3, 48, 64, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 5, 48, 64)
    if name != "deeplabv2":
        train = moved.train()(torch.randn(1, 3, 48, 64, device="meta"), outputs="train", attention_blocks=(10,))
        assert train["logits"].device.type == train["affinity"].device.type == "meta"
