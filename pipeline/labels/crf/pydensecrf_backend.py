"""The pydensecrf backend: Krähenbühl's C++ dense CRF through its Python binding (pydensecrf or the
pydensecrf2 fork; optional, as installing it compiles C++)."""
from __future__ import annotations

import numpy as np


def available() -> bool:
    """Whether the pydensecrf module can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf(unary: np.ndarray, guide: np.ndarray, params) -> np.ndarray:
    """U (C, H*W) float32, guide (H, W, 3) uint8 -> Q (C, H, W) float32 marginals; ``params``: CRFParams.
    pydensecrf's defaults for kernel type (diagonal) and normalisation (symmetric)."""
    import pydensecrf.densecrf as dcrf

    H, W = guide.shape[:2]
    C = unary.shape[0]
    d = dcrf.DenseCRF2D(W, H, C)
    # the binding takes writable C-contiguous buffers only (arrays from a memmap or a view are read-only)
    d.setUnaryEnergy(np.require(unary, np.float32, ["C", "W"]))
    d.addPairwiseGaussian(sxy=params.pos_xy, compat=params.pos_w)
    d.addPairwiseBilateral(sxy=params.bi_xy, srgb=params.bi_rgb,
                           rgbim=np.require(guide, np.uint8, ["C", "W"]), compat=params.bi_w)
    return np.asarray(d.inference(params.iters), np.float32).reshape(C, H, W)
