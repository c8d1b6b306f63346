"""Dense CRF refinement (Krähenbühl & Koltun, NeurIPS 2011) of class probabilities, as CLIP-ES's
eval_cam_with_crf.py, deeplab-pytorch's test script, WeCLIP and ExCEL run it, with two backends:

- ``pydensecrf``: the C++ library (pydensecrf / pydensecrf2; optional, needs a compiler to install);
- ``torch``: the same mean-field inference on the permutohedral lattice in plain PyTorch
  (``torch_backend``, ``permutohedral``), on any device, for a batch of images at once; ``batch`` makes
  the label maps of such a batch on the device, equal to ``refine``'s.

Small pure functions (numpy in, numpy out); ``dense_crf`` runs the inference on either backend,
``crf_scores`` adds the resolution cap for huge images and ``refine`` makes one image's label map.
Shapes: K foreground CAMs, C = K + 1 channels (background first), H x W original image.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from ...classes import IGNORE_INDEX

# deeplab-pytorch's BGR mean, subtracted from the guide image by CLIP-ES and deeplab-pytorch.
BGR_MEAN = (104.008, 116.669, 122.675)
UNARY_CLIP = 1e-5
# wrapped: BGR minus BGR_MEAN, cast to uint8 with wrap-around (CLIP-ES, deeplab-pytorch);
# plain: the image in BGR order; rgb: the image in RGB order (WeCLIP, ExCEL).
GUIDES = ("wrapped", "plain", "rgb")
CONFIDENCE_RULES = ("crf", "raw", "none")
BACKENDS = ("auto", "torch", "pydensecrf")
# Larger images run the CRF at a reduced size (see ``crf_scores``); VOC and COCO images stay far below.
DEFAULT_MAX_PIXELS = 1_000_000


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


@dataclass(frozen=True)
class Preset:
    """A method's CRF: its parameters and the guide image it gives the bilateral kernel."""

    params: CRFParams
    guide: str


# The guide's channel order changes labels: the exact Gaussian is symmetric in the colour channels, but
# the permutohedral lattice that approximates it scales each feature dimension differently (and the
# wrapped guide's channels wrap at different values), so swapping RGB and BGR changes labels (up to 0.2 %
# of pixels on our synthetic VOC-sized scenes, more on some photographs). Each preset fixes its guide's order.
PRESETS = {
    "clipes": Preset(CRFParams(10, 1.0, 3.0, 67.0, 3.0, 4.0), "wrapped"),   # CLIP-ES pseudo labels
    "deeplab": Preset(CRFParams(10, 1.0, 3.0, 67.0, 3.0, 4.0), "wrapped"),  # deeplab-pytorch test CRF
    "weclip": Preset(CRFParams(10, 3.0, 3.0, 64.0, 5.0, 4.0), "rgb"),       # WeCLIP's DenseCRF
    "excel": Preset(CRFParams(10, 1.0, 3.0, 67.0, 3.0, 4.0), "rgb"),        # ExCEL's pseudo labels
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown CRF preset {name!r}; choose one of {tuple(PRESETS)}")
    return PRESETS[name]


def wrapped_guide(image_rgb: np.ndarray) -> np.ndarray:
    """The reference's bilateral guide: BGR uint8 minus ``BGR_MEAN`` cast back to uint8.

    (H, W, 3) uint8 RGB -> (H, W, 3) uint8 BGR, C-contiguous. The reference's float->uint8 cast truncates
    toward zero and, on x86, wraps negatives modulo 256 (100 - 104.008 = -4.008 -> -4 -> 252); this is
    emulated explicitly so the result does not depend on the platform (ARM would saturate to 0).
    """
    bgr = image_rgb[..., ::-1].astype(np.float32) - np.asarray(BGR_MEAN, np.float32)
    return np.ascontiguousarray(np.mod(np.trunc(bgr).astype(np.int16), 256).astype(np.uint8))


def plain_guide(image_rgb: np.ndarray) -> np.ndarray:
    """The undistorted image in BGR order (the reference's order without its wrap-around):
    (H, W, 3) uint8 RGB -> same, BGR, C-contiguous."""
    return np.ascontiguousarray(image_rgb[..., ::-1], dtype=np.uint8)


def guide_image(image_rgb: np.ndarray, guide: str = "wrapped") -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 guide for the bilateral kernel ('wrapped' | 'plain' | 'rgb')."""
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"guide image must be uint8 (H, W, 3), got {image_rgb.dtype} {image_rgb.shape}")
    if guide == "wrapped":
        return wrapped_guide(image_rgb)
    if guide == "plain":
        return plain_guide(image_rgb)
    if guide == "rgb":
        return np.ascontiguousarray(image_rgb)
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


def check_probs(probs: np.ndarray) -> None:
    """``ValueError`` unless P (C, H, W) is floating point with at least one label, finite and >= 0
    (clipping would hide NaN, Inf and negative probabilities)."""
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"probabilities must be (C, H, W) with at least one label, got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probabilities must be floating point, got {probs.dtype}")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or Inf: the CAMs or model outputs are broken")
    if (probs < 0).any():
        raise ValueError(f"probabilities must be >= 0, got a minimum of {float(probs.min())}")


def neg_log(probs: np.ndarray) -> np.ndarray:
    """-log(clip(P, 1e-5, 1)) elementwise, evaluated in P's dtype (float16 for the reference: both the clip
    bound and the log are rounded to float16)."""
    with np.errstate(invalid="ignore"):  # only half_unary_table meets NaN here
        return -np.log(np.clip(probs, probs.dtype.type(UNARY_CLIP), probs.dtype.type(1)))


def unary_energy(probs: np.ndarray) -> np.ndarray:
    """P (C, H, W) -> U = -log(clip(P, 1e-5, 1)) as C-contiguous float32 (C, H*W).

    Evaluated in P's dtype (``neg_log``) and only then widened, as pydensecrf's ``setUnaryEnergy`` needs
    float32. ``ValueError`` for no channels, NaN/Inf or negative probabilities (``check_probs``).
    """
    check_probs(probs)
    return np.ascontiguousarray(neg_log(probs).reshape(probs.shape[0], -1), dtype=np.float32)


def half_unary_table() -> np.ndarray:
    """(65536,) float32: ``unary_energy`` of every float16 value, indexed by its bit pattern, so a device
    can look the reference's float16 arithmetic up instead of re-doing it with its own rounding."""
    return neg_log(np.arange(1 << 16, dtype=np.uint16).view(np.float16)).astype(np.float32)


def pydensecrf_available() -> bool:
    from .pydensecrf_backend import available

    return available()


def resolve_backend(backend: str = "auto", device=None, log=None) -> str:
    """'torch' or 'pydensecrf' for ``backend`` ('auto' | 'torch' | 'pydensecrf') on ``device``.

    auto: torch on a CUDA device; on the CPU pydensecrf when installed (it is several times faster
    there, see the README), else torch, with a note through ``log``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; choose one of {BACKENDS}")
    on_gpu = device is not None and str(device).startswith("cuda")
    if backend == "pydensecrf":
        if not pydensecrf_available():
            raise ValueError("CRF backend pydensecrf: the pydensecrf module is not installed "
                             "(pip install pydensecrf2, which compiles C++), or use --crf-backend torch")
        return backend
    if backend == "torch" or on_gpu:
        return "torch"
    if pydensecrf_available():
        return "pydensecrf"
    if log is not None:
        log("note: pydensecrf is not installed; the dense CRF runs on the PyTorch backend "
            "(same labels, slower on the CPU; pip install pydensecrf2 for the C++ one)")
    return "torch"


def check_inputs(unary: np.ndarray, guide: np.ndarray) -> tuple[int, int, int]:
    """(C, H, W) of a valid unary (C, H*W) float32 / guide (H, W, 3) uint8 pair; ``ValueError`` otherwise."""
    if guide.ndim != 3 or guide.shape[2] != 3 or guide.dtype != np.uint8:
        raise ValueError(f"CRF guide image must be uint8 (H, W, 3), got {guide.dtype} {guide.shape}")
    H, W = guide.shape[:2]
    if unary.ndim != 2 or unary.shape[0] < 1:
        raise ValueError(f"unary must be (C, H*W) with at least one label, got shape {unary.shape}")
    C = unary.shape[0]
    if unary.shape != (C, H * W):
        raise ValueError(f"unary shape {unary.shape} does not match guide {guide.shape} ({C} x {H * W} expected)")
    if not np.isfinite(unary).all():
        raise ValueError("unary energies contain NaN or Inf")
    return C, H, W


def dense_crf(unary: np.ndarray, guide: np.ndarray, params: CRFParams = CRFParams(), *,
              backend: str = "auto", device=None) -> np.ndarray:
    """Mean-field inference: U (C, H*W) float32, guide (H, W, 3) uint8 -> Q (C, H, W) float32 marginals.

    Gaussian kernel (pos_xy, pos_w) and bilateral kernel (bi_xy, bi_rgb, bi_w), diagonal kernels, symmetric
    normalisation, ``params.iters`` iterations, on ``backend`` (see ``resolve_backend``); the torch backend
    runs on ``device`` (default CPU).
    """
    C, H, W = check_inputs(unary, guide)
    if resolve_backend(backend, device) == "pydensecrf":
        from .pydensecrf_backend import dense_crf as run

        return run(unary, guide, params)
    import torch

    from .torch_backend import dense_crf as run

    u = torch.from_numpy(np.require(unary, np.float32, ["C", "W"])).to(device or "cpu").view(1, C, H, W)
    q = run(u, torch.from_numpy(np.require(guide, np.uint8, ["C", "W"]))[None], params)
    return q[0].cpu().numpy()


def capped_size(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """(h, w) at which to run the CRF: the image size, or scaled down to at most ``max_pixels``."""
    if not max_pixels or height * width <= max_pixels:
        return height, width
    s = math.sqrt(max_pixels / (height * width))
    return max(1, int(height * s)), max(1, int(width * s))


def crf_scores(image_rgb: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams(), *, guide: str = "wrapped",
               backend: str = "auto", device=None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 (H, W, 3), probabilities (C, H, W) -> CRF marginals Q (C, h, w) float32.

    (h, w) = (H, W) unless the image has more than ``max_pixels`` pixels: then image and probabilities are
    resized (area averaging) to ``capped_size`` and the kernels' sxy scaled by the same factor, so the CRF
    smooths over the same part of the image at a bounded cost (memory and time grow linearly in pixels).
    Upsample Q with ``scores_argmax``.
    """
    if probs.shape[1:] != image_rgb.shape[:2]:
        raise ValueError(f"probabilities {probs.shape[1:]} and image {image_rgb.shape[:2]} differ in size")
    H, W = image_rgb.shape[:2]
    h, w = capped_size(H, W, max_pixels)
    if (h, w) != (H, W):
        import cv2

        s = math.sqrt(h * w / (H * W))
        image_rgb = cv2.resize(image_rgb, (w, h), interpolation=cv2.INTER_AREA)
        probs = np.stack([cv2.resize(np.asarray(p, np.float32), (w, h), interpolation=cv2.INTER_AREA)
                          for p in probs]).astype(probs.dtype, copy=False)
        params = replace(params, pos_xy=params.pos_xy * s, bi_xy=params.bi_xy * s)
    return dense_crf(unary_energy(probs), guide_image(image_rgb, guide), params, backend=backend, device=device)


def scores_argmax(scores: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Scores (C, h, w) -> (argmax int64 (H, W), max float32 (H, W)) at ``size`` = (H, W), upsampling one
    channel at a time (bilinear) when (h, w) differs, so no (C, H, W) array is made. Ties go to the
    lowest channel, as with ``np.argmax``."""
    if scores.shape[1:] == tuple(size):
        return np.argmax(scores, axis=0), np.max(scores, axis=0).astype(np.float32)
    import cv2

    H, W = size
    best = np.full((H, W), -np.inf, np.float32)
    arg = np.zeros((H, W), np.int64)
    for c, s in enumerate(scores):
        up = cv2.resize(np.asarray(s, np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
        better = up > best
        best[better], arg[better] = up[better], c
    return arg, best


def labels_from_scores(scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Scores (K+1, H, W), background first -> uint8 (H, W) label map keys_ext[argmax].

    ``np.argmax`` returns the first maximum, so ties go to the lowest channel (background first).
    """
    return keys_ext(keys)[np.argmax(scores, axis=0)]


def crf_low_confidence(q: np.ndarray, conf: float) -> np.ndarray:
    """CRF marginals (C, H, W) -> bool (H, W): True where max_c Q < conf (the reference's 255 rule)."""
    return np.max(q, axis=0) < conf


def raw_low_confidence(cams: np.ndarray, conf: float) -> np.ndarray:
    """The CLIP-ES paper's rule on raw CAMs (Eq. 8-9; its code thresholds the CRF marginals instead):
    (K, H, W) -> bool (H, W), True where max(1 - max_c X, max_c X) < conf, i.e. the CAM is neither
    confidently foreground nor background."""
    m = np.max(cams, axis=0).astype(np.float32)
    return np.maximum(1 - m, m) < conf


def check_refine(image_rgb: np.ndarray, cams: np.ndarray, confidence: str) -> None:
    """``ValueError`` unless CAMs (K >= 1, H, W) match the RGB image (H, W, 3) and ``confidence`` is a rule."""
    if cams.shape[1:] != image_rgb.shape[:2]:
        raise ValueError(f"CAMs {cams.shape[1:]} and image {image_rgb.shape[:2]} differ in size")
    if confidence not in CONFIDENCE_RULES:
        raise ValueError(f"unknown confidence rule {confidence!r}; choose one of {CONFIDENCE_RULES}")
    if cams.shape[0] < 1:
        raise ValueError("no foreground CAMs: an image needs at least one class label to be labelled")


def refine(image_rgb: np.ndarray, keys: np.ndarray, cams: np.ndarray, *, params: CRFParams = CRFParams(),
           guide: str = "wrapped", conf: float = 0.95, confidence: str = "crf", power: float = 1.0,
           backend: str = "auto", device=None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image: RGB (H, W, 3) uint8, keys (K,), CAMs (K, H, W) at image resolution -> uint8 (H, W) labels
    (0 background, c + 1 class c, 255 where the ``confidence`` rule rejects the pixel; 'none' keeps all).
    ``backend``/``device``: see ``dense_crf``; ``max_pixels``: see ``crf_scores``."""
    check_refine(image_rgb, cams, confidence)
    q = crf_scores(image_rgb, background_probs(cams, power), params, guide=guide, backend=backend, device=device,
                   max_pixels=max_pixels)
    arg, qmax = scores_argmax(q, image_rgb.shape[:2])
    label = keys_ext(keys)[arg]
    if confidence == "crf":
        label[qmax < conf] = IGNORE_INDEX
    elif confidence == "raw":
        label[raw_low_confidence(cams, conf)] = IGNORE_INDEX
    return label
