"""Models: WeCLIP decoder shape and parameter count (as WeCLIP's code), frozen CLIP, DeepLab structure and
torchvision-layout checkpoint loading (the caffe layout: test_deeplab.py), the ignore-index loss,
schedules/optimisers, checkpoint compatibility."""
import pytest
import torch
from torch import nn

from pipeline import checkpoint as ckpt_io
from pipeline.clip.model import CLIP
from pipeline.models import DeepLab, WeCLIPSeg, build_model, decoder_param_count, load_pretrained, trainable_parameters
from pipeline.models.deeplab import ResNet
from pipeline.clip.random import TINY, VIT_B_16, random_clip
from pipeline.train.config import load_config
from pipeline.train.losses import segmentation_loss
from pipeline.train.optim import build_optimizer, lr_factor


def test_weclip_voc_decoder_has_spec_parameter_count_on_vit_b16():
    with torch.device("meta"):
        model = WeCLIPSeg(CLIP(VIT_B_16), num_classes=21)
    assert model.encoder_blocks == 11 and len(model.decoder.mlps) == 11 and len(model.decoder.transformer) == 3
    assert trainable_parameters(model) == 5_985_045 == decoder_param_count(768, 11, 21)
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"decoder"}
    # WeCLIP decoder's pieces: 11 x 262,656 + 721,152 + 3 x 789,760 + 5,397
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.decoder.mlps[0]) == 262_656 and count(model.decoder.fuse) == 721_152
    assert count(model.decoder.transformer[0]) == 789_760 and count(model.decoder.classifier) == 5_397
    assert model.decoder.transformer[0].attn.heads == 8


def test_weclip_trains_only_the_decoder_on_blocks_1_to_11():
    clip = random_clip(TINY, seed=0)
    model = WeCLIPSeg(clip, num_classes=5).train()
    x = torch.randn(2, 3, 50, 70)  # not multiples of 16: padded internally, cropped back
    logits = model(x)
    assert logits.shape == (2, 5, 50, 70) and logits.dtype == torch.float32
    logits.square().mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    feats = model.encode(torch.randn(1, 3, 32, 48))
    assert len(feats) == 11 and feats[0].shape == (1, 6, 64) and not feats[0].requires_grad
    inter = clip.visual.forward_intermediates(torch.zeros(1, 3, 32, 48), block_outputs=range(12))
    ours = model.encode(torch.zeros(1, 3, 32, 48))
    assert torch.equal(ours[10], inter.blocks[10][:, 1:])  # block 11 is the last one used; block 12 is not
    groups = build_optimizer(model, load_config(None)["optim"]).param_groups
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(2e-3)  # WeCLIP: 2e-4 x 10
    assert sum(p.numel() for p in groups[0]["params"]) == trainable_parameters(model)
    assert groups[0]["weight_decay"] == 0.01 and groups[0]["betas"] == (0.9, 0.999)


def test_deeplab_v2_is_resnet101_with_aspp_and_output_stride_8():
    with torch.device("meta"):
        model = DeepLab(21)
    # torchvision's resnet101 has 44,549,160 parameters, 2,049,000 of them in the fc layer we drop
    assert sum(p.numel() for p in model.backbone.parameters()) == 44_549_160 - 2_049_000
    assert [c.dilation[0] for c in model.head.convs] == [6, 12, 18, 24]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".bn" in n or "downsample.1" in n)
    small = DeepLab(5, layers=(1, 1, 1, 1), base_width=8, freeze_bn=False)
    low, feat = small.backbone(torch.randn(1, 3, 64, 96))
    assert feat.shape[-2:] == (8, 12) and low.shape[-2:] == (16, 24)
    assert small(torch.randn(2, 3, 64, 96)).shape == (2, 5, 64, 96)
    v3 = DeepLab(5, "v3plus", layers=(1, 1, 1, 1), base_width=8)
    assert v3.backbone(torch.randn(1, 3, 64, 96))[1].shape[-2:] == (4, 6)  # output stride 16
    assert v3(torch.randn(2, 3, 64, 96)).shape == (2, 5, 64, 96)
    groups = {g["name"]: g for g in build_optimizer(small, load_config("configs/deeplab_voc.yaml")["optim"]).param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(2.5e-4) and groups["head_weight"]["lr"] == pytest.approx(2.5e-3)
    assert groups["head_bias"]["weight_decay"] == 0 and groups["backbone"]["momentum"] == 0.9


def test_torchvision_backbone_checkpoint_loads_and_reports(tmp_path):
    src = ResNet((1, 2, 1, 1), base_width=8)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    sd = {k: v for k, v in src.state_dict().items()}
    state = {"module." + k: v for k, v in sd.items()} | {"fc.weight": torch.zeros(10, 256), "fc.bias": torch.zeros(10)}
    path = tmp_path / "r.pth"
    torch.save({"state_dict": state}, path)
    cfg = {"name": "deeplabv2", "layers": [1, 2, 1, 1], "base_width": 8, "pretrained": str(path)}
    msgs = []
    model = build_model(cfg, 5, log=msgs.append)
    for k, v in sd.items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert "loaded" in msgs[0] and "not in checkpoint" not in msgs[0] and "ignored: fc.weight, fc.bias" in msgs[0]
    # a shallower checkpoint loads what matches and names what did not
    other = ResNet((1, 1, 1, 1), base_width=8).state_dict()
    rep = load_pretrained(DeepLab(5, layers=(1, 2, 1, 1), base_width=8), other, "shallow.pth")
    assert any(k.startswith("backbone.layer2.1.") for k in rep.missing) and "left at init" in rep.summary()
    with pytest.raises(ValueError, match="wide.pth"):  # another width: nothing fits
        load_pretrained(DeepLab(5, layers=(1, 1, 1, 1), base_width=8), ResNet((1, 1, 1, 1), base_width=16).state_dict(),
                        "wide.pth")


@pytest.mark.parametrize("kind", ["ce", "bgfg"])
def test_pixels_labelled_255_contribute_no_gradient(kind):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 12, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (2, 12, 16), generator=g)
    labels[:, 3:8, 4:10] = 255
    labels[1, 0, :] = 255
    loss = segmentation_loss(logits, labels, kind)
    loss.backward()
    ignored = (labels == 255).unsqueeze(1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0
    assert logits.grad[~ignored].abs().sum() > 0
    # changing the logits under the ignored pixels does not change the loss
    moved = logits.detach().clone()
    moved[ignored] += 100 * torch.randn(int(ignored.sum()), generator=g)
    assert torch.allclose(segmentation_loss(moved, labels, kind), loss.detach())
    if kind == "ce":  # the mean runs over kept pixels only
        keep = labels != 255
        manual = nn.functional.cross_entropy(logits.detach().permute(0, 2, 3, 1)[keep], labels[keep])
        assert torch.allclose(loss.detach(), manual)
    all_ignored = torch.full_like(labels, 255)
    assert segmentation_loss(logits, all_ignored, kind).item() == 0


def test_schedule_warmup_then_poly():
    # WeCLIP's schedule: lr0 * (1 - (1 - t/50)(1 - 1e-6)) for t < 50, then (1 - t/T)^1
    assert lr_factor(0, 30000, 50, 1e-6, 1.0) == pytest.approx(1e-6)
    assert lr_factor(25, 30000, 50, 1e-6, 1.0) == pytest.approx(0.5 + 0.5e-6)
    assert lr_factor(50, 30000, 50, 1e-6, 1.0) == pytest.approx(1 - 50 / 30000)
    assert lr_factor(15000, 20000, 0, 1.0, 0.9) == pytest.approx(0.25 ** 0.9)  # DeepLab poly 0.9
    assert lr_factor(20000, 20000, 0, 1.0, 0.9) == 0


def test_checkpoint_of_another_model_or_class_list_is_refused(tmp_path):
    model = DeepLab(5, layers=(1, 1, 1, 1), base_width=8)
    meta = {"model": {"name": "deeplabv2"}, "num_classes": 5, "class_names": ["background", "a", "b", "c", "d"]}
    path = ckpt_io.save(tmp_path / "c.pt", {"meta": meta, "model": ckpt_io.model_state(model), "iteration": 3})
    ck = ckpt_io.load(path)
    ckpt_io.check_compatible(ck, "deeplabv2", meta["class_names"])
    with pytest.raises(ckpt_io.CheckpointMismatch, match=r"c\.pt.*'deeplabv2' model.*'weclip'"):
        ckpt_io.check_compatible(ck, "weclip", meta["class_names"])
    with pytest.raises(ckpt_io.CheckpointMismatch, match=r"c\.pt.*5 classes.*this run has 21"):
        ckpt_io.check_compatible(ck, "deeplabv2", ["background"] + [f"c{i}" for i in range(20)])
    with pytest.raises(ckpt_io.CheckpointMismatch, match="shape mismatch"):
        ckpt_io.load_model_state(DeepLab(21, layers=(1, 1, 1, 1), base_width=8), ck["model"], str(path))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ckpt_io.CheckpointMismatch, match="other.pt: not a segmentation checkpoint"):
        ckpt_io.load(tmp_path / "other.pt")
    # WeCLIP checkpoints hold the decoder only, never the frozen CLIP
    weclip = WeCLIPSeg(random_clip(TINY, seed=0), 5)
    assert all(k.startswith("decoder.") for k in ckpt_io.model_state(weclip))
