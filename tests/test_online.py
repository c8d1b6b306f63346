"""WeCLIP's online labels piece by piece: layer filter, RFM phases and ablations, online labels,
affinity labels and loss, background/foreground loss without NaN, the shared frozen pass."""
import math

import pytest
import torch

from pipeline.labels.affinity import decoder_affinity, layer_filter, refine, refine_batch
from pipeline.classes import builtin
from pipeline.train.losses import affinity_labels, affinity_loss, segmentation_loss
from pipeline.models import build_model
from pipeline.train.online import InitialCAMs, OnlineBatch, build_label_maker, pad_maps
from pipeline.train.online.weclip import WeCLIPConfig, online_labels, rfm_attention
from pipeline.clip.random import TINY, random_clip


pytestmark = pytest.mark.usefixtures("one_thread")


def const(v, n=2):
    return torch.full((n, n), float(v))


def test_layer_filter_keeps_maps_whose_signed_gap_is_at_most_the_mean():
    aff = const(1.0)[None]                                   # sum 4
    # sums 6, 2, 4 -> signed gaps -2, 2, 0, mean 0 -> keep maps 0 and 2 (an absolute gap would keep map 2 only)
    attn = torch.stack([const(1.5), const(0.5), const(1.0)])[None]
    out = layer_filter(attn, aff)
    assert torch.allclose(out, const((1.5 + 1.0) / (2 + 1e-5))[None])
    # equal gaps: '<=' keeps every map ('<' would keep none and return zeros)
    same = torch.stack([const(0.5), const(0.5), const(0.5)])[None]
    assert torch.allclose(layer_filter(same, aff), const(1.5 / (3 + 1e-5))[None])
    # per image: a second image with other maps gets its own selection
    two = layer_filter(torch.cat([attn, same]), torch.cat([aff, aff]))
    assert torch.allclose(two[1], const(1.5 / (3 + 1e-5)))


def test_decoder_affinity_is_sigmoid_of_raw_dot_products():
    f = torch.tensor([[[[1.0, 0.0]], [[2.0, -1.0]]]])       # (B=1, D=2, h=1, w=2): tokens (1, 2), (0, -1)
    a = decoder_affinity(f)
    want = torch.sigmoid(torch.tensor([[5.0, -2.0], [-2.0, 1.0]]))
    assert torch.allclose(a[0], want)


def test_refine_batch_matches_the_per_image_refinement():
    g = torch.Generator().manual_seed(0)
    trans = torch.rand(3, 12, 12, generator=g)
    cams = torch.rand(3, 2, 3, 4, generator=g)
    masks = (torch.rand(3, 2, 3, 4, generator=g) > 0.3).float()
    out = refine_batch(trans, cams, masks)
    for b in range(3):
        assert torch.allclose(out[b], refine(trans[b], cams[b], masks[b]), atol=1e-6)


def test_rfm_switch_and_ablations():
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(2, 8, 4, 4, generator=g)
    aff = torch.rand(2, 4, 4, generator=g)
    cfg = WeCLIPConfig(switch_iter=100, filter_layers=6)
    static = attn.mean(dim=1)
    assert torch.allclose(rfm_attention(attn, aff, cfg, 99), static)
    assert torch.allclose(rfm_attention(attn, aff, cfg, 100), layer_filter(attn[:, -6:], aff) * aff)
    no_ge = WeCLIPConfig(switch_iter=100, layer_filter=False)
    assert torch.allclose(rfm_attention(attn, aff, no_ge, 100), attn[:, -6:].mean(dim=1) * aff)
    a_s = WeCLIPConfig(switch_iter=100, refine="attention")
    assert torch.allclose(rfm_attention(attn, aff, a_s, 10**6), static)
    a_f = WeCLIPConfig(switch_iter=100, refine="decoder")
    assert torch.allclose(rfm_attention(attn, aff, a_f, 100), aff) and torch.allclose(rfm_attention(attn, aff, a_f, 0), static)
    with pytest.raises(ValueError, match="online.refine"):
        WeCLIPConfig(refine="fancy")


def test_rfm_box_masks_reach_the_grids_last_row_and_column_only_when_asked():
    """A CAM firing only on the bottom-right patch: the reference's box never includes the last row and
    column, so RFM refines it to nothing; ``online.exact_boxes: false`` keeps it."""
    from types import SimpleNamespace

    from pipeline.train.online.weclip import WeCLIPLabels

    eye = torch.eye(10)[None]                                        # CLS + 3 x 3 patches, attending to themselves
    inter = SimpleNamespace(attentions={i: eye for i in range(4, 11)})
    cams = torch.zeros(1, 1, 3, 3)
    cams[0, 0, 2, 2] = 1.0
    initial = InitialCAMs(cams, torch.tensor([[True]]), torch.tensor([[5]]), eye)
    for exact, want in ((True, 0.0), (False, 1.0)):
        maker = WeCLIPLabels(WeCLIPConfig.from_dict({"exact_boxes": exact}, 0.4), None, 12)
        out = maker.refine(initial, {"intermediates": inter, "affinity": None}, 0)
        assert out[0, 0, 2, 2].item() == pytest.approx(want) and out.sum().item() == pytest.approx(want)


def test_online_labels_background_classes_and_unused_slots():
    img = torch.zeros(1, 3, 4, 4)
    cams = torch.zeros(1, 3, 4, 4)
    cams[0, 0, :2] = 0.9                 # class 3 on the top rows
    cams[0, 1, 2:, :2] = 0.8             # class 7 bottom left
    cams[0, 2] = 5.0                     # an unused slot must never win
    valid = torch.tensor([[True, True, False]])
    classes = torch.tensor([[3, 7, 0]])
    lab = online_labels(img, cams, valid, classes, par_iterations=0)
    want = torch.tensor([[4, 4, 4, 4], [4, 4, 4, 4], [8, 8, 0, 0], [8, 8, 0, 0]])
    assert torch.equal(lab[0], want)
    # PAR on a uniform image spreads the scores but keeps the ranking of a clear majority
    assert online_labels(img, cams, valid, classes, par_iterations=3).shape == (1, 4, 4)


def test_pad_maps_pads_per_crop_maps_in_label_order():
    maps = [torch.full((2, 3, 4), 0.5), torch.full((1, 3, 4), 0.25)]
    out = pad_maps(maps, [[7, 2], [11]])
    assert out.cams.shape == (2, 2, 3, 4) and out.cams.dtype == torch.float32
    assert (out.cams[0] == 0.5).all() and (out.cams[1, 0] == 0.25).all() and (out.cams[1, 1] == 0).all()
    assert torch.equal(out.valid, torch.tensor([[True, True], [True, False]]))
    assert torch.equal(out.classes, torch.tensor([[7, 2], [11, 0]]))


def test_affinity_labels_radius_and_ignore():
    lab = torch.zeros(1, 48, 48, dtype=torch.long)                # 3 x 3 patches of 16
    lab[0, 0:16, 32:48] = 2                                        # patch (0, 2)
    lab[0, 32, 32] = 255                                           # the sampled pixel of patch (2, 2)
    lab[0, 33:48, 33:48] = 5                                       # not sampled: patch (2, 2) reads pixel (32, 32)
    a = affinity_labels(lab, (3, 3), radius=1)[0]
    assert a.shape == (9, 9) and a.dtype == torch.uint8
    assert a[0, 1] == 1 and a[0, 4] == 1                           # background neighbours
    assert a[1, 2] == 0 and a[2, 5] == 0                           # background vs class 2
    assert a[0, 2] == 255 and a[0, 6] == 255 and a[3, 5] == 255    # two patches apart: outside radius 1
    assert (a[8] == 255).all() and (a[:, 8] == 255).all()          # patch (2, 2) is ignored
    assert a[2, 2] == 1
    assert (affinity_labels(lab, (3, 3), radius=8)[0, 0, 2] == 0)  # within a larger radius


def test_affinity_loss_by_hand():
    aff = torch.tensor([[[0.9, 0.2], [0.4, 0.7]]])
    t = torch.tensor([[[1, 0], [255, 1]]], dtype=torch.uint8)
    want = 0.5 * ((1 - 0.9) + (1 - 0.7)) / (2 + 1) + 0.5 * 0.2 / (1 + 1)
    assert math.isclose(affinity_loss(aff, t).item(), want, rel_tol=1e-6)
    assert affinity_loss(aff, torch.full_like(t, 255)).item() == 0


def test_bgfg_loss_has_no_nan_without_background_or_foreground():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    for fill in (0, 2):
        labels = torch.full((2, 4, 4), fill)
        loss = segmentation_loss(logits, labels, "bgfg")
        assert torch.isfinite(loss)
        ce = torch.nn.functional.cross_entropy(logits, labels)
        assert torch.allclose(loss, ce)     # the one kind present, alone
    mixed = torch.zeros(2, 4, 4, dtype=torch.long)
    mixed[:, :1] = 1
    mixed[:, 3] = 255
    ce = torch.nn.functional.cross_entropy(logits, mixed, ignore_index=255, reduction="none")
    want = (ce[mixed == 0].mean() + ce[mixed == 1].mean()) / 2
    assert torch.allclose(segmentation_loss(logits, mixed, "bgfg"), want)


@pytest.fixture(scope="module")
def tiny():
    clip = random_clip(TINY, seed=3)
    model = build_model({"name": "weclip"}, 21, clip=clip)
    maker = build_label_maker({"method": "weclip", "switch_iter": 1}, clip, builtin("voc"))
    return clip, model, maker


def test_gradcam_on_the_models_frozen_pass_equals_the_cam_stage(tiny):
    clip, model, maker = tiny
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    calls = []
    hook = clip.visual.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        out = model(x, outputs="train", attention_blocks=maker.attention_blocks)
        batch = OnlineBatch(x, [[1, 4], [2]], [(0, 0), (1, 1)])
        got = maker(batch, out, 0)
    finally:
        hook.remove()
    assert len(calls) == 1                       # blocks 1..11 ran once for the decoder and the CAMs
    engine = maker.cams.engine
    maps, attn_last = engine.initial_maps(engine.encode(x), batch.labels, (3, 4))
    assert torch.allclose(got.initial.cams, maps, atol=1e-6)
    assert torch.allclose(got.initial.attention_last, attn_last, atol=1e-6)
    assert (maps[1, 1] == 0).all()                             # the unused slot of image 1
    assert torch.equal(got.initial.valid, torch.tensor([[True, True], [True, False]]))
    assert torch.equal(got.initial.classes, torch.tensor([[1, 4], [2, 0]]))
    assert got.labels.shape == (2, 48, 64)
    assert set(got.labels[1].unique().tolist()) <= {0, 3}     # image 1 only gets background or its class
    assert set(got.labels[0].unique().tolist()) <= {0, 2, 5}
    # the static phase needs the last 8 maps: blocks 5..11 from the shared pass, block 12 from the CAM pass
    assert maker.attention_blocks == tuple(range(4, 11))
    assert sorted(out["intermediates"].attentions) == list(range(4, 11))


def test_model_affinity_gets_gradient_through_the_fused_features(tiny):
    model = build_model({"name": "weclip"}, 21, clip=tiny[0])
    with torch.no_grad():   # small features: raw dot products of the random init saturate the sigmoid
        model.decoder.fuse.weight.mul_(1e-3)
        model.decoder.fuse.bias.zero_()
    x = torch.randn(1, 3, 32, 32)
    out = model(x, outputs="train")
    out["affinity"].sum().backward()
    assert model.decoder.fuse.weight.grad is not None and model.decoder.fuse.weight.grad.abs().sum() > 0
    assert model.decoder.classifier.weight.grad is None       # the head is not on the affinity's path
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.randn(1, 3, 40, 32), outputs="train")


def test_an_images_labels_do_not_depend_on_its_batch_mates(tiny):
    """What makes DDP's labels equal the single process's: every step of the label making is per image."""
    clip, _, maker = tiny
    model = build_model({"name": "weclip"}, 21, clip=clip).eval()     # eval: no dropout draws
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    labels, keys = [[1, 4], [2], [7, 8, 9]], [(0, 0), (1, 1), (2, 2)]
    for it in (0, 1):                                                    # both RFM phases (switch at 1)
        with torch.no_grad():
            both = maker(OnlineBatch(x, labels, keys), model(x, outputs="train",
                                                              attention_blocks=maker.attention_blocks), it)
            one = maker(OnlineBatch(x[1:2], labels[1:2], keys[1:2]),
                        model(x[1:2], outputs="train", attention_blocks=maker.attention_blocks), it)
        assert torch.allclose(both.refined[1, :1], one.refined[0], atol=1e-4)   # float rounding of batched matmuls
        assert torch.equal(both.labels[1], one.labels[0])
