"""DeepLabV2 (ResNet-101, ASPP 6/12/18/24, output stride 8) and DeepLabV3+ in plain PyTorch.

Two ResNet layouts (see ``resnet_caffe``): 'caffe', deeplab-pytorch's MSRA ResNet (the layout of the
DeepLab caffemodels and of the files CLIP-ES trained from), and 'torchvision' (torchvision / timm /
mmcv ImageNet weights). ``load_pretrained`` reads either kind of file, refuses a file of the other
layout (told apart by its key names) and reports every key it did not use. DeepLabV2 optionally runs
deeplab-pytorch's multi-scale inputs with max fusion (``msc_scales``; see ``msc``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .msc import msc_loss, msc_outputs
from .resnet_caffe import CaffeResNet

RESNET101 = (3, 4, 23, 3)
RESNET50 = (3, 4, 6, 3)
LAYOUTS = ("caffe", "torchvision")


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision-layout ResNet trunk (no fc) with dilated later stages (stride on the 3x3 conv).

    ``strides``/``dilations`` per stage: DeepLabV2 uses strides (1, 2, 1, 1), dilations (1, 1, 2, 4)
    (output stride 8); DeepLabV3+ (1, 2, 2, 1) with (1, 1, 1, 2) (output stride 16).
    ``base_width`` 64 is the real network; smaller values make test-sized models.
    """

    layout = "torchvision"

    def __init__(self, layers: Sequence[int] = RESNET101, base_width: int = 64,
                 strides: Sequence[int] = (1, 2, 1, 1), dilations: Sequence[int] = (1, 1, 2, 4)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = base_width
        for i, (n, s, d) in enumerate(zip(layers, strides, dilations)):
            planes = base_width * 2 ** i
            down = None
            if s != 1 or inplanes != planes * 4:
                down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=s, bias=False), nn.BatchNorm2d(planes * 4))
            blocks = [Bottleneck(inplanes, planes, s, d, down)]
            inplanes = planes * 4
            blocks += [Bottleneck(inplanes, planes, 1, d) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = inplanes
        self.low_channels = base_width * 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (layer1 features (B, 4w, H/4, W/4), layer4 features (B, 32w, H/os, W/os))."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


class ASPPv2(nn.Module):
    """DeepLabV2 classifier: parallel 3x3 convs with dilations 6/12/18/24 straight to classes, summed."""

    def __init__(self, in_ch: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_ch, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates)
        for c in self.convs:  # deeplab-pytorch's init of the classifier
            nn.init.normal_(c.weight, 0, 0.01)
            nn.init.zeros_(c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(c(x) for c in self.convs)


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPPv3(nn.Module):
    """DeepLabV3 ASPP: 1x1, three dilated 3x3 and image pooling branches, projected to ``ch`` channels."""

    def __init__(self, in_ch: int, ch: int = 256, rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_ch, ch)] + [_conv_bn_relu(in_ch, ch, 3, r) for r in rates])
        self.pool = _conv_bn_relu(in_ch, ch)
        self.project = nn.Sequential(_conv_bn_relu((len(rates) + 2) * ch, ch), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLab(nn.Module):
    """DeepLabV2 (``variant='v2'``) or DeepLabV3+ (``'v3plus'``) on a dilated ResNet of ``layout``.

    ``forward`` returns logits (B, C, H, W) upsampled bilinearly to the input size; with ``msc_scales``
    (DeepLabV2 as deeplab-pytorch trains it: (0.5, 0.75)) it returns in training mode the list
    [scale 1, each scale, max] at the network's own output resolution, for ``training_loss``, and in
    eval mode the max, upsampled. ``freeze_bn`` keeps the backbone's BatchNorm in eval mode with frozen
    affine parameters (statistics of the pretrained file; batch 5 is too small to train them).
    """

    frozen_prefixes: tuple[str, ...] = ()
    family = "deeplab"

    def __init__(self, num_classes: int, variant: str = "v2", layers: Sequence[int] = RESNET101,
                 base_width: int = 64, freeze_bn: bool = True, layout: str = "torchvision",
                 msc_scales: Sequence[float] = ()):
        super().__init__()
        if variant not in ("v2", "v3plus"):
            raise ValueError(f"unknown DeepLab variant {variant!r}; choose v2 or v3plus")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown ResNet layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        self.variant = variant
        self.freeze_bn = freeze_bn
        self.msc_scales = tuple(float(s) for s in msc_scales)
        trunk = CaffeResNet if layout == "caffe" else ResNet
        if variant == "v2":
            self.backbone = trunk(layers, base_width, (1, 2, 1, 1), (1, 1, 2, 4))
            self.head = ASPPv2(self.backbone.out_channels, num_classes)
        else:
            ch = max(16, 4 * base_width)  # 256 at full width
            self.backbone = trunk(layers, base_width, (1, 2, 2, 1), (1, 1, 1, 2))
            self.aspp = ASPPv3(self.backbone.out_channels, ch)
            low = max(8, 3 * base_width // 4)  # 48 at full width
            self.low_proj = _conv_bn_relu(self.backbone.low_channels, low)
            self.head = nn.Sequential(_conv_bn_relu(ch + low, ch, 3), _conv_bn_relu(ch, ch, 3),
                                      nn.Conv2d(ch, num_classes, 1))
        if freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)

    @property
    def layout(self) -> str:
        return self.backbone.layout

    def train(self, mode: bool = True) -> "DeepLab":
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised -> logits (B, C, h, w) at the network's output stride."""
        low, x = self.backbone(images)
        if self.variant == "v2":
            return self.head(x)
        x = F.interpolate(self.aspp(x), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([x, self.low_proj(low)], dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """images (B, 3, H, W) normalised -> logits (B, C, H, W) float32 (MSC training: the list above)."""
        if self.msc_scales:
            outs = msc_outputs(self.logits, images, self.msc_scales)
            if self.training:
                return outs
            logits = outs[-1]
        else:
            logits = self.logits(images)
        return F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def training_loss(self, outputs: torch.Tensor | list[torch.Tensor], labels: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The trainer's hook: ``loss_fn`` on full-size logits, or (MSC) summed over the four outputs at
        their own resolutions, labels (B, H, W) resized nearest."""
        if isinstance(outputs, (list, tuple)):
            return msc_loss(outputs, labels, loss_fn)
        return loss_fn(outputs, labels)

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        """deeplab-pytorch's groups: backbone at lr; head weights at lr x mult; head biases at lr x 2 mult,
        without weight decay (the caffe convention deeplab-pytorch keeps). Frozen BatchNorm parameters
        are in no group."""
        head = [(n, p) for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        groups = [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr,
             "weight_decay": weight_decay, "name": "backbone"},
            {"params": [p for n, p in head if not n.endswith("bias")], "lr": lr * head_lr_mult,
             "weight_decay": weight_decay, "name": "head_weight"},
            {"params": [p for n, p in head if n.endswith("bias")], "lr": lr * 2 * head_lr_mult,
             "weight_decay": 0.0, "name": "head_bias"}]
        return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------- pretrained checkpoints
@dataclass
class LoadReport:
    """What ``load_pretrained`` did: keys loaded, model keys left at init, checkpoint keys not used."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    layout: str | None = None

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
        lines = [f"loaded {len(self.loaded)} tensors ({self.layout or 'unknown'} ResNet layout)"]
        if self.missing:
            lines.append(f"not in checkpoint (left at init): {few(self.missing)}")
        if self.shape_mismatch:
            lines.append(f"shape mismatch (left at init): {few(self.shape_mismatch)}")
        if self.unexpected:
            lines.append(f"unused checkpoint keys: {few(self.unexpected)}")
        if self.ignored:
            lines.append(f"classifier of the pretraining task ignored: {few(self.ignored)}")
        return "; ".join(lines)


_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "base.", "resnet.", "body.")
# deeplab-pytorch names: layer1 = stem (conv1.conv / conv1.bn), layer2..5 = stages of blockN.
_CAFFE_KEY = re.compile(r"^layer\d\.(block\d+\.|conv1\.(conv|bn)\.)")
# torchvision / timm / mmcv names: conv1, bn1, layer1..4 of numbered blocks.
_TORCHVISION_KEY = re.compile(r"^(conv1\.weight$|bn1\.|layer\d\.\d+\.)")
_CAFFE_ASPP = re.compile(r"^aspp\.c(\d+)\.(weight|bias)$")
_FIX = {"caffe": "set model.layout=caffe and data.normalize=caffe (deeplab-pytorch's ResNet and input convention)",
        "torchvision": "set model.layout=torchvision and data.normalize=imagenet (torchvision/timm ImageNet weights)"}


def strip_prefixes(key: str) -> str:
    """Remove wrapper prefixes (``module.``, ``base.`` of deeplab-pytorch's MSC, ``backbone.`` ...)."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def detect_layout(keys) -> str | None:
    """'caffe' (deeplab-pytorch names), 'torchvision' or None (neither) from a checkpoint's key names."""
    names = [strip_prefixes(k) for k in keys]
    caffe = sum(bool(_CAFFE_KEY.match(k)) for k in names)
    tv = sum(bool(_TORCHVISION_KEY.match(k)) for k in names)
    if not caffe and not tv:
        return None
    return "caffe" if caffe >= tv else "torchvision"


def model_key(key: str, layout: str) -> str | None:
    """A checkpoint key -> the DeepLab parameter it initialises (``backbone.*``, or ``head.convs.N.*`` for a
    deeplab-pytorch ASPP), or None for keys never used (BatchNorm counters, pretraining classifiers)."""
    key = strip_prefixes(key)
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
        return None
    if layout == "caffe" and (m := _CAFFE_ASPP.match(key)):
        return f"head.convs.{m[1]}.{m[2]}"
    return "backbone." + key


def read_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth/.pt file (weights only), unwrapping 'state_dict' / 'model' entries."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone checkpoint not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a PyTorch state_dict ({type(e).__name__}: {str(e)[:200]})") from e
    for key in ("state_dict", "model", "net"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state_dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_pretrained(model: DeepLab, state: dict[str, torch.Tensor], source: str = "checkpoint",
                    min_fraction: float = 0.5) -> LoadReport:
    """Copy the tensors of ``state`` that fit ``model`` (in place) and report the rest.

    Reads deeplab-pytorch files (its converted caffe init files, e.g. ``deeplabv1_resnet101-coco.pth``,
    and its MSC training checkpoints with ``base.`` prefixes, whose ASPP is loaded too when the class
    count matches) into the caffe layout, and torchvision/timm/mmcv ResNets into the torchvision layout.
    Raises ``ValueError`` naming ``source`` for a file of the other layout (its weights would compute
    another function) and when under ``min_fraction`` of the backbone's tensors match.
    """
    layout = model.layout
    found = detect_layout(state)
    if found is not None and found != layout:
        example = next(k for k in state if (_CAFFE_KEY if found == "caffe" else _TORCHVISION_KEY).match(strip_prefixes(k)))
        raise ValueError(f"{source}: a {found}-layout ResNet (keys like {example!r}) cannot initialise this "
                         f"{layout}-layout model: the layouts put the stride in different convs, so the weights "
                         f"would load and compute something else; {_FIX[found]}")
    own = model.state_dict()
    report, mapped = LoadReport(layout=found), {}
    for k, v in state.items():
        nk = model_key(k, layout)
        if nk is None:
            if not k.endswith("num_batches_tracked"):
                report.ignored.append(k)
        elif nk not in own:
            report.unexpected.append(k)
        elif own[nk].shape != v.shape:
            report.shape_mismatch.append(f"{k} {tuple(v.shape)} vs {tuple(own[nk].shape)}")
        else:
            mapped[nk] = v
    wanted = [k for k in own if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    report.missing = [k for k in wanted if k not in mapped]
    report.loaded = sorted(mapped)
    n_backbone = sum(k.startswith("backbone.") for k in mapped)
    if n_backbone < min_fraction * len(wanted):
        raise ValueError(f"{source}: only {n_backbone} of {len(wanted)} backbone tensors match a {layout}-layout "
                         f"ResNet with this depth/width ({report.summary()}); is it a ResNet-101 checkpoint?")
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v.to(own[k].dtype))
    return report
