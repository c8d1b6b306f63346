"""The one image loader and CLIP-ES preprocessing (its generate_cams_voc12.py).

Loading is strict (a truncated file is an error, not a grey half-image) and normalises the odd
formats users have: palette, CMYK, RGBA, 16-bit and float images, optional EXIF orientation.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps

if TYPE_CHECKING:  # torch is imported where tensors are made, so CRF workers stay light
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ExCEL normalises with ImageNet's statistics on 0-1 RGB
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH = 16
# ViT-B/16 at this many patches needs ~1 GB for one block's attention; larger images are scaled down.
DEFAULT_MAX_PATCHES = 4096

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None  # huge images are handled by downscaling, not refused


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the fix."""


def load_image(path: str | Path, exif_transpose: bool = False) -> Image.Image:
    """Decode ``path`` fully. Keeps the native mode (the reference resizes before converting to RGB),
    except that 16-bit and float images are mapped to 8-bit 'L' first (PIL would clip them to white).

    ``exif_transpose`` applies the EXIF orientation. Off by default: VOC/COCO annotations and masks
    are aligned with the stored pixel array, which is what the reference reads.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            img = im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode image ({e}); re-download or re-encode the file") from e
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{path}: image has no pixels")
    return img


def load_rgb(path: str | Path, exif_transpose: bool = False) -> np.ndarray:
    """``load_image`` as an RGB uint8 (H, W, 3) array."""
    return np.asarray(load_image(path, exif_transpose).convert("RGB"), dtype=np.uint8)


def target_size(height: int, width: int, max_patches: int = DEFAULT_MAX_PATCHES) -> tuple[int, int]:
    """Model input size (h', w'): each side rounded up to a multiple of 16 (as CLIP-ES), after a uniform
    downscale when the patch grid would exceed ``max_patches``."""
    def grid(scale: float) -> tuple[int, int]:
        return max(1, math.ceil(scale * height / PATCH)), max(1, math.ceil(scale * width / PATCH))

    scale = 1.0
    gh, gw = grid(scale)
    if gh * gw > max_patches:
        scale = math.sqrt(max_patches / (height * width / PATCH**2))
        gh, gw = grid(scale)
        while gh * gw > max_patches:
            scale *= 0.99
            gh, gw = grid(scale)
    return gh * PATCH, gw * PATCH


def load_for_model(path: str | Path, max_patches: int = DEFAULT_MAX_PATCHES, exact: bool = True,
                   exif_transpose: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load and preprocess one image: (float32 (3, h', w'), original (H, W))."""
    img = load_image(path, exif_transpose)
    return preprocess(img, target_size(img.height, img.width, max_patches), exact), (img.height, img.width)


def preprocess(img: Image.Image, size: tuple[int, int], exact: bool = True) -> torch.Tensor:
    """PIL bicubic resize to ``size`` = (h', w'), RGB, /255, CLIP normalisation -> float32 (3, h', w').

    ``exact`` resizes in the native mode and converts to RGB afterwards, as the reference does (PIL
    then resamples palette images with nearest neighbour); otherwise RGB conversion comes first.
    """
    import torch

    h, w = size
    if not exact:
        img = img.convert("RGB")
    img = img.resize((w, h), Image.BICUBIC).convert("RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def normalize_then_resize(rgb: np.ndarray, size: tuple[int, int], exact: bool = True) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised float32 (3, h', w'): normalise at full resolution (ImageNet
    statistics when ``exact``, as ExCEL's reference, else CLIP's), then bilinear (align_corners=False)
    to ``size`` = (h', w')."""
    import torch
    import torch.nn.functional as F

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if exact else (CLIP_MEAN, CLIP_STD)
    x = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    return x
