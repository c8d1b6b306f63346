"""ExCEL training under DDP: two gloo processes on CPU at per-process batch 1 against one process at
batch 2 over the same crops. The sampler gives rank r of global batch b the crop one process at batch
2 takes as its r-th (same image, same augmentation counter), the balanced CE and the diversity loss
pool their pixel and pair counts over the processes (``pipeline.train.losses.Pool``), and DDP starts every
process from rank 0's weights; so with per-image statistics (``model.statistics: image``) and no
dropout (each process draws its own masks) the two runs are the same up to float rounding. With the
reference's batch-global statistics an image's affinity and dynamic relations depend on the images in
its own process's batch, so DDP differs from the single process."""
from __future__ import annotations


import pytest
import torch

from pipeline import checkpoint as ckpt_io
from pipeline.train.losses import Pool, affinity_labels, affinity_loss, segmentation_loss
from pipeline.clip.random import TINY, random_clip, save_clip
from pipeline.train.config import load_config
from pipeline.train.loop import train
from seg_helpers import assert_same_weights, log_rows, make_data, overrides, torchrun_train

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = "configs/excel_voc.yaml"


# ------------------------------------------------------------------------------- pooled losses
def test_pooled_losses_of_two_halves_equal_the_whole_batch():
    """Two 'processes' each holding one image of a batch of two, their counts added as an all-reduce
    would: the mean of their losses and of their gradients is the whole batch's, for both segmentation
    losses and the affinity loss; the mean of unpooled per-image losses is not."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, :3] = 1                # image 0: 12 foreground, 3 background, 1 ignored pixels
    labels[0, 3, 3] = 255
    labels[1, 0, :2] = 2             # image 1: 2 foreground, 6 background, 8 ignored
    labels[1, 2:] = 255
    aff = torch.rand(2, 16, 16, requires_grad=True)
    targets = affinity_labels(labels, (4, 4), radius=1)
    inputs = (logits, aff)
    pick = lambda b: slice(None) if b is None else slice(b, b + 1)  # noqa: E731  (None: the whole batch)
    for kind in ("ce", "bgfg", "affinity"):
        def loss(b, pool=Pool()):
            if kind == "affinity":
                return affinity_loss(aff[pick(b)], targets[pick(b)], pool)
            return segmentation_loss(logits[pick(b)], labels[pick(b)], kind, pool)

        whole = loss(None)
        g_whole = torch.autograd.grad(whole, inputs, allow_unused=True, materialize_grads=True)
        parts, grads = [], []
        for b in (0, 1):
            seen = []                               # the other process's counts, made as the loss makes its own
            loss(1 - b, Pool(2, lambda c: seen.append(c.clone()) or c))
            other = iter(seen)
            part = loss(b, Pool(2, lambda c: c + next(other)))
            parts.append(part)
            grads.append(torch.autograd.grad(part, inputs, allow_unused=True, materialize_grads=True))
        torch.testing.assert_close((parts[0] + parts[1]) / 2, whole)
        for g0, g1, gw in zip(*grads, g_whole):
            torch.testing.assert_close((g0 + g1) / 2, gw)
        unpooled = (loss(0) + loss(1)) / 2
        assert abs(unpooled.item() - whole.item()) > 1e-3, kind


# ------------------------------------------------------------------------------ two processes
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = make_data(tmp_path_factory.mktemp("excel_ddp"), 6, 0, size=(64, 80), seed=5)
    d["clip"] = save_clip(random_clip(TINY, seed=3), d["root"] / "tiny.pt")
    return d


def settings(d, batch, **extra):
    """Three iterations: static CAMs at 0, dynamic CAMs and A_f-filtered refinement from 1, diversity
    targets from the segmentation from 2."""
    return overrides(d, **{"model.clip": d["clip"], "data.pseudo": None, "data.crop": 48,
                           "data.scale_range": "[0.8,1.2]", "train.batch_size": batch, "schedule.iters": 3, "schedule.warmup_iters": 0,
                           "train.log_every": 1, "online.switch_iter": 1, "online.segmentation_targets_from": 2,
                           "online.tse": False, "model.width": 64, "model.heads": 2, **extra})


def ddp(out, sets, *args):
    return torchrun_train(CONFIG, out, sets, *args)


def one_process(out, sets):
    train(load_config(CONFIG, sets), out, progress=False, tensorboard=False, log=lambda *_: None)


@pytest.mark.slow
def test_ddp_per_image_statistics_resumes_and_equals_one_process_at_the_global_batch(scenes, tmp_path):
    extra = {"model.statistics": "image", "model.dropout": 0}
    ddp(tmp_path / "ddp", settings(scenes, 1, **extra), "--stop-at", "2")
    first = log_rows(tmp_path / "ddp")
    assert [r["iteration"] for r in first] == [1, 2] and ckpt_io.load(tmp_path / "ddp")["iteration"] == 2
    ddp(tmp_path / "ddp", settings(scenes, 1, **extra), "--resume")
    one_process(tmp_path / "one", settings(scenes, 2, **extra))
    a, b = ckpt_io.load(tmp_path / "ddp"), ckpt_io.load(tmp_path / "one")
    assert a["iteration"] == 3 and len(a["rng"]) == 2 and a["meta"]["config"]["online"]["method"] == "excel"
    assert a["model"].keys() == b["model"].keys() and not any(k.startswith("encoder.") for k in a["model"])
    ddp_rows, one_rows = log_rows(tmp_path / "ddp"), log_rows(tmp_path / "one")
    assert ddp_rows[:2] == first and [r["iteration"] for r in ddp_rows] == [1, 2, 3]
    assert all(r["loss_aff"] > 0 for r in ddp_rows)
    for x, y in zip(ddp_rows, one_rows, strict=True):       # the logged losses are the global batch's
        assert x == pytest.approx(y, rel=1e-5, abs=2e-6), (x, y)
    assert_same_weights(a["model"], b["model"])


@pytest.mark.slow
def test_ddp_with_batch_statistics_differs_from_one_process(scenes, tmp_path):
    """The reference's default: A_f and the dynamic relations are centred with the mean over the
    process's batch, which under DDP at batch 1 per process is one image's own."""
    extra = {"model.statistics": "batch", "model.dropout": 0}
    ddp(tmp_path / "ddp", settings(scenes, 1, **extra))
    one_process(tmp_path / "one", settings(scenes, 2, **extra))
    x, y = log_rows(tmp_path / "ddp"), log_rows(tmp_path / "one")
    # iteration 1 (static phase): labels need no statistics, the diversity loss on A_f does
    assert x[0]["loss_seg"] == pytest.approx(y[0]["loss_seg"], rel=1e-5)
    assert abs(x[0]["loss_aff"] - y[0]["loss_aff"]) > 1e-3
    # from the switch on the labels come from the dynamic CAMs and A_f-filtered refinement
    assert all(abs(p["loss_seg"] - q["loss_seg"]) > 1e-4 for p, q in zip(x[1:], y[1:])), (x, y)
