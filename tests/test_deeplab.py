"""DeepLabV2 as deeplab-pytorch trains it (CLIP-ES's final model): caffe ResNet layout, caffe input
convention, multi-scale inputs with max fusion (MSC) and its loss, parameter groups, frozen BatchNorm,
the stepped poly schedule, its checkpoint files, and training from scratch.

The reference below restates deeplab-pytorch's DeepLabV2_ResNet101_MSC (libs/models/resnet.py,
deeplabv2.py, msc.py of kazuto1011/deeplab-pytorch) independently of pipeline/, with a width
parameter so the parity test runs at test size; its module names are that code base's, so its
state_dict has the key layout of the files it writes.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.eval.infer import checkpoint_infer_config, predict_image
from pipeline.models import DeepLab, build_model, load_pretrained
from pipeline.models.msc import fuse_max, nearest_labels
from pipeline.data.segdata import AugConfig, augment, denormalize, normalize
from pipeline.train.config import ConfigError, load_config
from pipeline.train.losses import model_loss
from pipeline.train.loop import train
from pipeline.train.optim import build_optimizer, lr_factor
from seg_helpers import make_data, overrides


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ deeplab-pytorch, restated
class RefConvBnReLU(nn.Sequential):
    def __init__(self, cin, cout, k, stride, pad, dil, relu=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=0.001))
        if relu:
            self.add_module("relu", nn.ReLU())


class RefBottleneck(nn.Module):
    def __init__(self, cin, cout, stride, dil, downsample):
        super().__init__()
        mid = cout // 4
        self.reduce = RefConvBnReLU(cin, mid, 1, stride, 0, 1)
        self.conv3x3 = RefConvBnReLU(mid, mid, 3, 1, dil, dil)
        self.increase = RefConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = RefConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False) if downsample else nn.Identity()

    def forward(self, x):
        h = self.increase(self.conv3x3(self.reduce(x)))
        return F.relu(h + self.shortcut(x))


class RefResLayer(nn.Sequential):
    def __init__(self, n, cin, cout, stride, dil):
        super().__init__()
        for i in range(n):
            self.add_module(f"block{i + 1}", RefBottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                                           dil, i == 0))


class RefStem(nn.Sequential):
    def __init__(self, cout):
        super().__init__()
        self.add_module("conv1", RefConvBnReLU(3, cout, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class RefASPP(nn.Module):
    def __init__(self, cin, cout, rates):
        super().__init__()
        for i, r in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(cin, cout, 3, 1, padding=r, dilation=r, bias=True))

    def forward(self, x):
        return sum(stage(x) for stage in self.children())


class RefDeepLabV2(nn.Sequential):
    def __init__(self, n_classes, n_blocks, width=64):
        super().__init__()
        ch = [width * 2 ** p for p in range(6)]
        self.add_module("layer1", RefStem(ch[0]))
        self.add_module("layer2", RefResLayer(n_blocks[0], ch[0], ch[2], 1, 1))
        self.add_module("layer3", RefResLayer(n_blocks[1], ch[2], ch[3], 2, 1))
        self.add_module("layer4", RefResLayer(n_blocks[2], ch[3], ch[4], 1, 2))
        self.add_module("layer5", RefResLayer(n_blocks[3], ch[4], ch[5], 1, 4))
        self.add_module("aspp", RefASPP(ch[5], n_classes, [6, 12, 18, 24]))

    def freeze_bn(self):
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


class RefMSC(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base
        self.scales = [0.5, 0.75]

    def forward(self, x):
        logits = self.base(x)
        H, W = logits.shape[-2:]
        pyramid = [self.base(F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False))
                   for p in self.scales]
        every = [logits] + [F.interpolate(p, size=(H, W), mode="bilinear", align_corners=False) for p in pyramid]
        best = torch.max(torch.stack(every), dim=0)[0]
        return [logits] + pyramid + [best] if self.training else best


def random_reference(n_blocks=(1, 2, 1, 1), width=8, n_classes=5, seed=0):
    torch.manual_seed(seed)
    ref = RefMSC(RefDeepLabV2(n_classes, list(n_blocks), width))
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith("num_batches_tracked"):
                continue
            elif name.endswith("weight") and t.ndim == 4:
                t.normal_(0, (2 / t[0].numel()) ** 0.5)
            else:
                t.normal_(0, 0.2)
    return ref


def tiny_cfg(path=None, **extra):
    return {"name": "deeplabv2", "layers": [1, 2, 1, 1], "base_width": 8, "layout": "caffe",
            "msc_scales": [0.5, 0.75], "pretrained": str(path) if path else None, **extra}


# ------------------------------------------------------------------------------------- parity
def test_caffe_layout_msc_model_equals_deeplab_pytorch_with_its_weights(tmp_path):
    ref = random_reference()
    path = tmp_path / "checkpoint_final.pth"  # its training checkpoints: MSC state_dict, keys base.*
    torch.save(ref.state_dict(), path)
    msgs = []
    ours = build_model(tiny_cfg(path), 5, log=msgs.append)
    assert "loaded" in msgs[0] and "left at init" not in msgs[0] and "unused" not in msgs[0], msgs[0]
    x = torch.randn(1, 3, 67, 53) * 60  # odd sizes: the stem's ceil_mode and the floor of scaled sizes matter
    with torch.no_grad():
        ref.eval(), ours.eval()
        want = F.interpolate(ref(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        assert torch.allclose(ours(x), want, rtol=1e-4, atol=1e-4)
        ref.train(), ref.base.freeze_bn(), ours.train()  # training: frozen BN, all four outputs
        want_list, got_list = ref(x), ours(x)
    assert len(got_list) == 4 and got_list[0].shape[-2:] == (9, 7) and got_list[2].shape[-2:] == (7, 6)
    for w, g in zip(want_list, got_list):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-4)


def test_real_resnet101_key_layout_and_parameter_count():
    with torch.device("meta"):
        ref = RefMSC(RefDeepLabV2(21, [3, 4, 23, 3]))
        ours = DeepLab(21, layout="caffe", msc_scales=(0.5, 0.75))
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    rename = {k: "head.convs." + k[len("base.aspp.c"):] if k.startswith("base.aspp.") else "backbone." + k[5:]
              for k in ref_sd}
    assert set(rename.values()) == set(our_sd)
    assert all(our_sd[v].shape == ref_sd[k].shape for k, v in rename.items())
    # the same 42,500,160 parameters as torchvision's resnet101 without its fc (44,549,160 - 2,049,000)
    assert sum(p.numel() for p in ours.backbone.parameters()) == 42_500_160
    assert sum(p.numel() for p in ours.head.parameters()) == 4 * (2048 * 21 * 9 + 21)
    # where the stride is: on the 1x1 reduce conv of each stage's first block, not on the 3x3
    first = ours.backbone.layer3.block1
    assert first.reduce.conv.stride == (2, 2) and first.conv3x3.conv.stride == (1, 1)
    assert ours.backbone.layer1.pool.ceil_mode and ours.backbone.layer5.block1.conv3x3.conv.dilation == (4, 4)


# --------------------------------------------------------------------------------------- MSC
def test_msc_fusion_is_the_pixelwise_max_after_upsampling():
    base = torch.tensor([[[[1.0, 5.0], [3.0, -2.0]]]])
    half = torch.tensor([[[[4.0]]]])                       # 1x1: bilinear upsampling makes it constant
    three_q = torch.tensor([[[[0.0, 6.0], [9.0, -1.0]]]])  # same size: unchanged
    assert torch.equal(fuse_max(base, [half, three_q]), torch.tensor([[[[4.0, 6.0], [9.0, 4.0]]]]))


@pytest.mark.parametrize("size,out", [((321, 321), (41, 41)), ((321, 321), (21, 21)), ((321, 321), (31, 31)),
                                      ((50, 37), (13, 9)), ((7, 9), (20, 11))])
def test_labels_are_resized_with_pil_nearest(size, out):
    rng = np.random.default_rng(sum(size + out))
    lab = rng.integers(0, 21, size).astype(np.int64)
    lab[rng.random(size) < 0.2] = 255
    pil = np.asarray(Image.fromarray(lab.astype(np.float32)).resize((out[1], out[0]), Image.NEAREST))
    got = nearest_labels(torch.from_numpy(np.stack([lab, lab[::-1].copy()])), out)
    assert np.array_equal(got[0].numpy(), pil.astype(np.int64))
    assert got.shape == (2, *out)


def test_msc_training_loss_sums_ce_of_each_output_at_its_resolution():
    model = DeepLab(5, layers=(1, 1, 1, 1), base_width=8, layout="caffe", msc_scales=(0.5, 0.75))
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (2, 321, 321), generator=g)
    labels[:, :30] = 255
    outs = [torch.randn(2, 5, s, s, generator=g) for s in (41, 21, 31, 41)]
    want = 0.0
    for o in outs:
        n = o.shape[-1]
        lab = np.stack([np.asarray(Image.fromarray(lb.numpy().astype(np.float32)).resize((n, n), Image.NEAREST))
                        for lb in labels])
        want += F.cross_entropy(o, torch.from_numpy(lab).long(), ignore_index=255)
    assert torch.allclose(model_loss(model, outs, labels), want, rtol=1e-5)
    # a single-scale model keeps the full-size loss
    single = DeepLab(5, layers=(1, 1, 1, 1), base_width=8, layout="caffe")
    full = torch.randn(2, 5, 321, 321, generator=g)
    assert torch.allclose(model_loss(single, full, labels), F.cross_entropy(full, labels, ignore_index=255))


# ----------------------------------------------------------------------------- input convention
def test_caffe_convention_is_bgr_minus_mean_without_std():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = normalize(img, "caffe")
    bgr = img[..., ::-1].astype(np.float32) - np.array([104.008, 116.669, 122.675], np.float32)
    assert torch.allclose(x, torch.from_numpy(bgr.transpose(2, 0, 1).copy()), atol=1e-4)
    assert np.array_equal(denormalize(x, "caffe"), img)
    # padding with the mean colour is (about) zero after normalisation, as deeplab-pytorch pads
    lab = np.zeros((5, 7), np.uint8)
    pimg, plab = augment(img, lab, AugConfig(crop=12, scale_range=None, flip=False, normalize="caffe",
                                             pad_image="mean"), np.random.default_rng(0))
    pad = normalize(pimg, "caffe")[:, plab == 255]
    assert pad.abs().max() <= 0.5


def test_prediction_feeds_the_model_the_convention_it_was_trained_with():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    img = np.full((4, 6, 3), (10, 100, 200), np.uint8)  # R, G, B
    meta = {"normalize": "caffe", "infer": {"scales": [1.0], "flip": False}}
    cfg = checkpoint_infer_config(meta, {"crf": False})
    predict_image(Spy(), img, cfg, torch.device("cpu"))
    assert torch.allclose(seen[0][0, :, 0, 0], torch.tensor([200 - 104.008, 100 - 116.669, 10 - 122.675]))
    with pytest.raises(ValueError, match="trained on 'caffe' inputs"):
        checkpoint_infer_config(meta, {"normalize": "imagenet"})
    assert checkpoint_infer_config({"infer": {}}).normalize == "imagenet"  # checkpoints from before


# ------------------------------------------------------------------------------ checkpoint files
def _state(ref, prefix=""):
    return {prefix + k: v for k, v in ref.base.state_dict().items()}


def test_deeplab_pytorch_init_file_loads_into_caffe_layout_and_reports_the_rest(tmp_path):
    ref = random_reference(n_classes=91)
    # the converted caffe init file (deeplabv1_resnet101-coco.pth): no prefix, a COCO 1x1 classifier as fc
    sd = {k: v for k, v in _state(ref).items() if not k.startswith("aspp.")}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(91, 256, 1, 1), torch.randn(91)
    sd["layer9.block1.reduce.conv.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "deeplabv1_resnet101-coco.pth")
    msgs = []
    model = build_model(tiny_cfg(tmp_path / "deeplabv1_resnet101-coco.pth"), 21, log=msgs.append)
    for k, v in sd.items():
        if k.startswith("layer") and not k.startswith("layer9"):
            assert torch.equal(model.state_dict()["backbone." + k], v), k
    assert "classifier of the pretraining task ignored: fc.weight, fc.bias" in msgs[0]
    assert "unused checkpoint keys: layer9.block1.reduce.conv.weight" in msgs[0]
    assert model.freeze_bn  # a pretrained file: BatchNorm frozen (auto)
    # a training checkpoint of another class count: its ASPP is reported, the head stays at init
    other = DeepLab(21, layers=(1, 2, 1, 1), base_width=8, layout="caffe")
    rep = load_pretrained(other, _state(ref, "base."), "voc.pth")
    assert len(rep.shape_mismatch) == 8 and "base.aspp.c0.weight (91," in rep.shape_mismatch[0]
    assert "shape mismatch (left at init): base.aspp.c0.weight" in rep.summary()


@pytest.mark.parametrize("direction", ["caffe_into_torchvision", "torchvision_into_caffe"])
def test_a_checkpoint_of_the_other_layout_is_refused(tmp_path, direction):
    caffe = random_reference().state_dict()
    tv = DeepLab(5, layers=(1, 2, 1, 1), base_width=8, layout="torchvision").backbone.state_dict()
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": caffe} if direction == "caffe_into_torchvision" else {"module." + k: v for k, v in tv.items()},
               path)
    layout = "torchvision" if direction == "caffe_into_torchvision" else "caffe"
    fix = "model.layout=caffe and data.normalize=caffe" if layout == "torchvision" else \
        "model.layout=torchvision and data.normalize=imagenet"
    with pytest.raises(ValueError, match="weights.pth: a .*-layout ResNet") as e:
        build_model(tiny_cfg(path, layout=layout), 5, log=lambda *_: None)
    assert fix in str(e.value)


def test_config_refuses_frozen_bn_from_scratch_and_the_wrong_input_convention(tmp_path):
    base = ["data.root=/x"]
    with pytest.raises(ConfigError, match="model.freeze_bn=true needs model.pretrained"):
        load_config("configs/deeplab_voc.yaml", base + ["model.freeze_bn=true"])
    path = tmp_path / "init.pth"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="data.normalize='imagenet' with a caffe-layout pretrained file"):
        load_config("configs/deeplab_voc.yaml", base + [f"model.pretrained={path}", "data.normalize=imagenet"])
    with pytest.raises(ConfigError, match="set data.normalize=imagenet"):
        load_config("configs/deeplab_coco.yaml", base + [f"model.pretrained={path}", "model.layout=torchvision"])
    load_config("configs/deeplab_coco.yaml", [f"model.pretrained={path}", "model.layout=torchvision",
                                              "data.normalize=imagenet"])


# ------------------------------------------------------------------------- optimiser and BN
def test_parameter_groups_and_frozen_batchnorm(tmp_path):
    torch.save(random_reference().state_dict(), tmp_path / "init.pth")
    model = build_model(tiny_cfg(tmp_path / "init.pth"), 5, log=lambda *_: None)
    groups = {g["name"]: g for g in build_optimizer(model, load_config("configs/deeplab_voc.yaml")["optim"]).param_groups}
    assert set(groups) == {"backbone", "head_weight", "head_bias"}
    assert groups["backbone"]["lr"] == pytest.approx(2.5e-4) and groups["backbone"]["weight_decay"] == 5e-4
    assert groups["head_weight"]["lr"] == pytest.approx(2.5e-3) and groups["head_weight"]["weight_decay"] == 5e-4
    assert groups["head_bias"]["lr"] == pytest.approx(5e-3) and groups["head_bias"]["weight_decay"] == 0
    assert all(g["momentum"] == 0.9 for g in groups.values())
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["head_weight"]["params"]) == ids(c.weight for c in model.head.convs)
    assert ids(groups["head_bias"]["params"]) == ids(c.bias for c in model.head.convs)
    convs = [m.weight for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert ids(groups["backbone"]["params"]) == ids(convs)  # BatchNorm is in no group
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.head.training
    scratch = build_model(tiny_cfg(), 5, log=lambda *_: None).train()  # no file: BatchNorm trains
    assert all(m.training for m in scratch.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_poly_schedule_is_updated_every_10_iterations():
    assert [lr_factor(s, 20000, 0, 1.0, 0.9, 10) for s in (0, 9)] == [1.0, 1.0]
    assert lr_factor(10, 20000, 0, 1.0, 0.9, 10) == pytest.approx((1 - 10 / 20000) ** 0.9)
    assert lr_factor(19, 20000, 0, 1.0, 0.9, 10) == pytest.approx((1 - 10 / 20000) ** 0.9)
    assert lr_factor(15005, 20000, 0, 1.0, 0.9, 10) == pytest.approx(0.25 ** 0.9)
    assert lr_factor(19999, 20000, 0, 1.0, 0.9, 10) == pytest.approx((10 / 20000) ** 0.9)


# --------------------------------------------------------------------------- a run from scratch
def test_default_config_from_scratch_trains_with_finite_decreasing_loss(tmp_path):
    import csv

    d = make_data(tmp_path / "data", 8, 2, size=(64, 80), seed=2)
    sets = overrides(d, **{"model.layers": "[1,1,1,1]", "model.base_width": 8, "data.crop": 40,
                           "train.batch_size": 2, "train.accum": 1, "schedule.iters": 20, "train.log_every": 1})
    cfg = load_config("configs/deeplab_voc.yaml", sets)
    assert cfg["model"]["pretrained"] is None and cfg["model"]["freeze_bn"] == "auto"
    res = train(cfg, tmp_path / "run", progress=False, tensorboard=False, log=lambda *_: None)
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    lrs = [float(r["lr"]) for r in rows]  # stepped poly: constant within each block of 10 iterations
    assert lrs[0] == lrs[9] == pytest.approx(2.5e-4) and lrs[10] == lrs[19] == pytest.approx(2.5e-4 * 0.5 ** 0.9)
    from pipeline import checkpoint as ckpt_io

    meta = ckpt_io.load(tmp_path / "run")["meta"]
    assert meta["normalize"] == "caffe" and meta["family"] == "deeplab" and meta["model"]["layout"] == "caffe"
    assert res["iteration"] == 20
