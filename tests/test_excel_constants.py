"""ExCEL's defaults and documented constants against an independent restatement of the reference
(``reference_excel``) on a CLIP with two heads per block and 12 blocks, so head sums differ from head
means and "the last 5 / 6 blocks" keep their meaning: the CAM method's settings in both modes, its
input statistics, the training model's calibrated pass, the online labels of both phases and the
diversity loss's pair targets. Each test builds things the way a user's command does (no option
given = the default under test)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import textured_image
from pipeline.cams import excel
from pipeline.classes import ClassList, builtin
from pipeline.clip.model import CLIPArch, load_clip, read_state_dict
from pipeline.clip.random import TINY, random_clip, save_clip
from pipeline.models import ExcelSeg, build_model
from pipeline.train.config import load_config
from pipeline.train.loop import train
from pipeline.train.online import OnlineBatch, build_label_maker
from reference import ReferenceCLIP, reference_text
from reference_excel import (compute_trans_mat, dynamic_relation, feature_affinity, filtered_attention, refined_maps,
                             static_attention, static_cams, surgery_forward)
from seg_helpers import log_rows, make_data, overrides

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_HEADS = CLIPArch(embed_dim=32, vision_width=128, vision_layers=12, patch_size=16, grid=14, context_length=77,
                     vocab_size=49408, text_width=64, text_layers=1)
VOCAB = ClassList(names=("cat", "dog", "person"), prompts=("cat", "dog", "person with clothes,people,human"),
                  background=("ground", "sky"))
TEMPLATE = "a clean origami {}."
# the reference's numbers, typed here
CALIBRATED, ATTENTION_LAYERS, BOX = 5, 6, 0.79
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
TOL = dict(atol=2e-4, rtol=0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """(our CLIP, the reference's model from the same file, the reference's text rows [fg; bg])."""
    path = save_clip(random_clip(TWO_HEADS, seed=7), tmp_path_factory.mktemp("clip") / "two-heads.pt",
                     torchscript=False)
    model = load_clip(path)
    assert model.visual.blocks[0].attn.heads == 2
    ref = ReferenceCLIP(read_state_dict(path))
    return model, ref, reference_text(ref, list(VOCAB.prompts) + list(VOCAB.background), TEMPLATE)


def _image(tmp_path, h: int, w: int, seed: int = 1):
    path = tmp_path / f"im{seed}.png"          # PNG: the pixels read back are the ones written
    rgb = textured_image(h, w, seed)
    Image.fromarray(rgb).save(path)
    return path, rgb


# --------------------------------------------------------------------------- the CAM method (make cams)
@pytest.mark.parametrize("exact", [True, False])
def test_input_statistics_of_both_modes(tmp_path, exact):
    """exact: ImageNet statistics (the reference's dataset transforms), else CLIP's; normalised at full
    size, then bilinear (align_corners=False) to sides rounded up to multiples of 16."""
    path, rgb = _image(tmp_path, 40, 56)
    cfg = excel.make_config("folder", VOCAB, exact, None, {"tse": False})
    x, size = excel.image_loader(cfg, 4096, False)(path)
    mean, std = IMAGENET if exact else CLIP_STATS
    want = (torch.from_numpy(rgb).permute(2, 0, 1).double() / 255 - torch.tensor(mean, dtype=torch.float64)[:, None, None]) \
        / torch.tensor(std, dtype=torch.float64)[:, None, None]
    want = F.interpolate(want[None], size=(48, 64), mode="bilinear", align_corners=False)[0]
    assert size == (40, 56) and x.dtype == torch.float32
    torch.testing.assert_close(x.double(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("exact", [True, False])
def test_cam_method_defaults_match_the_restated_reference(clips, tmp_path, exact):
    """The CAM stage's settings with no option given: 5 calibrated blocks, their attention summed over
    heads (mean when not exact), token features normalised over the token axis (each token when not
    exact), the positional table through 20 x 20 (directly when not exact), class temperature 2,
    the mean of the last 6 attention maps, box threshold 0.79, boxes that never reach the grid's last
    row and column (whole boxes when not exact)."""
    model, ref, text = clips
    path, _ = _image(tmp_path, 96, 96, seed=3)
    cfg = excel.make_config("folder", VOCAB, exact, None, {"tse": False})
    x, _ = excel.image_loader(cfg, 4096, False)(path)
    labels = [2, 0]
    got = excel.ExcelEngine(model, VOCAB, cfg)(x[None], [labels])[0]

    _, projected, attns = surgery_forward(ref, x[None], CALIBRATED, 20 if exact else None, "sum" if exact else "mean")
    init = static_cams(projected, text, VOCAB.num_classes, token_axis=exact)[0, labels].numpy()
    want = refined_maps(compute_trans_mat(static_attention(attns, 0, ATTENTION_LAYERS)), init, BOX, clip_boxes=exact)
    np.testing.assert_allclose(got.init, init, **TOL)
    np.testing.assert_allclose(got.cams, want, **TOL)


# ----------------------------------------------------------------------------- the training model
@pytest.mark.parametrize("construct", ["build_model", "ExcelSeg"])
def test_training_model_defaults_run_the_reference_calibrated_pass(clips, construct):
    """A model section naming only ``excel`` (or the class with its defaults): in training, the reference's
    'train' encoder (table via 20 x 20, 5 calibrated blocks, head-summed attention of the last 6 blocks);
    in eval mode its test encoder (table interpolated directly)."""
    clip, ref, _ = clips
    model = build_model({"name": "excel"}, 4, clip=clip) if construct == "build_model" else ExcelSeg(clip, 4)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 80, 80)   # a 5 x 5 grid: 14 -> 20 -> 5 differs from 14 -> 5 (for 4 x 4 it does not)
    out = model.train()(x, outputs="train")["intermediates"]
    tokens, _, attns = surgery_forward(ref, x, CALIBRATED, 20, "sum")
    torch.testing.assert_close(out.tokens, tokens, **TOL)
    assert sorted(out.attentions) == list(range(12 - ATTENTION_LAYERS, 12))
    for i in sorted(out.attentions):
        torch.testing.assert_close(out.attentions[i], attns[i], **TOL)
    torch.testing.assert_close(model.eval().encode_calibrated(x).tokens, surgery_forward(ref, x, CALIBRATED, None)[0], **TOL)


# ------------------------------------------------------------------------------------ online labels
@pytest.mark.parametrize("config", [None, "configs/excel_voc.yaml"])
def test_online_labels_of_both_phases_match_the_restated_reference(clips, config):
    """Refined CAMs of ExCEL's label maker before and after the switch, from the model's own pass: static
    phase = static CAMs refined with the mean of the last 6 maps (the last block's included); dynamic
    phase = CAMs of the pass calibrated with the adapter's relations, refined with the layer filter over
    the last 6 maps times A_f; box threshold 0.79, bilinear upsampling to the crop (align_corners=False).
    With a model/online section that names only the method, and with the shipped VOC config."""
    clip, ref, text = clips
    if config is None:
        model_cfg, online = {"name": "excel"}, {"method": "excel", "tse": False}
    else:
        cfg = load_config(config, ["online.tse=false"])
        model_cfg, online = cfg["model"], cfg["online"]
    model = build_model(model_cfg, VOCAB.num_classes + 1, clip=clip).train()
    maker = build_label_maker(online, clip, VOCAB, model_cfg=model_cfg, dataset="folder")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 80, 80)
    batch = OnlineBatch(x, [[0, 2], [1]], [(0, 0), (1, 1)])
    out = model(x, outputs="train")
    _, projected, attns = surgery_forward(ref, x)
    affinity = feature_affinity(out["fused"].detach())
    torch.testing.assert_close(out["affinity"], affinity, **TOL)
    _, projected_dyn, _ = surgery_forward(ref, x, relation=dynamic_relation(out["fused"].detach()))
    for iteration, late in ((0, False), (10**6, True)):
        made = maker(batch, out, iteration)
        cams = static_cams(projected_dyn if late else projected, text, VOCAB.num_classes)
        for b, lab in enumerate(batch.labels):
            w = (filtered_attention(attns, b, ATTENTION_LAYERS, affinity[b]) if late
                 else static_attention(attns, b, ATTENTION_LAYERS))
            want = refined_maps(compute_trans_mat(w), cams[b, lab].numpy(), BOX, (80, 80))
            np.testing.assert_allclose(made.refined[b, :len(lab)].numpy(), want, **TOL, err_msg=f"late={late} b={b}")


def test_attribute_bank_sizes_of_the_builtin_vocabularies():
    """The reference's KMeans sizes: 112 attributes for VOC's 20 classes, 224 for COCO's 80."""
    for name, n in (("voc", 112), ("coco", 224)):
        assert excel.make_config(name, builtin(name), True, None, {}).attributes == n


# ---------------------------------------------------------------------------------- diversity loss
def test_segmentation_targets_switch_changes_only_the_diversity_loss(tmp_path):
    """``online.segmentation_targets_from``: from that iteration the diversity loss's pair targets come from the
    segmentation's argmax, not the labels; the segmentation loss still uses the labels. One iteration
    with the switch at 0 and without it: same segmentation loss, another diversity loss."""
    data = make_data(tmp_path / "data", 2, 0, size=(48, 48), seed=3)
    kw = {"progress": False, "tensorboard": False, "clip_model": random_clip(TINY, seed=3), "log": lambda *_: None}
    rows = {}
    for start in (0, None):
        sets = {"data.crop": 48, "train.batch_size": 2, "schedule.iters": 1, "train.log_every": 1, "online.tse": False,
                "model.width": 32, "model.heads": 1, "model.depth": 1, "data.pseudo": None, "data.scale_range": None,
                "online.segmentation_targets_from": start}
        train(load_config("configs/excel_voc.yaml", overrides(data, **sets)), tmp_path / str(start), **kw)
        rows[start] = log_rows(tmp_path / str(start))[0]
    assert rows[0]["loss_seg"] == rows[None]["loss_seg"]
    assert abs(rows[0]["loss_aff"] - rows[None]["loss_aff"]) > 1e-4
