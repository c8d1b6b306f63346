"""Sizes, filters, corner conventions and dtypes of the resizes no parity test pins, each restated from
the reference it follows: the training rescale (WeCLIP's transforms: int() sizes, PIL bilinear image,
nearest label), the CAM files' upsampling (CLIP-ES: OpenCV bilinear, float16), inference's long-side
resize and scale pyramid (WeCLIP's test script: int() sizes, scale_factor floors), the models' logit
upsampling (align_corners=False in WeCLIP, ExCEL and deeplab-pytorch) and PAR's image resize
(align_corners=True, AFA's)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import textured_image
from pipeline.clip.random import TINY, random_clip
from pipeline.data.camfile import upsample_cams
from pipeline.data.segdata import AugConfig, augment, rescale
from pipeline.eval.infer import InferConfig, msc_logits
from pipeline.labels.par import par
from pipeline.models import DeepLab, build_model
from seg_helpers import Pointwise

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("r", [0.75, 0.55, 1.3])
def test_training_rescale_truncates_sizes_pil_bilinear_image_nearest_label(r):
    """13 x 15 by 0.75 -> int(9.75) x int(11.25) = 9 x 11 (rounding would give 10 rows)."""
    image = textured_image(13, 15, seed=0)
    label = np.random.default_rng(0).integers(0, 4, (13, 15)).astype(np.uint8)
    size = (int(r * 15), int(r * 13))
    want_img = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    want_lab = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    img, lab = rescale(image, label, r)
    np.testing.assert_array_equal(img, want_img)
    np.testing.assert_array_equal(lab, want_lab)
    # the training augmentation (a fixed scale, no crop, no flip) gives the same pair
    img, lab = augment(image, label, AugConfig(crop=0, scale_range=None, scales=(r,), flip=False),
                       np.random.default_rng(0))
    np.testing.assert_array_equal(img, want_img)
    np.testing.assert_array_equal(lab, want_lab)


def test_cam_upsampling_is_opencv_bilinear_in_float16():
    """CLIP-ES stacks its refined maps at image size as float16 (its CAM files' dtype); the CRF's unary
    is computed from these rounded values."""
    cams = np.random.default_rng(1).random((2, 3, 4)).astype(np.float32)
    out = upsample_cams(cams, (7, 9))
    assert out.dtype == np.float16 and out.shape == (2, 7, 9)
    want = np.stack([cv2.resize(c, (9, 7), interpolation=cv2.INTER_LINEAR) for c in cams]).astype(np.float16)
    np.testing.assert_array_equal(out, want)


def test_long_side_and_scale_sizes_truncate():
    """WeCLIP's test script: long side to 64 with size (int(H r), int(W r)); scale 0.75 through
    scale_factor (floor). 50 x 77 -> int(41.56) x 64 = 41 x 64 -> floor(30.75) x 48 = 30 x 48."""
    model = Pointwise()
    x = torch.randn(1, 3, 50, 77)
    out = msc_logits(model, x, InferConfig(scales=(1.0, 0.75), flip=False, long_side=64))
    assert model.sizes == [(41, 64), (30, 48)]
    base = F.interpolate(x, size=(41, 64), mode="bilinear", align_corners=False)
    want = 0
    for xs in (base, F.interpolate(base, scale_factor=0.75, mode="bilinear", align_corners=False)):
        xs = xs[:, :1]
        want = want + F.interpolate(torch.cat([xs, -xs], 1), size=(50, 77), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, want / 2)


@pytest.mark.parametrize("name", ["weclip", "excel"])
def test_training_logits_are_upsampled_without_aligned_corners(name):
    """The training forward's logits are its patch logits upsampled to the crop with align_corners=False
    (WeCLIP's and ExCEL's training scripts); dropout off so the two passes agree."""
    model = build_model({"name": name, "dropout": 0.0, "width": 32, "heads": 1, "depth": 1}, 3,
                        clip=random_clip(TINY, seed=1)).train()
    x = torch.randn(1, 3, 48, 64)
    logits = model(x, outputs="train")["logits"]
    patch = model.forward_patch_logits(x)
    want = F.interpolate(patch.float(), size=(48, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)


def test_deeplab_logits_are_upsampled_without_aligned_corners():
    """deeplab-pytorch's test: logits resized to the image with align_corners=False."""
    torch.manual_seed(0)
    model = DeepLab(3, "v2", layers=(1, 1, 1, 1), base_width=8, freeze_bn=False).eval()
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        want = F.interpolate(model.logits(x).float(), size=(33, 41), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), want)


def test_par_resizes_the_image_to_the_maps_with_aligned_corners():
    """AFA's PAR (as ExCEL's label script calls it) resizes the image to the masks with align_corners=True."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 24, 30, generator=g)
    masks = torch.rand(1, 2, 16, 20, generator=g)
    small = F.interpolate(image, size=(16, 20), mode="bilinear", align_corners=True)
    torch.testing.assert_close(par(image, masks), par(small, masks))
