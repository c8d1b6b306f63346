"""WeCLIP+ piece by piece: the model (two frozen backbones, two fusion heads, one shared decoder, its
size), RFM+ against a restatement of the reference's per-image, per-class refinement (VOC and COCO
code paths), GradCAM's input block, the confident-pixel replacement, the Dice and cross-branch losses
(pooled over DDP processes) and the ablation switches."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import checkpoint as ckpt_io
from pipeline.classes import builtin
from pipeline.clip.model import CLIPArch, Intermediates
from pipeline.clip.random import TINY, random_clip
from pipeline.dino.random import TINY as TINY_DINO, VIT_S_14, random_dino
from pipeline.models import build_model, trainable_parameters
from pipeline.models.weclip_plus import WeCLIPPlusSeg
from pipeline.train.losses import Pool, segmentation_loss
from pipeline.train.online import OnlineBatch, build_label_maker, pad_maps
from pipeline.train.online.weclip_plus import PlusConfig, WeCLIPPlusLabels, confident_replacement, dice_loss
from reference import scoremap2bbox

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ model
def reference_trainable_count(clip_width: int, dino_width: int, classes: int, width=256, heads=8, layers=3) -> int:
    """Trainable parameters of the reference's WeCLIP_Plus as its optimiser sees them (get_param_groups):
    two SegFormerHead(index=1) (MLP proj in->256, proj_2 256->256; linear_fuse 1x1 conv 256->256) and
    DecoderTransformer (ResidualAttentionBlocks: in_proj 3d x d + 3d, out_proj, ln_1, ln_2, c_fc d->4d,
    c_proj 4d->d; linear_pred 1x1 conv d->classes)."""
    linear = lambda i, o: i * o + o  # noqa: E731
    head = lambda d: linear(d, width) + linear(width, width) + linear(width, width)  # noqa: E731
    block = (3 * width * width + 3 * width) + linear(width, width) + 2 * width + 2 * width \
        + linear(width, 4 * width) + linear(4 * width, width)
    return head(clip_width) + head(dino_width) + layers * block + linear(width, classes)


def test_trainable_parameters_vit_b16_and_vit_s14_on_voc():
    """ViT-B/16's 768-wide tokens and ViT-S/14's 384-wide ones (the count depends on the widths only, so
    the CLIP here has ViT-B/16's width and patch but 2 blocks): 2,933,269 trainable, as the reference's."""
    arch = CLIPArch(embed_dim=512, vision_width=768, vision_layers=2, patch_size=16, grid=14, context_length=77,
                    vocab_size=49408, text_width=64, text_layers=1)
    model = build_model({"name": "weclip-plus"}, 21, clip=random_clip(arch), dino=random_dino(VIT_S_14))
    assert trainable_parameters(model) == 2_933_269 == reference_trainable_count(768, 384, 21)
    groups = model.param_groups(2e-5, 10, 0.01)
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(2e-4)
    assert sum(p.numel() for p in groups[0]["params"]) == 2_933_269
    # frozen backbones are neither optimised nor saved with the training checkpoints
    assert {k.split(".")[0] for k in ckpt_io.model_state(model)} == {"clip_head", "dino_head", "decoder"}
    model.train()
    assert not model.encoder.training and not model.dino.training and model.decoder.training


@pytest.fixture(scope="module")
def tiny():
    clip, dino = random_clip(TINY, seed=3), random_dino(TINY_DINO, seed=4)
    return clip, dino


def test_training_outputs_two_branches_one_decoder(tiny):
    clip, dino = tiny
    model = build_model({"name": "weclip-plus", "width": 64, "heads": 2}, 21, clip=clip, dino=dino).eval()
    seen = []
    hook = model.dino.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    try:
        out = model(x, outputs="train", attention_blocks=(9, 10))
    finally:
        hook.remove()
    assert seen == []                       # DINO ran through forward_features, not its plain forward
    a, b = out["branch_logits"]
    assert a.shape == b.shape == out["logits"].shape == (2, 21, 48, 64)
    assert torch.allclose(out["logits"], (a + b) / 2, atol=1e-6)
    # the CLIP map from block 11's tokens, the DINO map from the image resized to 42 x 56 (3 x 4 patches)
    # and resized to the CLIP grid, both through the one decoder
    inter = out["intermediates"]
    fc = model.clip_head(inter.blocks[10][:, 1:], (3, 4))
    resized = F.interpolate(x, size=(42, 56), mode="bilinear", align_corners=False)
    fd = model.dino_head(model.dino.forward_features(resized).patch_tokens, (3, 4))
    assert torch.allclose(out["patch_logits"], (model.decoder(fc) + model.decoder(fd)) / 2, atol=1e-5)
    f = torch.cat([fc, fd], dim=1).flatten(2)
    assert torch.allclose(out["affinity"], torch.sigmoid(f.transpose(1, 2) @ f), atol=1e-5)
    assert sorted(inter.attentions) == [9, 10] and sorted(inter.blocks) == list(range(11))
    # inference: any size, zero-padded to whole CLIP patches, the mean of the branches
    y = model(x[:1, :, :45, :60])
    assert y.shape == (1, 21, 45, 60)
    assert torch.allclose(y, model(F.pad(x[:1, :, :45, :60], (0, 4, 0, 3)))[..., :45, :60], atol=1e-5)


def test_one_branch_ablations(tiny):
    clip, dino = tiny
    only_clip = build_model({"name": "weclip-plus", "branches": "clip", "width": 64, "heads": 2}, 21, clip=clip)
    assert only_clip.dino is None and only_clip.dino_head is None      # no DINO file needed
    only_dino = build_model({"name": "weclip-plus", "branches": "dino", "width": 64, "heads": 2}, 21, clip=clip,
                            dino=dino).eval()
    assert only_dino.clip_head is None
    x = torch.randn(1, 3, 32, 48)
    out = only_dino(x, outputs="train")
    assert len(out["branch_logits"]) == 1 and torch.equal(out["logits"], out["branch_logits"][0])
    assert out["affinity"].shape == (1, 6, 6)
    with pytest.raises(ValueError, match="model.dino: path to the DINOv2 backbone"):
        build_model({"name": "weclip-plus"}, 21, clip=clip)
    with pytest.raises(ValueError, match="model.branches must be one of"):
        WeCLIPPlusSeg(clip, dino, 21, "both_ways")


# ------------------------------------------------------------------------------ label making
class FixedCAMs:
    """A CAM source serving given CAMs and last-block attention; records the tokens it was handed."""

    def __init__(self, cams, attn_last):
        self.cams, self.attn_last, self.tokens = cams, attn_last, None

    def __call__(self, batch, inter, grid):
        self.tokens = inter.tokens
        out = pad_maps([self.cams[b, : len(lab)] for b, lab in enumerate(batch.labels)], batch.labels)
        out.attention_last = self.attn_last
        return out


def fake_outputs(B, grid, size, C=21, seed=0):
    """What the model's training forward returns, with random contents: a CLIP pass with block outputs
    and row-stochastic attention of blocks 1..11, affinity, patch and full-size logits."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    attn = {i: torch.rand(B, n + 1, n + 1, generator=g).softmax(-1) for i in range(11)}
    blocks = {i: torch.randn(B, n + 1, 64, generator=g) for i in range(11)}
    inter = Intermediates(tokens=blocks[10], blocks=blocks, attentions=attn)
    return {"intermediates": inter, "affinity": torch.rand(B, n, n, generator=g) * 0.9 + 0.05, "grid": grid,
            "patch_logits": 3 * torch.randn(B, C, *grid, generator=g),
            "logits": 3 * torch.randn(B, C, *size, generator=g)}


def reference_refined(attns, seg_attn, cams, probs, labels, layers, box_threshold, size):
    """Restatement of perform_single_{voc,coco}_cam + generate_cam_label (WeCLIP+'s clip_tool.py) for one
    image: maps (L, 1+n, 1+n) of blocks 1..11 and GradCAM's block 12, affinity (n, n), CAMs (K, h, w),
    softmax probabilities (C, h, w) -> refined CAMs (K, H, W) (numpy float64 apart from cv2)."""
    h, w = cams.shape[-2:]
    A = attns[:, 1:, 1:][-layers:]
    diff = (seg_attn[None] - A).reshape(len(A), -1).sum(axis=1)
    keep = (diff <= diff.mean()).astype(np.float64)
    W = (keep[:, None, None] * A).sum(axis=0) / (keep.sum() + 1e-5) * seg_attn
    t = W / W.sum(axis=0, keepdims=True)
    t = t / t.sum(axis=1, keepdims=True)
    for _ in range(2):
        t = t / t.sum(axis=0, keepdims=True)
        t = t / t.sum(axis=1, keepdims=True)
    t = (t + t.T) / 2
    t = t @ t
    out = []
    for k, c in enumerate(labels):
        mask = np.ones((h, w))
        if box_threshold is not None:                 # COCO: boxes of the CAM before the weighting
            mask = np.zeros((h, w))
            boxes, cnt = scoremap2bbox(cams[k].astype(np.float32), box_threshold)
            for x0, y0, x1, y1 in boxes[:cnt]:
                mask[y0:y1, x0:x1] = 1
        r = ((t * mask.reshape(1, -1)) @ (cams[k] * probs[c + 1]).reshape(-1, 1)).reshape(h, w)
        r = r - r.min()
        r = r / (1e-7 + r.max())
        out.append(cv2.resize(r.astype(np.float32), (size[1], size[0])))
    return np.stack(out)


@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_rfm_plus_equals_the_reference_per_image_per_class_refinement(dataset):
    online = {"method": "weclip-plus", **({"filter_layers": 6, "cam_input_block": 10} if dataset == "voc" else
                                          {"filter_layers": 8, "box_masks": True, "box_threshold": 0.7})}
    grid, size, labels = (4, 5), (64, 80), [[2, 6], [11]]
    out = fake_outputs(2, grid, size, seed=1)
    g = torch.Generator().manual_seed(2)
    cams = torch.rand(2, 2, *grid, generator=g) ** 2
    attn_last = torch.rand(2, 21, 21, generator=g).softmax(-1)
    source = FixedCAMs(cams, attn_last)
    maker = build_label_maker(online, random_clip(TINY, seed=0), builtin(dataset), cams=source)
    layers = online["filter_layers"]
    assert maker.attention_blocks == tuple(range(12 - layers, 11))       # the last map is GradCAM's rerun
    images = torch.randn(2, 3, *size, generator=g)
    made = maker(OnlineBatch(images, labels, [(0, 0), (1, 1)]), out, 0)
    # GradCAM reran block 12 on block 10's output on VOC (the code's), on block 11's on COCO
    assert source.tokens is out["intermediates"].blocks[9 if dataset == "voc" else 10]
    probs = out["patch_logits"].softmax(dim=1).double().numpy()
    for b, lab in enumerate(labels):
        attns = torch.stack([out["intermediates"].attentions[i][b] for i in range(11)] + [attn_last[b]]).double()
        want = reference_refined(attns.numpy(), out["affinity"][b].double().numpy(), cams[b, :len(lab)].double().numpy(),
                                 probs[b], lab, layers, 0.7 if dataset == "coco" else None, size)
        np.testing.assert_allclose(made.refined[b, :len(lab)].numpy(), want, atol=2e-5)
    assert set(made.labels[1].unique().tolist()) <= {0, 12}              # background or the crop's class
    assert made.affinity_targets is None


def test_ablation_switches_change_the_refinement():
    grid, size, labels = (4, 4), (64, 64), [[3, 5]]
    out = fake_outputs(1, grid, size, seed=3)
    g = torch.Generator().manual_seed(4)
    source = FixedCAMs(torch.rand(1, 2, *grid, generator=g), torch.rand(1, 17, 17, generator=g).softmax(-1))
    clip = random_clip(TINY, seed=0)
    batch = OnlineBatch(torch.randn(1, 3, *size, generator=g), labels, [(0, 0)])

    def refined(**kw):
        return build_label_maker({"method": "weclip-plus", **kw}, clip, builtin("voc"), cams=source)(batch, out, 0).refined

    base = refined()
    assert source.tokens is out["intermediates"].blocks[10]     # null: block 11's output, WeCLIP's choice
    for kw in ({"seg_weighting": False}, {"layer_filter": False}, {"box_masks": True}, {"filter_layers": 8}):
        assert not torch.allclose(refined(**kw), base), kw
    refined(cam_input_block=3)
    assert source.tokens is out["intermediates"].blocks[2]
    with pytest.raises(ValueError, match="cam_input_block must be in 1..11"):
        refined(cam_input_block=12)


def test_confident_pixels_take_the_segmentations_argmax_from_replace_from():
    grid, size, labels = (4, 4), (64, 64), [[3]]
    out = fake_outputs(1, grid, size, seed=5)
    logits = torch.zeros(1, 21, *size)
    logits[0, 8, :10] = 10.0              # confident class 8, absent from the crop's labels: taken anyway
    logits[0, 0, 10:20] = 1.5             # softmax max 0.17: kept
    out["logits"] = logits
    g = torch.Generator().manual_seed(6)
    source = FixedCAMs(torch.rand(1, 1, *grid, generator=g), torch.rand(1, 17, 17, generator=g).softmax(-1))
    maker = build_label_maker({"method": "weclip-plus", "replace_from": 7}, random_clip(TINY), builtin("voc"),
                              cams=source)
    batch = OnlineBatch(torch.randn(1, 3, *size, generator=g), labels, [(0, 0)])
    before = maker(batch, out, 6)
    assert before.affinity_targets is None and set(before.labels.unique().tolist()) <= {0, 4}
    after = maker(batch, out, 7)
    assert torch.equal(after.affinity_targets, before.labels)          # the affinity loss keeps the labels
    assert (after.labels[0, :10] == 8).all() and torch.equal(after.labels[0, 10:], before.labels[0, 10:])
    # the threshold is strict: a softmax maximum exactly at it is not replaced
    p = torch.tensor([1.0, -0.5])[None, :, None, None]
    top = float(p.softmax(dim=1).max())
    keep = torch.ones(1, 1, 1, dtype=torch.long)
    assert confident_replacement(p, keep, top).item() == 1 and confident_replacement(p, keep, top - 1e-6).item() == 0
    never = build_label_maker({"method": "weclip-plus"}, random_clip(TINY), builtin("voc"), cams=source)
    assert never.cfg.replace_from is None and never(batch, out, 10**6).affinity_targets is None


# ----------------------------------------------------------------------------------------- losses
def reference_dice(output, target, eps=1e-7):
    """WeCLIP+'s dice_loss (WeCLIP_Plus/dice_loss.py) for targets without 255."""
    onehot = torch.eye(output.shape[1] + 1)[target].permute(0, 3, 1, 2).float()[:, :-1]
    pred = F.softmax(output, dim=1)
    inter = (pred * onehot).sum(dim=[0, 2, 3])
    union = (pred + onehot).sum(dim=[0, 2, 3])
    return 1.0 - (2.0 * inter / (union + eps)).mean()


def test_dice_equals_the_reference_and_ignores_255():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 6, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 6, 7), generator=g)          # classes 3 and 4 absent: they add 0
    assert torch.allclose(dice_loss(logits, labels), reference_dice(logits, labels), atol=1e-6)
    ignored = labels.clone()
    ignored[0, :2] = 255
    dice_loss(logits, ignored).backward()
    assert (logits.grad[0, :, :2] == 0).all() and logits.grad[0, :, 2:].abs().sum() > 0


def test_pooled_dice_of_two_halves_equals_the_whole_batch():
    """Two 'processes' each holding one image, their sums added as an all-reduce would: the mean of
    their Dice losses and of their gradients is the whole batch's (DDP averages the gradients)."""
    g = torch.Generator().manual_seed(8)
    logits = (3 * torch.randn(2, 4, 5, 5, generator=g)).requires_grad_(True)
    labels = torch.randint(1, 4, (2, 5, 5), generator=g)
    labels[0] = 0                         # image 0 all background, image 1 the three classes and holes
    labels[1, :2] = 255
    whole = dice_loss(logits, labels)
    (g_whole,) = torch.autograd.grad(whole, logits)
    parts, grads = [], []
    for b in (0, 1):
        seen = []
        dice_loss(logits[1 - b:2 - b], labels[1 - b:2 - b], Pool(2, lambda c: seen.append(c.clone()) or c))
        other = iter(seen)
        part = dice_loss(logits[b:b + 1], labels[b:b + 1], Pool(2, lambda c: c + next(other)))
        parts.append(part)
        grads.append(torch.autograd.grad(part, logits)[0])
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole)
    torch.testing.assert_close((grads[0] + grads[1]) / 2, g_whole)
    assert abs(((dice_loss(logits[:1], labels[:1]) + dice_loss(logits[1:], labels[1:])) / 2 - whole).item()) > 1e-3


def test_extra_loss_is_dice_plus_the_weighted_cross_branch_terms():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(2, 21, 8, 8, generator=g, requires_grad=True)
    b = torch.randn(2, 21, 8, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 21, (2, 8, 8), generator=g)
    out = {"logits": (a + b) / 2, "branch_logits": [a, b]}
    made = type("Made", (), {"labels": labels})()
    clip = random_clip(TINY)

    def extra(**kw):
        cfg = PlusConfig(**kw)
        return WeCLIPPlusLabels(cfg, None, clip.arch.vision_layers).extra_loss(out, made)

    cross = segmentation_loss(a, b.argmax(1), "bgfg") + segmentation_loss(b, a.argmax(1), "bgfg")
    torch.testing.assert_close(extra(), dice_loss(out["logits"], labels) + 0.1 * cross)
    torch.testing.assert_close(extra(dice_weight=0.0), 0.1 * cross)
    torch.testing.assert_close(extra(cross_weight=0.0), dice_loss(out["logits"], labels))
    # each branch learns from the other's argmax, a target without gradient
    (ga,) = torch.autograd.grad(segmentation_loss(a, b.argmax(1), "bgfg"), a)
    extra(dice_weight=0.0, cross_weight=1.0).backward()
    torch.testing.assert_close(a.grad, ga)
    one = {"logits": a, "branch_logits": [a]}                 # one branch: no cross-branch term
    cfg = WeCLIPPlusLabels(PlusConfig(), None, 12)
    torch.testing.assert_close(cfg.extra_loss(one, made), dice_loss(a, labels))


def test_training_step_follows_its_inputs_device(tiny, strict_device):
    """Model outputs, labels (real GradCAM on the model's pass, RFM+, PAR, the replacement) and the extra
    losses make every tensor on their inputs' device."""
    clip, dino = tiny
    model = build_model({"name": "weclip-plus", "width": 64, "heads": 2}, 21, clip=clip, dino=dino)
    maker = build_label_maker({"method": "weclip-plus", "cam_input_block": 10, "replace_from": 0,
                               "box_masks": True}, clip, builtin("voc"))
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(10))
    with strict_device():
        out = model(x, outputs="train", attention_blocks=maker.attention_blocks)
        made = maker(OnlineBatch(x, [[1, 4], [2]], [(0, 0), (1, 1)]), out, 0)
        loss = maker.extra_loss(out, made)
    assert made.labels.device.type == "cpu" and made.affinity_targets is not None and torch.isfinite(loss)
