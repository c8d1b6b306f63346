"""Dense CRF refinement of CAMs as CLIP-ES's eval_cam_with_crf.py does it (SPEC 5.3).

Small pure functions (numpy in, numpy out); the one call into pydensecrf is ``dense_crf``.
Shapes: K foreground CAMs, C = K + 1 channels (background first), H x W original image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..classes import IGNORE_INDEX

# deeplab-pytorch's BGR mean, subtracted from the guide image by the reference (SPEC 5.3 step 1).
BGR_MEAN = (104.008, 116.669, 122.675)
UNARY_CLIP = 1e-5
GUIDES = ("wrapped", "plain")
CONFIDENCE_RULES = ("crf", "raw", "none")


@dataclass(frozen=True)
class CRFParams:
    """pydensecrf settings; defaults are CLIP-ES's (= deeplab-pytorch's VOC test CRF)."""

    iters: int = 10
    pos_xy: float = 1.0     # Gaussian kernel sxy
    pos_w: float = 3.0      # Gaussian kernel compat
    bi_xy: float = 67.0     # bilateral kernel sxy
    bi_rgb: float = 3.0     # bilateral kernel srgb
    bi_w: float = 4.0       # bilateral kernel compat

    def as_dict(self) -> dict:
        return asdict(self)


def wrapped_guide(image_rgb: np.ndarray) -> np.ndarray:
    """The reference's bilateral guide: BGR uint8 minus ``BGR_MEAN`` cast back to uint8.

    (H, W, 3) uint8 RGB -> (H, W, 3) uint8 BGR, C-contiguous. The reference's float->uint8 cast truncates
    toward zero and, on x86, wraps negatives modulo 256 (100 - 104.008 = -4.008 -> -4 -> 252); this is
    emulated explicitly so the result does not depend on the platform (ARM would saturate to 0).
    """
    bgr = image_rgb[..., ::-1].astype(np.float32) - np.asarray(BGR_MEAN, np.float32)
    return np.ascontiguousarray(np.mod(np.trunc(bgr).astype(np.int16), 256).astype(np.uint8))


def plain_guide(image_rgb: np.ndarray) -> np.ndarray:
    """The undistorted image as bilateral guide (the fix for SPEC 10.8): (H, W, 3) uint8 RGB -> same, BGR.

    BGR order keeps parity with the reference; the bilateral kernel is isotropic in colour, so the
    channel order does not change the result.
    """
    return np.ascontiguousarray(image_rgb[..., ::-1], dtype=np.uint8)


def guide_image(image_rgb: np.ndarray, guide: str = "wrapped") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 guide for ``addPairwiseBilateral`` ('wrapped' | 'plain')."""
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"guide image must be uint8 (H, W, 3), got {image_rgb.dtype} {image_rgb.shape}")
    if guide == "wrapped":
        return wrapped_guide(image_rgb)
    if guide == "plain":
        return plain_guide(image_rgb)
    raise ValueError(f"unknown guide {guide!r}; choose one of {GUIDES}")


def keys_ext(keys: np.ndarray) -> np.ndarray:
    """0-based foreground keys (K,) -> label values (K+1,) uint8: [0, keys + 1] (background first)."""
    return np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)


def background_probs(cams: np.ndarray, power: float = 1.0) -> np.ndarray:
    """CAMs (K, H, W) -> P (K+1, H, W) in the CAMs' dtype: row 0 = (1 - max_k cam_k) ** power.

    The reference keeps float16 here (its CAM files are float16) and does not normalise P.
    """
    bg = 1 - np.max(cams, axis=0, keepdims=True)
    if power != 1:
        bg = np.power(bg, power).astype(cams.dtype, copy=False)
    return np.concatenate([bg.astype(cams.dtype, copy=False), cams], axis=0)


def unary_energy(probs: np.ndarray) -> np.ndarray:
    """P (C, H, W) -> U = -log(clip(P, 1e-5, 1)) as C-contiguous float32 (C, H*W).

    Evaluated in P's dtype (float16 for the reference: both the clip bound and the log are rounded
    to float16) and only then widened, as pydensecrf's ``setUnaryEnergy`` needs float32.
    """
    clipped = np.clip(probs, probs.dtype.type(UNARY_CLIP), probs.dtype.type(1))
    u = -np.log(clipped)
    return np.ascontiguousarray(u.reshape(probs.shape[0], -1), dtype=np.float32)


def dense_crf(unary: np.ndarray, guide: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field inference: U (C, H*W) float32, guide (H, W, 3) uint8 -> Q (C, H, W) float32 marginals.

    Gaussian kernel (pos_xy, pos_w) and bilateral kernel (bi_xy, bi_rgb, bi_w), pydensecrf defaults for
    kernel type (diagonal) and normalisation (symmetric), ``params.iters`` iterations.
    """
    import pydensecrf.densecrf as dcrf  # C extension; imported here so metrics-only users need not load it

    H, W = guide.shape[:2]
    C = unary.shape[0]
    if unary.shape != (C, H * W):
        raise ValueError(f"unary shape {unary.shape} does not match guide {guide.shape} ({C} x {H * W} expected)")
    d = dcrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=params.pos_xy, compat=params.pos_w)
    d.addPairwiseBilateral(sxy=params.bi_xy, srgb=params.bi_rgb,
                           rgbim=np.ascontiguousarray(guide, dtype=np.uint8), compat=params.bi_w)
    return np.asarray(d.inference(params.iters), np.float32).reshape(C, H, W)


def labels_from_scores(scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Scores (K+1, H, W), background first -> uint8 (H, W) label map keys_ext[argmax].

    ``np.argmax`` returns the first maximum, so ties go to the lowest channel (background first).
    """
    return keys_ext(keys)[np.argmax(scores, axis=0)]


def crf_low_confidence(q: np.ndarray, conf: float) -> np.ndarray:
    """CRF marginals (C, H, W) -> bool (H, W): True where max_c Q < conf (the reference's 255 rule)."""
    return np.max(q, axis=0) < conf


def raw_low_confidence(cams: np.ndarray, conf: float) -> np.ndarray:
    """The paper's rule on raw CAMs (SPEC 5.3 PAPER!=CODE, Eq. 8-9): (K, H, W) -> bool (H, W), True where
    max(1 - max_c X, max_c X) < conf, i.e. the CAM is neither confidently foreground nor background."""
    m = np.max(cams, axis=0).astype(np.float32)
    return np.maximum(1 - m, m) < conf


def refine(image_rgb: np.ndarray, keys: np.ndarray, cams: np.ndarray, *, params: CRFParams = CRFParams(),
           guide: str = "wrapped", conf: float = 0.95, confidence: str = "crf", power: float = 1.0) -> np.ndarray:
    """One image: RGB (H, W, 3) uint8, keys (K,), CAMs (K, H, W) at image resolution -> uint8 (H, W) labels
    (0 background, c + 1 class c, 255 where the ``confidence`` rule rejects the pixel; 'none' keeps all)."""
    if cams.shape[1:] != image_rgb.shape[:2]:
        raise ValueError(f"CAMs {cams.shape[1:]} and image {image_rgb.shape[:2]} differ in size")
    if confidence not in CONFIDENCE_RULES:
        raise ValueError(f"unknown confidence rule {confidence!r}; choose one of {CONFIDENCE_RULES}")
    probs = background_probs(cams, power)
    q = dense_crf(unary_energy(probs), guide_image(image_rgb, guide), params)
    label = labels_from_scores(q, keys)
    if confidence == "crf":
        label[crf_low_confidence(q, conf)] = IGNORE_INDEX
    elif confidence == "raw":
        label[raw_low_confidence(cams, conf)] = IGNORE_INDEX
    return label
