"""The machinery of the GPU test's fp16 tolerance, on the CPU: the reference restatement run as CLIP-ES runs
on CUDA (OpenAI's fp16 conversion), its spread against float32, and the map comparison both use."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.classes import builtin
from pipeline.clip.model import read_state_dict
from reference import ReferenceCLIP, box_mask, compare_runs, map_distance, paired_spreads, precision_spread

pytestmark = pytest.mark.usefixtures("one_thread")


def test_as_on_cuda_converts_what_openais_convert_weights_converts(tiny_clip_path):
    ref = ReferenceCLIP(read_state_dict(tiny_clip_path)).as_on_cuda()
    half = {n for n, t in [*ref.named_parameters(), *ref.named_buffers()] if t.dtype == torch.float16}
    linear = {f"{n}.{p}" for n, m in ref.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              for p, _ in m.named_parameters(recurse=False)}
    attn = {f"{n}.in_proj_{p}" for n, m in ref.named_modules() if isinstance(m, nn.MultiheadAttention)
            for p in ("weight", "bias")}
    assert half == linear | attn | {"proj", "text_projection"}
    assert ref.class_embedding.dtype == ref.vpos.dtype == ref.ln_pre.weight.dtype == ref.logit_scale.dtype == torch.float32
    assert ref.token_embedding.weight.dtype == torch.float32


def test_map_distance_and_same_boxes():
    rng = np.random.default_rng(0)
    a = [rng.random((2, 5, 6)).astype(np.float32), rng.random((1, 5, 6)).astype(np.float32)]
    same = map_distance(a, a)
    assert same == {"max_abs": 0.0, "mean_abs": 0.0, "min_pearson": 1.0, "maps": 3}
    b = [a[0] + np.float32(0.01), a[1].copy()]
    b[1][0, 0, 0] += 0.5
    d = map_distance(a, b)
    assert d["max_abs"] == pytest.approx(0.5) and d["maps"] == 3 and d["min_pearson"] < 1
    assert d["mean_abs"] == pytest.approx((2 * 30 * 0.01 + 0.5) / 90, rel=1e-5)
    flat = [np.zeros((1, 5, 6), np.float32)]
    assert map_distance(flat, flat)["min_pearson"] == 1 and map_distance(flat, [a[1]])["min_pearson"] == 0
    assert map_distance(a, b, keep=[np.array([True, True]), np.array([False])])["maps"] == 2
    # a map whose top crosses the box threshold gets another box: its refined map is left out
    cam = np.zeros((6, 6), np.float32)
    cam[1:3, 1:3], cam[4, 4] = 1.0, 0.39
    moved = cam.copy()
    moved[4, 4] = 0.41
    assert not np.array_equal(box_mask(cam, 0.4), box_mask(moved, 0.4))
    runs = compare_runs([(cam[None], cam[None])], [(cam[None] + 1, moved[None])], 0.4)
    assert runs["cams"]["maps"] == 0 and runs["init"]["maps"] == 1


def test_paired_spreads_compare_the_same_refined_maps_on_both_sides():
    """A refined map whose boxes change in one pair only is left out of both: the two sides' extremes are
    then taken over the same maps. Here the map whose boxes jump in the reference differs most in ours."""
    cam = np.zeros((6, 6), np.float32)
    cam[1:3, 1:3], cam[4, 4] = 1.0, 0.39
    moved = cam.copy()
    moved[4, 4] = 0.41                                   # crosses the 0.4 box threshold: another box
    steady = np.zeros((6, 6), np.float32)
    steady[2:4, 2:4] = 1.0
    a = [(np.stack([cam, steady]), np.stack([cam, steady]))]
    reference = (a, [(np.stack([cam, steady + 0.01]), np.stack([moved, steady]))])
    ours = (a, [(np.stack([cam + 0.3, steady + 0.02]), np.stack([cam, steady]))])
    alone = compare_runs(*ours, 0.4)
    assert alone["cams"]["maps"] == 2 and alone["cams"]["max_abs"] == pytest.approx(0.3)
    both = paired_spreads(reference, ours, 0.4)
    assert both["ours"]["cams"]["maps"] == both["reference"]["cams"]["maps"] == 1
    assert both["ours"]["cams"]["max_abs"] == pytest.approx(0.02)
    assert both["reference"]["cams"]["max_abs"] == pytest.approx(0.01)
    assert both["ours"]["init"] == alone["init"]          # GradCAM maps: all of them, as before


def test_reference_fp16_spread_on_the_cpu(tiny_clip_path):
    """fp16 on the CPU: the reference's fp16 maps differ from its float32 ones (so fp16 really ran) and the
    spread is reported for the GradCAM and refined maps."""
    voc = builtin("voc")
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    labels = [[14, 8], [2]]
    try:
        spread = precision_spread(read_state_dict(tiny_clip_path), x, labels, list(voc.prompts) + list(voc.background),
                                  voc.template, voc.num_classes, voc.box_threshold)
    except RuntimeError as e:
        if "not implemented for 'Half'" not in str(e):
            raise
        pytest.skip(f"a torch build without fp16 CPU kernels: {e}")
    init = spread["init"]
    assert init["maps"] == 3 and 0 < init["mean_abs"] <= init["max_abs"] <= 1 and init["min_pearson"] < 1
    assert spread["cams"]["maps"] <= 3
