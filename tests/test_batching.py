"""CAM engines and online label makers on a batch: CPU proxies of GPU efficiency (the ops they dispatch and
the host synchronisations they need do not multiply with the batch size) and device following (every tensor
they make or keep is on their inputs' device, even when the CLIP moves after they are built)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from device_check import one_device
from dispatch_count import count
from pipeline.cams.excel import ExcelConfig, ExcelEngine
from pipeline.cams.gradcam import CAMConfig, CAMEngine
from pipeline.classes import builtin
from pipeline.clip.random import TINY, random_clip
from pipeline.models import build_model
from pipeline.train.online import OnlineBatch, build_label_maker

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = [[1, 4, 7], [2], [3, 14], [0, 5], [8, 9, 10], [11], [12, 15], [19, 6]]
IMAGE, CROP = (64, 96), 64
ONLINE = {"weclip": {"method": "weclip", "switch_iter": 1},
          "excel": {"method": "excel", "switch_iter": 1, "segmentation_targets_from": 1, "tse": False}}


def build_makers(clip, voc):
    """{method: (segmentation model, label maker)} on the CLIP's device."""
    out = {}
    for name, cfg in ONLINE.items():
        model = build_model({"name": name}, 21, clip=clip).eval()          # eval: no dropout draws
        out[name] = model, build_label_maker(cfg, clip, voc, model_cfg={"name": name}, dataset="voc")
    return out


@pytest.fixture(scope="module")
def parts():
    voc = builtin("voc")
    clip = random_clip(TINY, seed=3)
    engines = {"clipes": CAMEngine(clip, voc), "excel": ExcelEngine(clip, voc, ExcelConfig(tse=False)),
               # CLIP-ES on CUDA: fp16 weights and the fp16 host-arithmetic emulation of its GradCAM
               "clipes-fp16": CAMEngine(random_clip(TINY, seed=3).half(), voc, CAMConfig(exact=True))}
    return voc, engines, build_makers(clip, voc)


def engine_call(parts, name, b):
    engine = parts[1][name]
    x = torch.randn(b, 3, *IMAGE, generator=torch.Generator().manual_seed(b))
    return engine, (x, LABELS[:b])


def maker_call(parts, name, b, iteration):
    model, maker = parts[2][name]
    crops = torch.randn(b, 3, CROP, CROP, generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        outputs = model(crops, outputs="train", attention_blocks=maker.attention_blocks)
    return maker, (OnlineBatch(crops, LABELS[:b], [(i, i) for i in range(b)]), outputs, iteration)


CALLS = [("clipes", None), ("clipes-fp16", None), ("excel", None),
         ("weclip", 0), ("weclip", 1), ("excel", 0), ("excel", 1)]


def call(parts, name, iteration, b):
    return engine_call(parts, name, b) if iteration is None else maker_call(parts, name, b, iteration)


@pytest.mark.parametrize("name,iteration", CALLS, ids=[f"{n}-{'engine' if i is None else f'maker@{i}'}"
                                                      for n, i in CALLS])
def test_a_batch_of_8_dispatches_about_what_one_image_does(parts, name, iteration):
    """Per-image Python loops multiply the kernel launches and host round trips of a GPU; batched code
    dispatches nearly the same ops at batch 8 as at batch 1 and needs no more synchronisations. The
    engines read their results back once per batch (cams and init); the label makers never."""
    counts = {}
    for b in (1, 8):
        fn, args = call(parts, name, iteration, b)
        counts[b], _ = count(fn, *args)
    one, eight = counts[1], counts[8]
    assert eight.ops <= 1.3 * one.ops, f"{one.ops} ops at batch 1, {eight.ops} at batch 8: {eight.by_op - one.by_op}"
    assert eight.syncs <= one.syncs, f"host syncs {dict(one.sync_ops)} at batch 1, {dict(eight.sync_ops)} at batch 8"
    if iteration is not None:
        assert eight.syncs == 0, dict(eight.sync_ops)


@pytest.mark.parametrize("name", ["clipes", "excel"])
def test_engines_make_every_tensor_on_their_inputs_device(parts, strict_device, name):
    engine, args = engine_call(parts, name, 3)
    want = engine(*args)
    with strict_device():
        got = engine(*args)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.cams, w.cams)
        np.testing.assert_array_equal(g.init, w.init)


@pytest.mark.parametrize("name,iteration", [(n, i) for n in ONLINE for i in (0, 1)])
def test_label_makers_make_every_tensor_on_their_inputs_device(parts, strict_device, name, iteration):
    maker, args = maker_call(parts, name, 3, iteration)
    want = maker(*args)
    with strict_device():
        got = maker(*args)
    assert torch.equal(got.labels, want.labels) and torch.equal(got.refined, want.refined)


def test_label_makers_follow_the_clip_when_it_moves_after_they_are_built():
    """``make train`` builds the label maker after moving the model to the GPU, the benchmark before: the
    maker must not keep tensors on the device it was built on. 'meta' plays the second device here."""
    voc = builtin("voc")
    made = build_makers(random_clip(TINY, seed=5), voc)
    crops = torch.randn(2, 3, CROP, CROP, device="meta")
    batch = OnlineBatch(crops, LABELS[:2], [(0, 0), (1, 1)])
    for name, (model, maker) in made.items():
        model.to("meta")                                         # the CLIP's image tower moves with the model
        with torch.no_grad():
            outputs = model(crops, outputs="train", attention_blocks=maker.attention_blocks)
        for iteration in (0, 1):
            with one_device():
                labels = maker(batch, outputs, iteration).labels
            assert labels.device.type == "meta" and labels.shape == (2, CROP, CROP), name
