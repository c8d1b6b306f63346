"""Guards against quiet mistakes the end-to-end tests cannot see: CAM-stage sharding, manifest
completeness, the bg/fg loss on ignored pixels, per-scale inputs of multi-scale inference, WeCLIP's
decoder dropout, documented defaults, and head-averaged attention on a CLIP with several heads.

Restatements type their own constants (255, 0.1, the CLIP-ES defaults) instead of importing them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_voc
from pipeline.cams.gradcam import CAMConfig, CAMEngine
from pipeline.classes import ClassList, builtin
from pipeline.clip.model import CLIPArch, load_clip, read_state_dict
from pipeline.eval.infer import InferConfig, msc_logits
from pipeline.io import StaleOutputError
from pipeline.models import build_model
from pipeline.labels.pseudo import PseudoConfig
from pipeline.clip.random import TINY, random_clip, save_clip
from pipeline.cams.stage import run_cams, shard_ids
from pipeline.train.config import load_config
from pipeline.train.losses import segmentation_loss
from reference import ReferenceCLIP, reference_cams, reference_text
from stages import cams as cams_stage
from stages import pseudo as pseudo_stage


# ------------------------------------------------------------------------------------ sharding
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_cam_shards_are_disjoint_cover_the_split_and_are_balanced(world):
    for n in [0, 1, 2, 5, 6, 7, 13, 64]:
        ids = [f"img{i:03d}" for i in range(n)]
        shards = [shard_ids(ids, rank, world) for rank in range(world)]
        flat = [i for s in shards for i in s]
        assert len(flat) == len(set(flat)) == n, (n, world)  # no image twice, none lost
        assert set(flat) == set(ids)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1, (n, world)
        for s in shards:  # each shard keeps the split's order
            assert s == sorted(s, key=ids.index)


# ---------------------------------------------------------------------------- manifest keys
@pytest.fixture(scope="module")
def cams_run(tmp_path_factory, tiny_clip_path):
    """One finished CAM run (two images): (its folder, the flags that made it)."""
    tmp = tmp_path_factory.mktemp("manifest")
    root = tmp / "VOC"
    split = make_voc(root, [("a", (32, 48), ["cat"]), ("b", (48, 32), ["dog", "person"])])
    base = ["--dataset", "voc", "--root", str(root), "--split", str(split), "--clip", str(tiny_clip_path),
            "--out", str(tmp / "cams"), "--workers", "0", "--no-progress"]
    s = run_cams(cams_stage.parse_args(base))
    assert (s.written, s.failed) == (2, 0)
    return tmp, base


def _changes_outputs(tmp) -> dict[str, list[str]]:
    """Every flag of ``stages.cams`` that changes the numbers in the CAM files -> a changed setting."""
    labels = tmp / "labels.json"
    labels.write_text('{"a": ["cat"], "b": ["dog"]}')
    classes = tmp / "classes.yaml"
    classes.write_text(_voc_yaml_with_other_background())
    ranking = tmp / "ranking.csv"
    ranking.write_text("rank,template\n2,a photo of a {}.\n1,a sketch of a {}.\n")
    other_clip = save_clip(random_clip(TINY, seed=11), tmp / "other.pt", torchscript=False)
    return {
        "--clip": ["--clip", str(other_clip)],
        "--classes": ["--classes", str(classes)],
        "--labels": ["--labels", str(labels)],
        "--save-init": ["--save-init"],
        "--precision": ["--precision", "bf16"],
        "--fixed": ["--fixed"],
        "--max-patches": ["--max-patches", "100"],
        "--exif-transpose": ["--exif-transpose"],
        "--box-threshold": ["--box-threshold", "0.5"],
        "--prompt": ["--prompt", "a photo of a {}."],
        "--prompt-ranking": ["--prompt", "best", "--prompt-ranking", str(ranking)],
        "--no-softmax": ["--no-softmax"],
        "--softmax-set": ["--softmax-set", "all"],
        "--no-background": ["--no-background"],
        "--no-synonyms": ["--no-synonyms"],
        "--fusion": ["--fusion", "feature"],
        "--affinity": ["--affinity", "mhsa"],
        "--method": ["--method", "excel", "--attributes", "20"],
    }


def _changes_excel_outputs(tmp) -> dict[str, list[str]]:
    """Every ExCEL-only flag of ``stages.cams`` (checked against an ExCEL run) -> a changed setting."""
    from pipeline.cams import tse
    from pipeline.clip.model import load_clip

    voc = builtin("voc")
    descriptions = json.loads(open("data/descriptions/voc.json").read())
    descriptions["cat"] = descriptions["cat"][:-1]
    (tmp / "descriptions.json").write_text(json.dumps(descriptions))
    model = load_clip(tmp / "other.pt")  # written by _changes_outputs; any CLIP of the right width makes a bank
    bank = tse.build_bank(model, voc, tse.load_descriptions("data/descriptions/voc.json", voc), 20)
    tse.save_bank(tmp / "bank.npz", bank)
    return {
        "--input-size": ["--input-size", "32"],
        "--calibrated-blocks": ["--calibrated-blocks", "3"],
        "--no-tse": ["--no-tse"],
        "--attributes": ["--attributes", "21"],
        "--attribute-clustering": ["--attribute-clustering", "per-class"],
        "--descriptions": ["--descriptions", str(tmp / "descriptions.json")],
        "--attribute-bank": ["--attribute-bank", str(tmp / "bank.npz")],
    }


# Flags that do not change the CAM files: where things are, how fast they run, and the settings of the
# pseudo labels written next to them (those have their own manifest in --pseudo-out).
NEUTRAL = {"--help", "--root", "--split", "--out", "--device", "--batch-size", "--workers", "--overwrite",
           "--no-progress", "--pseudo-out", "--no-keep-cams", "--jobs", "--conf", "--confidence", "--guide",
           "--format", "--power", "--crf-iters", "--pos-xy", "--pos-w", "--bi-xy", "--bi-rgb", "--bi-w",
           "--no-require-gt", "--crf-backend", "--crf-preset", "--crf-max-pixels", "--refine", "--par-input-size",
           "--dataset",  # picks the layout the ids are read from; recorded in the manifest (checked below)
           "--masks"}    # ground-truth masks of the folder dataset: used for evaluation, not for CAMs


def _voc_yaml_with_other_background() -> str:
    voc = builtin("voc")
    classes = "".join(f"- name: {n}\n  prompt: \"{p}\"\n" for n, p in zip(voc.names, voc.prompts))
    return f"template: \"{voc.template}\"\nbox_threshold: 0.4\nclasses:\n{classes}background: [ground, sky]\n"


def _cams_flags(monkeypatch) -> set[str]:
    """The long options of ``stages.cams``'s parser."""
    parsers = []
    real = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda p, *a, **k: parsers.append(p) or real(p, *a, **k))
    cams_stage.parse_args(["--dataset", "voc", "--root", "r", "--clip", "c.pt"])
    monkeypatch.undo()
    return {s for action in parsers[0]._actions for s in action.option_strings if s.startswith("--")}


def test_every_cam_stage_flag_that_changes_outputs_is_in_the_manifest(cams_run, monkeypatch):
    tmp, base = cams_run
    changes = _changes_outputs(tmp)
    excel_changes = _changes_excel_outputs(tmp)
    flags = _cams_flags(monkeypatch)
    unclassified = flags - set(changes) - set(excel_changes) - NEUTRAL
    assert not unclassified, f"decide whether {unclassified} change the CAM files (then add them to the manifest)"
    assert set(changes) | set(excel_changes) <= flags and NEUTRAL <= flags
    excel_base = [a if a != str(tmp / "cams") else str(tmp / "cams_excel") for a in base] + changes["--method"]
    s = run_cams(cams_stage.parse_args(excel_base))
    assert (s.written, s.failed) == (2, 0)
    accepted = []
    for flag, extra in [*((f, base + e) for f, e in changes.items()),
                        *((f, excel_base + e) for f, e in excel_changes.items())]:
        try:
            run_cams(cams_stage.parse_args(extra))
        except StaleOutputError as e:
            assert "different configuration" in str(e), (flag, e)
        else:
            accepted.append(flag)
    assert not accepted, f"outputs made with other {accepted} would be mixed in: add them to the manifest"
    manifest = json.loads((tmp / "cams" / "manifest.json").read_text())["config"]
    assert manifest["dataset"] == "voc"


def test_settings_that_do_not_change_the_cams_resume_the_run(cams_run):
    tmp, base = cams_run
    s = run_cams(cams_stage.parse_args(base + ["--batch-size", "2", "--workers", "1", "--device", "cpu"]))
    assert (s.written, s.skipped, s.failed) == (0, 2, 0)


# ------------------------------------------------------------------------------------ losses
def _ce_per_pixel(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax at the label, (B, H, W); labels 255 are mapped to 0 here and masked by the caller."""
    logp = logits.log_softmax(dim=1)
    safe = torch.where(labels == 255, torch.zeros_like(labels), labels)
    return -logp.gather(1, safe[:, None])[:, 0]


@pytest.mark.parametrize("case", ["mixed", "no_foreground", "no_background"])
def test_bgfg_loss_averages_background_and_foreground_without_ignored_pixels(case):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 10, 12, generator=g)
    labels = torch.randint(1, 4, (2, 10, 12), generator=g)
    labels[:, :4] = 0
    labels[:, 6:, 5:] = 255   # a large ignored block: counting it anywhere changes the value
    if case == "no_foreground":
        labels[(labels != 0) & (labels != 255)] = 0
    if case == "no_background":
        labels[labels == 0] = 2
    ce = _ce_per_pixel(logits, labels)
    bg = labels == 0
    fg = (labels != 0) & (labels != 255)
    terms = [ce[m].mean() for m in (bg, fg) if m.any()]
    want = sum(terms) / len(terms)
    got = segmentation_loss(logits, labels, "bgfg")
    assert torch.allclose(got, want, atol=1e-6), (got, want)
    if case == "mixed":  # and the plain CE is the mean over the kept pixels
        assert torch.allclose(segmentation_loss(logits, labels, "ce"), ce[labels != 255].mean(), atol=1e-6)


# ---------------------------------------------------------------------------------- inference
class ShapeSpy(nn.Module):
    """A 1x1 conv that records the size of every input it sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.conv(x) * (1 + x.mean((1, 2, 3), keepdim=True))  # not scale-equivariant


@pytest.mark.parametrize("long_side", [None, 28])
def test_multiscale_runs_every_scale_at_its_own_size(long_side):
    torch.manual_seed(0)
    model = ShapeSpy().eval()
    x = torch.randn(1, 3, 40, 56)
    scales = (1.0, 0.5, 1.5, 0.75)
    got = msc_logits(model, x, InferConfig(scales=scales, flip=True, long_side=long_side))
    bh, bw = (40, 56) if long_side is None else (20, 28)
    want_sizes = [(round(bh * s), round(bw * s)) for s in scales]
    assert model.sizes == [s for s in want_sizes for _ in range(2)]  # each scale, plain and mirrored
    # restatement: mean over scales of (logits + mirrored logits) / 2, each resized back to 40 x 56
    base = x if long_side is None else F.interpolate(x, size=(bh, bw), mode="bilinear", align_corners=False)
    total = 0
    with torch.no_grad():
        for h, w in want_sizes:
            xs = base if (h, w) == (bh, bw) else F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
            lg = (model(xs) + model(xs.flip(-1)).flip(-1)) / 2
            total = total + F.interpolate(lg, size=(40, 56), mode="bilinear", align_corners=False)
    assert got.shape == (1, 5, 40, 56)
    assert torch.allclose(got, total / 4, atol=1e-5)


# ------------------------------------------------------------------------------------ WeCLIP
@pytest.mark.parametrize("config", [None, "configs/weclip_voc.yaml", "configs/weclip_coco.yaml"])
def test_weclip_decoder_drops_whole_channels_of_the_fused_map_at_p_0_1(config):
    """The model as training builds it: Dropout2d(0.1) between the fusion conv and the transformer."""
    torch.manual_seed(0)
    model = build_model(load_config(config)["model"], 21, clip=random_clip(TINY, seed=0), log=lambda *_: None)
    dec = model.decoder
    seen = {}
    dec.fuse.register_forward_hook(lambda m, i, o: seen.__setitem__("fused", o.detach().clone()))
    dec.transformer[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("tokens", a[0].detach().clone()))
    images = torch.randn(4, 3, 32, 48)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            model(images)
        fused = seen["fused"]                                             # (B, 256, h, w)
        B, C, h, w = fused.shape
        after = seen["tokens"].transpose(1, 2).reshape(B, C, h, w)        # what the transformer gets
        if mode == "eval":
            assert torch.equal(after, fused)
            continue
        dropped = (after == 0).flatten(2).all(-1)                         # (B, C): whole channel zero
        kept = ~dropped
        assert torch.allclose(after[kept], fused[kept] / 0.9, atol=1e-5)  # survivors scaled by 1 / (1 - p)
        rate = dropped.float().mean().item()                              # 1024 channel draws at p = 0.1
        assert 0.06 < rate < 0.14, rate


# ----------------------------------------------------------------------------------- defaults
def test_documented_defaults():
    """The defaults the README and the stages' help promise (CLIP-ES's settings); a flipped default is a
    silent change of every output."""
    assert dataclasses.asdict(PseudoConfig()) == {
        "conf": 0.95, "confidence": "crf", "guide": "wrapped", "power": 1.0, "format": "palette", "require_gt": True,
        "preset": "clipes", "backend": "auto", "device": "cpu", "max_pixels": 1_000_000,
        "refine": "crf", "par_input_size": None, "crf": {"iters": 10, "pos_xy": 1.0, "pos_w": 3.0, "bi_xy": 67.0, "bi_rgb": 3.0, "bi_w": 4.0}}
    # the stage with no flags gives the same config
    args = pseudo_stage.parse_args(["--dataset", "voc", "--root", "somewhere"])
    assert pseudo_stage.pseudo_config(args) == PseudoConfig()
    cam = CAMConfig()
    assert (cam.box_threshold, cam.attention_layers, cam.sinkhorn_rounds, cam.power) == (0.4, 8, 3, 2)
    assert (cam.exact, cam.template, cam.softmax, cam.softmax_set, cam.background, cam.synonyms, cam.fusion,
            cam.affinity) == (True, None, True, "present", True, True, "sentence", "caa")
    c = cams_stage.parse_args(["--dataset", "voc", "--root", "r", "--clip", "c.pt"])
    assert (c.exact, c.box_threshold, c.save_init, c.exif_transpose, c.keep_cams, c.pseudo_out) == \
        (True, None, False, False, True, None)
    assert CAMConfig(box_threshold=0.4, exact=True, **c.cam_options) == CAMConfig()
    inf = InferConfig()  # the README's "multi-scale {1.0, 0.75} + flip", CRF off unless asked for
    assert (inf.scales, inf.flip, inf.crf, inf.normalize) == ((1.0, 0.75), True, False, "imagenet")


# -------------------------------------------------------------------- several attention heads
def two_head_arch() -> CLIPArch:
    """Tiny, but with 128-wide towers: two 64-dim heads, so head averaging is visible."""
    return CLIPArch(embed_dim=32, vision_width=128, vision_layers=12, patch_size=16, grid=14, context_length=77,
                    vocab_size=49408, text_width=128, text_layers=2)


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    path = save_clip(random_clip(two_head_arch(), seed=5), tmp_path_factory.mktemp("clip2") / "two-heads.pt",
                     torchscript=False)
    model = load_clip(path)
    assert model.visual.blocks[0].attn.heads == 2
    return model, ReferenceCLIP(read_state_dict(path))


def test_two_head_attention_maps_match_multihead_attention(two_heads):
    model, ref = two_heads
    torch.manual_seed(2)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ours = model.visual.forward_intermediates(x, n_blocks=11, attention="mean")
        heads = model.visual.forward_intermediates(x, n_blocks=11, attention="heads")
        theirs, attns = ref.encode_image(x)
    assert torch.allclose(ours.tokens[0], theirs[:, 0], atol=1e-5)
    for i in range(11):
        assert torch.allclose(ours.attentions[i], attns[i], atol=1e-6), i
        # the heads really differ, so taking one of them instead of the mean would show
        assert (heads.attentions[i][:, 0] - heads.attentions[i][:, 1]).abs().max() > 1e-3


def test_two_head_cams_match_the_reference(two_heads):
    """float32 rounding differs by ~2e-4 between the two computations at this width; one head
    instead of the mean moves the maps by more than 0.1."""
    model, ref = two_heads
    vocab = ClassList(names=("cat", "dog", "person"), prompts=("cat", "dog", "person with clothes,people,human"),
                      background=("ground", "sky"))
    ref_text = reference_text(ref, list(vocab.prompts) + list(vocab.background), vocab.template)
    torch.manual_seed(3)
    x = torch.randn(1, 3, 64, 80)
    labels = [2, 0]
    got = CAMEngine(model, vocab)(x, [labels])[0]
    want_cams, want_init = reference_cams(ref, x, labels, ref_text, vocab.num_classes, vocab.box_threshold)
    np.testing.assert_allclose(got.init, want_init, atol=1e-3, rtol=0)
    np.testing.assert_allclose(got.cams, want_cams, atol=2e-3, rtol=0)
