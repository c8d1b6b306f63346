"""ExCEL's segmentation model with learnable visual calibration (Yang et al., "Exploring CLIP's dense
knowledge for weakly supervised semantic segmentation", CVPR 2025).

The frozen CLIP image encoder runs its calibrated forward (the last blocks carry a second,
intra-correlation path; see ``VisionTransformer.forward_calibrated``) and all 12 blocks' patch
tokens feed WeCLIP's decoder: one MLP per block, a 1x1 fusion conv and Dropout2d give the fused
features F_d, then 3 transformer blocks and a 1x1 classifier. F_d doubles as ExCEL's adapter: its
cosine similarities, centred and sharpened, become

- the dynamic relations E, added to every calibrated head's patch-patch map in a second,
  gradient-free encoder pass whose CAMs (dynamic CAMs) replace the static ones later in training
  (``pipeline.train.online.excel`` runs it);
- the affinity A_f that filters the attention used to refine CAMs and that the diversity loss trains.

Statistics: the reference centres the similarities with the mean over the whole batch tensor, so an
image's relations and affinity depend on its batch mates. ``statistics='batch'`` (default) keeps
that; ``'image'`` centres each image with its own mean. Segmentation logits never depend on it.

Trainable parameters (ViT-B/16, 21 classes): 12 x 262,656 + 786,688 + 3 x 789,760 + 5,397 = 6,313,237.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..clip.model import CLIP, Calibrated, acc_dtype
from .weclip import WeCLIPSeg

STATISTICS = ("batch", "image")


# ------------------------------------------------------------------------------------------ maths
def centred_similarity(fused: torch.Tensor, statistics: str = "batch", scale: float = 3.0) -> torch.Tensor:
    """F_d (B, c, h, w) -> scale · (cos - mean) (B, n, n) float32 (float64 for float64 input), n = h·w,
    cos between the channel vectors of every pair of patches, the mean over the whole batch ('batch')
    or per image ('image')."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    q = F.normalize(fused.to(acc_dtype(fused.dtype)).flatten(2), dim=1)                # (B, c, n)
    cos = q.transpose(1, 2) @ q
    mean = cos.mean() if statistics == "batch" else cos.mean(dim=(1, 2), keepdim=True)
    return scale * (cos - mean)


def dynamic_relation(fused: torch.Tensor, statistics: str = "batch", scale: float = 3.0) -> torch.Tensor:
    """ExCEL's dynamic token relations E (B, n, n) float32 from F_d (B, c, h, w): the centred
    similarity r, its negative part masked out (-inf), softmax over each row. Each token keeps
    itself (cos 1 is never below the mean), so no row is empty."""
    r = centred_similarity(fused, statistics, scale)
    keep = (r >= 0) | torch.eye(r.shape[-1], dtype=torch.bool, device=r.device)
    return r.masked_fill(~keep, float("-inf")).softmax(dim=-1)


def feature_affinity(fused: torch.Tensor, statistics: str = "batch", scale: float = 3.0) -> torch.Tensor:
    """A_f = sigmoid(centred similarity) (B, n, n) float32 in (0, 1), differentiable in F_d."""
    return torch.sigmoid(centred_similarity(fused, statistics, scale))


# ----------------------------------------------------------------------------------------- model
class ExcelSeg(WeCLIPSeg):
    """Frozen calibrated CLIP image encoder + WeCLIP's decoder over all blocks, with ExCEL's adapter.

    calibrated_blocks: final blocks with the calibrated path (reference 5); attention_layers: final
    blocks whose attention is returned for CAM refinement (6); pos_via: side of the grid the
    positional table is resized to first in training (the reference's 20 x 20, None: direct);
    eval_pos_via: the same in eval mode (the reference's inference script builds its encoder without
    the resize: None); exact: calibrated blocks report the head sum of attention (reference) instead
    of the mean; statistics, relation_scale: see ``centred_similarity``. The dynamic pass is the
    online label maker's (``online.excel``): ``encode_calibrated`` with ``dynamic_relation(F_d)``, which it
    computes as ``recalibrate`` of the training pass.
    """

    def __init__(self, clip: CLIP, num_classes: int, width: int = 256, heads: int = 8, depth: int = 3,
                 dropout: float = 0.1, calibrated_blocks: int = 5, attention_layers: int = 6,
                 pos_via: int | None = 20, eval_pos_via: int | None = None, exact: bool = True,
                 statistics: str = "batch", relation_scale: float = 3.0):
        super().__init__(clip, num_classes, clip.arch.vision_layers, width, heads, depth, dropout)
        n = clip.arch.vision_layers
        if not 1 <= calibrated_blocks < n or not 1 <= attention_layers <= n:
            raise ValueError(f"calibrated_blocks must be in 1..{n - 1} and attention_layers in 1..{n}, "
                             f"got {calibrated_blocks} and {attention_layers}")
        if statistics not in STATISTICS:
            raise ValueError(f"model.statistics must be one of {STATISTICS}, got {statistics!r}")
        self.calibrated_blocks, self.attention_layers = int(calibrated_blocks), int(attention_layers)
        self.pos_via, self.eval_pos_via, self.exact = pos_via, eval_pos_via, bool(exact)
        self.statistics, self.relation_scale = statistics, float(relation_scale)

    @torch.no_grad()
    def encode_calibrated(self, images: torch.Tensor, relation: torch.Tensor | None = None,
                          keep_qkv: bool = False) -> Calibrated:
        """images (B, 3, H, W), multiples of the patch size -> the calibrated pass with decoder maps and
        the attention of the last ``attention_layers`` blocks; ``relation`` (B, n, n) or None; ``keep_qkv``:
        also what ``VisionTransformer.recalibrate`` needs for the dynamic pass."""
        n = len(self.encoder.blocks)
        return self.encoder.forward_calibrated(
            images, self.calibrated_blocks, attention_blocks=range(n - self.attention_layers, n),
            calibrated_attention="sum" if self.exact else "mean", relation=relation, features=True,
            pos_via=self.pos_via if self.training else self.eval_pos_via, keep_qkv=keep_qkv)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) -> the decoder's 12 maps (B, n, D), CLS dropped."""
        return [f[:, 1:] for f in self.encode_calibrated(images).features]

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch, images.shape[-1] // self.patch

    def _train_outputs(self, images: torch.Tensor, attention_blocks: Sequence[int] = ()) -> dict:
        """``forward(images, outputs='train')`` for crops whose sides are multiples of the patch size:
        logits (B, C, H, W), affinity A_f (B, n, n), fused F_d (B, width, h, w), grid (h, w) and
        intermediates, the calibrated pass (``clip.Calibrated``: tokens, decoder maps, attention of
        the last ``attention_layers`` blocks, which is all online labels use: ``attention_blocks``
        is accepted for the shared interface only; and the calibrated blocks' q, k, v, from which the
        label maker's dynamic pass recomputes the calibrated path alone)."""
        H, W = images.shape[-2:]
        if H % self.patch or W % self.patch:
            raise ValueError(f"training crops must be multiples of the patch size {self.patch}, got {H}x{W}")
        grid = self.grid(images)
        enc = self.encode_calibrated(images, keep_qkv=True)
        fused = self.decoder.fused([f[:, 1:] for f in enc.features], grid)
        logits = F.interpolate(self.decoder.head(fused).float(), size=(H, W), mode="bilinear", align_corners=False)
        return {"logits": logits, "affinity": feature_affinity(fused, self.statistics, self.relation_scale),
                "fused": fused, "grid": grid, "intermediates": enc}


def build(cfg: Mapping[str, Any], num_classes: int, clip: CLIP) -> ExcelSeg:
    """``ExcelSeg`` from the ``model:`` section of a training config."""
    return ExcelSeg(clip, num_classes, int(cfg.get("width", 256)), int(cfg.get("heads", 8)), int(cfg.get("depth", 3)),
                    float(cfg.get("dropout", 0.1)), int(cfg.get("calibrated_blocks", 5)),
                    int(cfg.get("attention_layers", 6)), cfg.get("pos_via", 20), cfg.get("eval_pos_via"),
                    bool(cfg.get("exact", True)), cfg.get("statistics", "batch"),
                    float(cfg.get("relation_scale", 3.0)))
