"""Periodic validation during training: mIoU of the model on the validation samples."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn


def validate(model: nn.Module, samples, cfg: Mapping, device: torch.device, num_classes: int) -> float:
    """mIoU (0..1) of ``model`` on validation samples with the ``val`` inference settings."""
    from ..data.segdata import read_pair
    from ..eval.infer import InferConfig, predict_image
    from ..eval.metrics import confusion_matrix, mean_iou

    icfg = InferConfig.from_dict({**cfg["val"], "normalize": cfg["data"]["normalize"]})
    conf = np.zeros((num_classes, num_classes), np.int64)
    was_training = model.training
    model.eval()
    for s in samples:
        image, mask = read_pair(s)
        conf += confusion_matrix(predict_image(model, image, icfg, device), mask, num_classes)
    model.train(was_training)
    return mean_iou(conf)


def validate_run(model: nn.Module, samples, cfg: Mapping, proc, num_classes: int, step: int, say) -> float | None:
    """Validation mIoU at iteration ``step`` on rank 0 (None on the others, which wait for it)."""
    from ..checkpoint import unwrap

    miou = None
    if proc.rank == 0:
        miou = validate(unwrap(model), samples, cfg, proc.device, num_classes)
        say(f"iteration {step}: validation mIoU {100 * miou:.2f}%")
    proc.barrier()
    return miou
