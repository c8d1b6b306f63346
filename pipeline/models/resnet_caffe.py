"""The MSRA/caffe ResNet as deeplab-pytorch (Nakashima) converted it from the DeepLab caffemodels.

It differs from torchvision's ResNet in function, not in parameter shapes: each stage's stride sits on
the first 1x1 "reduce" conv (torchvision: on the 3x3), and the stem max-pool rounds up
(``ceil_mode=True``). Weights trained in one layout therefore load into the other without error but
compute something else; module names follow deeplab-pytorch (``layer1`` = stem, ``layer2..5`` = the
four stages, ``blockN.{reduce,conv3x3,increase,shortcut}.{conv,bn}``) so that its files load as they
are and a checkpoint's key names say which layout it was trained in. Inputs: the caffe convention
(BGR 0-255 minus the mean, no std; ``segdata.normalize(..., 'caffe')``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAYOUT = "caffe"


class ConvBN(nn.Sequential):
    """conv (no bias) + BatchNorm (eps 1e-5); the ReLU is applied by the caller where caffe has one."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)


class CaffeBottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int, shortcut: bool):
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBN(cin, mid, 1, stride)  # the stride is here in the caffe layout
        self.conv3x3 = ConvBN(mid, mid, 3, 1, dilation, dilation)
        self.increase = ConvBN(mid, cout, 1)
        self.shortcut = ConvBN(cin, cout, 1, stride) if shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.reduce(x))
        h = F.relu(self.conv3x3(h))
        h = self.increase(h)
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class Stem(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = ConvBN(3, width, 7, 2, 3)
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.conv1(x)))


class CaffeResNet(nn.Module):
    """Dilated caffe-layout ResNet trunk; same interface as the torchvision-layout ``ResNet``.

    ``strides``/``dilations`` per stage (DeepLabV2: (1, 2, 1, 1) / (1, 1, 2, 4), output stride 8);
    ``base_width`` 64 is the real network (ResNet-101: ``layers`` (3, 4, 23, 3)).
    """

    layout = LAYOUT

    def __init__(self, layers: Sequence[int], base_width: int = 64,
                 strides: Sequence[int] = (1, 2, 1, 1), dilations: Sequence[int] = (1, 1, 2, 4)):
        super().__init__()
        self.layer1 = Stem(base_width)
        cin = base_width
        for i, (n, s, d) in enumerate(zip(layers, strides, dilations)):
            cout = base_width * 4 * 2 ** i
            stage = nn.Sequential()
            for b in range(n):  # the first block of a stage changes width and stride, through a shortcut conv
                stage.add_module(f"block{b + 1}", CaffeBottleneck(cin if b == 0 else cout, cout, s if b == 0 else 1,
                                                                  d, b == 0))
            self.add_module(f"layer{i + 2}", stage)
            cin = cout
        self.out_channels = cin
        self.low_channels = base_width * 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) caffe-normalised -> (first-stage features (B, 4w, ~H/4, ~W/4), last-stage features)."""
        low = self.layer2(self.layer1(x))
        return low, self.layer5(self.layer4(self.layer3(low)))
