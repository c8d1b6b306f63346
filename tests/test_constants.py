"""Published constants and data files, pinned against values typed here from the papers' code.

Nothing below is imported from the module it checks: a swapped mean, a colour order mix-up or an
edited prompt string in ``data/*.yaml`` changes every CAM silently, so each value is restated.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.classes import builtin
from pipeline.data.image import preprocess
from pipeline.data.segdata import AugConfig, augment, denormalize, normalize

# OpenAI CLIP's preprocessing statistics (RGB, on 0-1), as CLIP-ES uses them.
CLIP_RGB_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_RGB_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet statistics on 0-255 RGB (WeCLIP's and deeplab-pytorch's training inputs).
IMAGENET_RGB_MEAN = (123.675, 116.28, 103.53)
IMAGENET_RGB_STD = (58.395, 57.12, 57.375)

# CLIP-ES clip_text.py (identical in WeCLIP and ExCEL).
VOC_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
VOC_PROMPTS = ["aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
               "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant", "sheep",
               "sofa", "train", "tvmonitor screen"]
VOC_BACKGROUND = ["ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
                  "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock",
                  "street", "valley", "bridge", "sign"]
COCO_NAMES = [
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa", "pottedplant", "bed",
    "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]
COCO_PROMPTS = [  # 'sknowboard' is the reference's typo, kept so the prompts match it exactly
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird avian", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack,bag", "umbrella,parasol", "handbag,purse",
    "necktie", "suitcase", "frisbee", "skis", "sknowboard", "sports ball", "kite", "baseball bat", "glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "dessertspoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair seat",
    "sofa", "pottedplant", "bed", "diningtable", "toilet", "tvmonitor screen", "laptop", "mouse", "remote control",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hairdrier,blowdrier", "toothbrush"]
COCO_BACKGROUND = ["ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
                   "railway", "railroad", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street",
                   "valley", "bridge"]
TEMPLATE = "a clean origami {}."


def test_voc_class_list_is_clip_es():
    voc = builtin("voc")
    assert list(voc.names) == VOC_NAMES
    assert list(voc.prompts) == VOC_PROMPTS
    assert list(voc.background) == VOC_BACKGROUND and len(voc.background) == 25
    assert voc.template == TEMPLATE and voc.box_threshold == 0.4


def test_coco_class_list_is_clip_es():
    coco = builtin("coco")
    assert len(COCO_NAMES) == len(COCO_PROMPTS) == 80
    assert list(coco.names) == COCO_NAMES
    assert list(coco.prompts) == COCO_PROMPTS
    assert list(coco.background) == COCO_BACKGROUND and len(coco.background) == 23
    assert coco.template == TEMPLATE and coco.box_threshold == 0.7


def _solid(rgb: tuple[int, int, int], h: int = 4, w: int = 6) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


def test_clip_preprocessing_uses_openai_mean_and_std_in_rgb_order():
    rgb = (200, 90, 30)  # distinct channels: a swapped mean/std or a BGR order changes every value
    x = preprocess(Image.fromarray(_solid(rgb)), (16, 32))
    assert x.shape == (3, 16, 32)
    for c in range(3):
        want = (rgb[c] / 255.0 - CLIP_RGB_MEAN[c]) / CLIP_RGB_STD[c]
        assert torch.allclose(x[c], torch.full((16, 32), want), atol=1e-5), c


@pytest.mark.parametrize("kind,mean,std", [
    ("imagenet", IMAGENET_RGB_MEAN, IMAGENET_RGB_STD),
    ("clip", tuple(255 * m for m in CLIP_RGB_MEAN), tuple(255 * s for s in CLIP_RGB_STD))])
def test_training_normalisation_constants_in_rgb_order(kind, mean, std):
    rgb = (200, 90, 30)
    x = normalize(_solid(rgb), kind)
    assert x.shape == (3, 4, 6) and x.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(x[c], torch.full((4, 6), (rgb[c] - mean[c]) / std[c]), atol=1e-5), (kind, c)
    assert np.array_equal(denormalize(x, kind), _solid(rgb))


def test_training_inputs_default_to_imagenet_statistics():
    assert AugConfig().normalize == "imagenet"
    # the 'mean' padding colour is the RGB mean, rounded
    img, lab = augment(_solid((0, 0, 0), 8, 8), np.zeros((8, 8), np.uint8),
                       AugConfig(crop=16, scale_range=None, flip=False, pad_image="mean"), np.random.default_rng(0))
    padded = lab == 255
    assert padded.any()
    assert (img[padded] == np.round(IMAGENET_RGB_MEAN).astype(np.uint8)).all()
