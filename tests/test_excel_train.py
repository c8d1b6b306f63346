"""ExCEL's learnable visual calibration: model layout and parameter count, dynamic relations and
affinity on hand-made features, the dynamic pass against a per-head restatement, the phase switches,
the square inference preset, the label maker, online training (no masks, exact resume) and proof that
it learns from injected CAMs."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import checkpoint as ckpt_io
from pipeline.eval import metrics
from pipeline.classes import IGNORE_INDEX, ClassList
from pipeline.clip.model import CLIP, CLIPArch
from pipeline.data.datasets import build_dataset
from pipeline.eval.infer import InferConfig, infer_preset, msc_logits
from pipeline.train.losses import affinity_labels, affinity_loss
from pipeline.models import ExcelSeg, build_model, trainable_parameters
from pipeline.models.excel import dynamic_relation, feature_affinity
from pipeline.train.online import OnlineBatch, build_label_maker
from pipeline.train.online.excel import ExcelLabelConfig
from pipeline.clip.random import TINY, VIT_B_16, random_clip
from pipeline.train.config import ConfigError, load_config
from pipeline.train.inputs import aug_config
from pipeline.train.loop import train
from pipeline.train.optim import build_optimizer
from seg_helpers import InjectedCAMs, Pointwise, forbid_label_maps, log_rows, make_data, overrides
from stages.predict import add_infer_args, infer_overrides

# two heads per block, six blocks: one plain, five calibrated
SMALL = CLIPArch(embed_dim=16, vision_width=128, vision_layers=6, patch_size=16, grid=14,
                 context_length=77, vocab_size=49408, text_width=64, text_layers=1)


# ---------------------------------------------------------------------------------------- layout
def test_vit_b16_voc_layout_has_the_reference_parameter_count():
    with torch.device("meta"):
        model = build_model(load_config("configs/excel_voc.yaml")["model"], 21, clip=CLIP(VIT_B_16))
    assert isinstance(model, ExcelSeg) and len(model.decoder.mlps) == 12
    # 12 x (768*256 + 256 + 256*256 + 256) + (3072*256 + 256) + 3 x 789,760 + (256*21 + 21)
    assert trainable_parameters(model) == 6_313_237
    assert sum(p.numel() for p in model.decoder.fuse.parameters()) == 786_688
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"decoder"}
    groups = build_optimizer(model, load_config("configs/excel_voc.yaml")["optim"]).param_groups
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(1e-3)   # 1e-4 x 10, as the reference


def test_training_forward_gradients_and_checkpoint_without_clip():
    model = ExcelSeg(random_clip(SMALL, seed=0), num_classes=4).train()
    images = torch.randn(2, 3, 48, 64)
    out = model(images, outputs="train")
    assert out["logits"].shape == (2, 4, 48, 64) and out["fused"].shape == (2, 256, 3, 4)
    assert out["affinity"].shape == (2, 12, 12) and out["grid"] == (3, 4)
    assert len(out["intermediates"].features) == 6 and sorted(out["intermediates"].attentions) == [0, 1, 2, 3, 4, 5]
    (out["logits"].square().mean() + out["affinity"].mean()).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    state = ckpt_io.model_state(model)
    assert state and not any(k.startswith("encoder.") for k in state)


# ------------------------------------------------------------------------------ relations, affinity
def _axis_features(groups):
    """F_d (B, 2, 2, 2): image b's four patches are unit vectors along axis groups[b][i]."""
    f = torch.zeros(len(groups), 2, 4)
    for b, g in enumerate(groups):
        for i, axis in enumerate(g):
            f[b, axis, i] = 2.0 + i   # lengths differ: only directions may matter
    return f.reshape(len(groups), 2, 2, 2)


def test_relation_masks_the_negative_part_and_row_normalises():
    # image 0: patches 0,1 along x, 2,3 along y -> cos is 1 within a pair, 0 across; its mean is 0.5
    f = _axis_features([[0, 0, 1, 1]])
    e = dynamic_relation(f, "image")
    # r = 3 (cos - 0.5) = +1.5 within pairs, -1.5 across: masked, so each row is 0.5, 0.5 in its pair
    want = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, .5, .5], [0, 0, .5, .5]])
    torch.testing.assert_close(e[0], want)
    assert (e[0][want == 0] == 0).all()   # exactly zero, not just small: the masked part is -inf
    a = feature_affinity(f, "image")
    s_pos, s_neg = 1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(1.5))
    torch.testing.assert_close(a[0], torch.where(want > 0, torch.tensor(s_pos), torch.tensor(s_neg)))


def test_batch_statistics_couple_images_and_per_image_ones_do_not():
    f = _axis_features([[0, 0, 1, 1], [0, 0, 0, 0]])   # image 1: all patches alike, cos 1, mean 1
    # batch mean (0.5 + 1) / 2 = 0.75: image 0's r = 3 (1 - 0.75) = 0.75 within pairs, -2.25 across
    a = feature_affinity(f, "batch")
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert a[0, 0, 1].item() == pytest.approx(s(0.75)) and a[0, 0, 2].item() == pytest.approx(s(-2.25))
    assert a[1, 0, 3].item() == pytest.approx(s(0.75))
    alone = feature_affinity(f[:1], "batch")
    assert alone[0, 0, 1].item() == pytest.approx(s(1.5))          # another batch mate, another result
    torch.testing.assert_close(feature_affinity(f, "image")[0], feature_affinity(f[:1], "image")[0])
    # image 1 under its own mean: r = 0 everywhere, kept (only r < 0 is masked): uniform rows
    torch.testing.assert_close(dynamic_relation(f, "image")[1], torch.full((4, 4), 0.25))
    with pytest.raises(ValueError, match="statistics"):
        dynamic_relation(f, "global")


def test_dynamic_pass_matches_per_head_restatement():
    torch.manual_seed(0)
    model = ExcelSeg(random_clip(SMALL, seed=4).double(), num_classes=3, calibrated_blocks=5).double().train()
    visual = model.encoder
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    fused = torch.randn(2, 256, 3, 3, dtype=torch.float64)
    got = model.encode_calibrated(images, dynamic_relation(fused))

    # E restated: cosines of F_d's channel vectors, centred with the batch mean, x3, negatives dropped
    v = fused.reshape(2, 256, 9)
    v = v / v.norm(dim=1, keepdim=True)
    cos = torch.einsum("bcm,bcn->bmn", v, v)
    r = 3.0 * (cos - cos.mean())
    e = torch.where(r >= 0, r, torch.tensor(float("-inf"), dtype=r.dtype)).softmax(-1)

    # block 1 runs plainly (pos table via 20 x 20); blocks 2-6 restated head by head
    z = visual.forward_intermediates(images, n_blocks=1, pos_via=20).tokens
    p = z
    width, d = 128, 64
    for blk in list(visual.blocks)[1:]:
        u = F.layer_norm(z, (width,), blk.ln_1.weight, blk.ln_1.bias, 1e-5)
        q, k, val = (u @ w.t() + b for w, b in zip(blk.attn.in_proj_weight.split(width),
                                                   blk.attn.in_proj_bias.split(width)))
        s_sum, heads_out = 0, []
        for h in range(2):
            sl = slice(h * d, (h + 1) * d)
            qh, kh, vh = q[..., sl], k[..., sl], val[..., sl]
            heads_out.append(torch.softmax(qh @ kh.transpose(1, 2) / 8, -1) @ vh)
            s = sum(torch.softmax(m @ m.transpose(1, 2) / 8, -1) for m in (qh, kh, vh)) / 3
            s = s.clone()
            s[:, 1:, 1:] = s[:, 1:, 1:] + e
            s_sum = s_sum + s
        proj = lambda t: t @ blk.attn.out_proj.weight.t() + blk.attn.out_proj.bias  # noqa: E731
        p = p + proj(torch.cat([s_sum @ val[..., h * d:(h + 1) * d] for h in range(2)], -1))
        z = z + proj(torch.cat(heads_out, -1))
        z = z + blk.mlp(F.layer_norm(z, (width,), blk.ln_2.weight, blk.ln_2.bias, 1e-5))
    torch.testing.assert_close(got.tokens, torch.cat([z[:, :1], p[:, 1:]], 1), rtol=1e-9, atol=1e-9)
    static = model.encode_calibrated(images)
    assert not torch.allclose(static.tokens[:, 1:], got.tokens[:, 1:])


def test_eval_mode_interpolates_the_positional_table_directly():
    model = ExcelSeg(random_clip(SMALL, seed=1), num_classes=3)
    images = torch.randn(1, 3, 64, 48)
    train_feats = model.train().encode(images)
    eval_feats = model.eval().encode(images)
    direct = model.encoder.forward_calibrated(images, 5, features=True, pos_via=None).features
    torch.testing.assert_close(eval_feats[0], direct[0][:, 1:])
    assert not torch.allclose(train_feats[0], eval_feats[0])


# ------------------------------------------------------------------------------------ schedules
def schedule(path, *sets):
    return ExcelLabelConfig.from_dict(load_config(path, list(sets))["online"], 0.0)


def test_phase_switches_of_both_configs():
    voc = schedule("configs/excel_voc.yaml")
    assert (voc.static_layers, voc.filter_layers, voc.box_threshold) == (6, 6, 0.79)
    assert [voc.dynamic(i) for i in (0, 13999, 14000, 29999)] == [False, False, True, True]
    assert [voc.segmentation_targets(i) for i in (14000, 23999, 24000)] == [False, False, True]
    coco = schedule("configs/excel_coco.yaml")
    assert [coco.dynamic(i) for i in (29999, 30000)] == [False, True]
    assert not any(coco.segmentation_targets(i) for i in (0, 30000, 99999))
    assert coco.box_threshold == 0.88 and (coco.static_layers, coco.filter_layers) == (6, 6)
    # the static-attention ablation never turns dynamic
    assert not schedule("configs/excel_voc.yaml", "online.refine=attention").dynamic(10**9)
    with pytest.raises(ConfigError, match="online.method=excel"):
        load_config("configs/excel_voc.yaml", ["model.name=weclip"])
    with pytest.raises(ConfigError, match="model.statistics"):
        load_config("configs/excel_voc.yaml", ["model.statistics=global"])


# ------------------------------------------------------------------------------------- inference
def test_square_preset_sizes_flips_and_average():
    cfg = InferConfig.from_dict({**infer_preset("excel"), "normalize": "imagenet"})
    x = torch.randn(1, 3, 50, 90)
    model = Pointwise()
    out = msc_logits(model, x, cfg)
    # mirror at 224, 384, 480, none at 320: 7 forwards, all squares
    assert sorted(model.sizes) == sorted([(224, 224)] * 2 + [(320, 320)] + [(384, 384)] * 2 + [(480, 480)] * 2)
    want = 0   # the model is pointwise, so a mirrored pass flipped back equals the plain one
    for side in (224, 320, 384, 480):
        xs = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)[:, :1]
        want = want + F.interpolate(torch.cat([xs, -xs], 1), size=(50, 90), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, want / 4)
    assert cfg.long_side is None
    with pytest.raises(ValueError, match="square"):
        InferConfig(square=320, long_side=512)


def test_preset_flag_and_later_flags():
    p = argparse.ArgumentParser()
    add_infer_args(p)
    d = infer_overrides(p.parse_args(["--checkpoint", "x", "--preset", "excel", "--no-flip"]))
    assert d["square"] == 320 and d["scales"] == (0.7, 1.0, 1.2, 1.5) and d["flip"] is False
    assert infer_overrides(p.parse_args(["--checkpoint", "x"])) == {}


# ------------------------------------------------------------------------------- label maker, loss
def test_diversity_loss_on_hand_made_features():
    # one image, 2 x 2 patches: patches 0, 1 along x, 2, 3 along y; labels: 0, 1 class 1, 2, 3 class 2
    f = _axis_features([[0, 0, 1, 1]])
    labels = torch.tensor([[[1, 1], [2, 2]]])
    targets = affinity_labels(labels, (2, 2), radius=8)
    a = feature_affinity(f, "image")          # sigmoid(+1.5) on same-axis pairs, sigmoid(-1.5) across
    hi, lo = 1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(1.5))
    # 8 positive pairs (diagonal included) with 1 - A = 1 - hi, 8 negative ones with A = lo
    want = 0.5 * 8 * (1 - hi) / 9 + 0.5 * 8 * lo / 9
    assert affinity_loss(a, targets).item() == pytest.approx(want)
    # swapping a patch's direction breaks the agreement and raises the loss
    worse = _axis_features([[0, 1, 1, 1]])
    assert affinity_loss(feature_affinity(worse, "image"), targets) > affinity_loss(a, targets)


class Recording:
    """The real ExCEL CAM source, remembering which calibrated pass it was given."""

    def __init__(self, inner):
        self.inner, self.passes = inner, []

    def __call__(self, batch, encoded, grid):
        self.passes.append(encoded)
        return self.inner(batch, encoded, grid)


def test_label_maker_switches_to_dynamic_cams_and_segmentation_targets():
    torch.manual_seed(0)
    clip = random_clip(SMALL, seed=2)
    classes = ClassList(names=("cat", "dog", "car"), prompts=("cat", "dog", "car"), background=("sky",))
    online = {"method": "excel", "switch_iter": 2, "segmentation_targets_from": 3, "static_layers": 6,
              "filter_layers": 6, "box_threshold": 0.79, "tse": False}
    model_cfg = {"name": "excel", "calibrated_blocks": 5, "attention_layers": 6}
    model = build_model(model_cfg, 4, clip=clip).train()
    maker = build_label_maker(online, clip, classes, model_cfg=model_cfg, dataset="folder")
    maker.cams = rec = Recording(maker.cams)
    images = torch.randn(2, 3, 48, 48)
    batch = OnlineBatch(images, [[0, 2], [1]], [(0, 0), (1, 1)])
    out = model(images, outputs="train")
    # the label maker's pass is set up as the model's: its static pass gives the same tokens
    torch.testing.assert_close(maker.engine.encode(images).tokens, out["intermediates"].tokens)
    first = maker(batch, out, 1)
    assert rec.passes[-1] is out["intermediates"] and first.affinity_targets is None
    assert first.labels.shape == (2, 48, 48) and set(first.labels[1].unique().tolist()) <= {0, 2}
    second = maker(batch, out, 2)
    dynamic = model.encode_calibrated(images, dynamic_relation(out["fused"]))
    torch.testing.assert_close(rec.passes[-1].tokens, dynamic.tokens)
    assert not torch.allclose(dynamic.tokens, out["intermediates"].tokens)
    assert not torch.equal(second.initial.cams, first.initial.cams) and second.affinity_targets is None
    third = maker(batch, out, 3)
    assert torch.equal(third.affinity_targets, out["logits"].argmax(dim=1))


# ------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("excel_online"), 6, 0, size=(64, 80), seed=5)


def test_online_training_reads_no_mask_and_resumes_exactly_across_both_switches(scenes, tmp_path, monkeypatch):
    opened = forbid_label_maps(monkeypatch)
    sets = {"data.crop": 48, "data.scale_range": "[0.8,1.2]", "train.batch_size": 2, "schedule.iters": 3,
            "schedule.warmup_iters": 1, "train.log_every": 1, "online.switch_iter": 1,
            "online.segmentation_targets_from": 2, "online.tse": False, "model.width": 64, "model.heads": 2,
            "data.pseudo": None}
    cfg = load_config("configs/excel_voc.yaml", overrides(scenes, **sets))
    kw = {"progress": False, "tensorboard": False, "clip_model": random_clip(TINY, seed=3), "log": lambda *_: None}
    train(cfg, tmp_path / "full", **kw)
    train(cfg, tmp_path / "split", stop_at=2, **kw)
    train(cfg, tmp_path / "split", resume=True, **kw)
    a, b = ckpt_io.load(tmp_path / "full"), ckpt_io.load(tmp_path / "split")
    assert a["model"].keys() == b["model"].keys() and not any(k.startswith("encoder.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    full = log_rows(tmp_path / "full")
    assert [r["loss"] for r in full] == [r["loss"] for r in log_rows(tmp_path / "split")]
    assert len(full) == 3 and all(r["loss_aff"] > 0 for r in full)
    assert a["meta"]["infer"]["crf_preset"] == "excel" and a["meta"]["config"]["online"]["method"] == "excel"
    assert not [p for p in opened if p.endswith(".png")] and any(p.endswith(".jpg") for p in opened)


# ----------------------------------------------------------------------------------- learning proof
# Measured when written (120 iterations of batch 4, crop 96, one thread, 75-95 s each on a shared
# machine), scene seeds 1 / 2 / 3: the first 10 iterations' labels 0.483 / 0.548 / 0.456 mIoU, the
# decoder on held-out scenes 0.754 / 0.648 / 0.577; diversity loss (means of the first and last 10
# iterations) 0.481 -> 0.419 / 0.481 -> 0.447 / 0.484 -> 0.444. Without the injected attention (RFM on
# a random CLIP's attention) the labels fell to 0.41 and the decoder to 0.27.
LEARN = {"iters": 120, "early": 10, "window": 10}
MARGIN_DIVERSITY = 0.02   # measured falls of 0.034-0.063
MARGIN_DECODER = 0.05     # measured +0.10 to +0.27


@pytest.mark.slow
def test_excel_learns_from_injected_static_cams_through_both_phases(tmp_path_factory, tmp_path):
    """All three phases in one run: static CAMs, dynamic CAMs from iteration 60 (``online.switch_iter``),
    diversity targets from the segmentation from iteration 90. The diversity loss falls and the decoder
    ends above the labels it started from. With a random CLIP the dynamic pass adds no signal of its own,
    so this proves the loop learns through every switch, not the gain of the calibration."""
    data = make_data(tmp_path_factory.mktemp("excel_learn"), 32, 8, size=(96, 128), seed=1)
    it = LEARN["iters"]
    sets = {"data.crop": 96, "data.scale_range": "[0.6,1.0]", "train.batch_size": 4, "schedule.iters": it,
            "schedule.warmup_iters": 5, "train.log_every": 1, "train.val_every": it, "online.switch_iter": it // 2,
            "online.segmentation_targets_from": 3 * it // 4, "online.tse": False, "model.width": 64,
            "model.heads": 2, "model.eval_pos_via": 20, "train.seed": 1, "data.pseudo": None}
    cfg = load_config("configs/excel_voc.yaml", overrides(data, **sets))
    assert cfg["val"]["long_side"] == 320          # the config's validation: long side at the crop size of real runs
    clip = random_clip(TINY, seed=3)
    ds = build_dataset("voc", data["root"], data["classes"])
    base = build_label_maker(cfg["online"], clip, ds.classes, model_cfg=cfg["model"], dataset="voc")
    inject = InjectedCAMs(ds, ds.ids(str(data["train"])), aug_config(cfg["data"]), 1, base.attention_blocks, swap=0.5,
                          real=base.cams)
    maker = build_label_maker(cfg["online"], clip, ds.classes, inject, cfg["model"], "voc")
    n = ds.classes.num_classes + 1
    first = np.zeros((n, n), np.int64)
    phases = []

    class Scored:
        attention_blocks = maker.attention_blocks

        def __call__(self, batch, outputs, iteration):
            made = maker(batch, outputs, iteration)
            phases.append((maker.cfg.dynamic(iteration), made.affinity_targets is not None))
            if iteration < LEARN["early"]:
                for lab, gt in zip(made.labels.cpu().numpy(), inject.gt[-1]):
                    first[:] += metrics.confusion_matrix(lab, gt, n, IGNORE_INDEX)
            return made

    res = train(cfg, tmp_path / "run", progress=False, tensorboard=False, clip_model=clip, label_maker=Scored(),
                log=lambda *_: None)
    assert phases[0] == (False, False) and phases[it // 2] == (True, False) and phases[-1] == (True, True)
    aff = [r["loss_aff"] for r in log_rows(tmp_path / "run")]
    w = LEARN["window"]
    early_aff, late_aff = np.mean(aff[:w]), np.mean(aff[-w:])
    labels_miou = metrics.mean_iou(first)
    print(f"first {LEARN['early']} iterations' labels mIoU {labels_miou:.3f}, decoder val mIoU {res['val_miou']:.3f}; "
          f"diversity loss {early_aff:.4f} (first {w}) -> {late_aff:.4f} (last {w})")
    assert late_aff < early_aff - MARGIN_DIVERSITY, (early_aff, late_aff)
    assert res["val_miou"] > labels_miou + MARGIN_DECODER, (res["val_miou"], labels_miou)
