"""WeCLIP's online labels against an independent restatement of its code (``reference_excel``'s RFM
pieces, as WeCLIP's clip_tool.py has them): with injected CAMs and attention, the label maker's
refined CAMs in both phases (the last 8 maps, block 12's included, before the switch; the layer filter
over the last 6 times the decoder affinity after it; box threshold 0.4; upsampling to the crop with
align_corners=False), for an online section that names only the method and for the shipped config;
and the background score 1 - max of the crop's CAMs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.classes import ClassList
from pipeline.clip.model import Intermediates
from pipeline.clip.random import TINY, random_clip
from pipeline.train.config import load_config
from pipeline.train.online import OnlineBatch, build_label_maker, pad_maps
from pipeline.train.losses import affinity_labels
from pipeline.train.online.weclip import online_labels
from reference_excel import compute_trans_mat, filtered_attention, refined_maps, static_attention

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ClassList(names=("cat", "dog", "car"), prompts=("cat", "dog", "car"), background=("sky",))
STATIC_LAYERS, FILTER_LAYERS, BOX = 8, 6, 0.4   # WeCLIP's VOC code, typed here


class Injected:
    """A CAM source that serves fixed CAMs and the last block's attention."""

    def __init__(self, maps, last):
        self.maps, self.last = maps, last

    def __call__(self, batch, intermediates, grid):
        out = pad_maps(self.maps, batch.labels)
        out.attention_last = self.last
        return out


def _blobs(rng, h, w):
    """A CAM (h, w) in [0, 1] with one bright blob and noise, as GradCAM maps look."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.8, 2.0) ** 2)) + 0.2 * rng.random((h, w))
    m = m - m.min()
    return (m / m.max()).astype(np.float32)


@pytest.mark.parametrize("config", [None, "configs/weclip-online_voc.yaml"])
def test_rfm_of_both_phases_matches_the_restated_reference(config):
    online = {"method": "weclip"} if config is None else load_config(config)["online"]
    rng = np.random.default_rng(0)
    H, W, h, w = 80, 96, 5, 6
    n = h * w
    labels = [[0, 2], [1]]
    maps = [torch.from_numpy(np.stack([_blobs(rng, h, w) for _ in lab])) for lab in labels]
    g = torch.Generator().manual_seed(0)
    # 12 blocks of distinct attention (CLS first); block 12's comes with the CAMs
    attns = [(torch.randn(2, n + 1, n + 1, generator=g) * (1 + i % 3)).softmax(-1) for i in range(12)]
    affinity = torch.sigmoid(torch.randn(2, n, n, generator=g))
    maker = build_label_maker(online, random_clip(TINY, seed=0), CLASSES, cams=Injected(maps, attns[-1]))
    batch = OnlineBatch(torch.randn(2, 3, H, W, generator=g), labels, [(0, 0), (1, 1)])
    inter = Intermediates(tokens=torch.zeros(2, n + 1, 8), attentions={i: attns[i] for i in range(11)})
    outputs = {"intermediates": inter, "grid": (h, w), "affinity": affinity}
    for iteration, late in ((0, False), (10**6, True)):
        made = maker(batch, outputs, iteration)
        for b, lab in enumerate(labels):
            a = (filtered_attention(attns, b, FILTER_LAYERS, affinity[b]) if late
                 else static_attention(attns, b, STATIC_LAYERS))
            want = refined_maps(compute_trans_mat(a), maps[b].numpy(), BOX, (H, W))
            np.testing.assert_allclose(made.refined[b, :len(lab)].numpy(), want, atol=1e-5, rtol=0,
                                       err_msg=f"late={late} b={b}")


def test_background_is_one_minus_the_largest_cam():
    """Two weak CAMs overlapping (0.4 and 0.4) leave the background at 0.6, above both: the pixel is
    background (1 - sum would make it 0.2 and give it to a class)."""
    cams = torch.zeros(1, 2, 32, 32)
    cams[0, 0, :, :16], cams[0, 1, :, :16] = 0.4, 0.4       # left: overlap of two weak maps
    cams[0, 0, :, 16:], cams[0, 1, :, 16:] = 0.7, 0.2       # right: class 0 strong
    valid = torch.tensor([[True, True]])
    classes = torch.tensor([[3, 5]])
    lab = online_labels(torch.zeros(1, 3, 32, 32), cams, valid, classes, par_iterations=0)
    assert (lab[0, :, :16] == 0).all() and (lab[0, :, 16:] == 4).all()


def test_affinity_pairs_more_than_8_patches_apart_are_ignored_by_default():
    """AFA's radius 8 (WeCLIP's and ExCEL's get_mask_by_radius): in the function, and in a config that
    turns the affinity loss on without naming the radius."""
    out = affinity_labels(torch.zeros(1, 16, 16 * 12, dtype=torch.long), (1, 12))
    assert out[0, 0, :9].tolist() == [1] * 9 and out[0, 0, 9:].tolist() == [255] * 3
    assert load_config("configs/weclip_voc.yaml", ["train.aff_weight=0.1"])["train"]["aff_radius"] == 8
