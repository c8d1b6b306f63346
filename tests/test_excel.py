"""ExCEL's training-free CAMs: calibrated forward, patch-text CAMs, text enrichment, attribute banks,
the CAM stage with --method excel and PAR pseudo labels."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_voc, textured_image
from pipeline.cams import excel, tse
from pipeline.data.camfile import load_cams
from pipeline.classes import ClassList, builtin
from pipeline.clip.model import CLIPArch
from pipeline.clip.random import random_clip
from pipeline.cams.stage import CamsConfig, run_cams
from stages.cams import main as cams_main

# two heads per block (width 128 / 64), eight blocks: three plain, five calibrated
TWO_HEADS = CLIPArch(embed_dim=16, vision_width=128, vision_layers=8, patch_size=16, grid=14,
                     context_length=77, vocab_size=49408, text_width=64, text_layers=1)


# ------------------------------------------------------------------------ calibrated forward
def _layer_norm(x, ln):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, 1e-5)


def _restated_forward(visual, images, calibrated, relation=None):
    """Per-head restatement of the dual-path forward with explicit weight slices and loops."""
    B, _, H, W = images.shape
    width = visual.conv1.weight.shape[0]
    heads, d = width // 64, 64
    gh, gw = H // 16, W // 16
    x = F.conv2d(images, visual.conv1.weight, stride=16).flatten(2).transpose(1, 2)
    table = visual.positional_embedding
    grid_tab = table[1:].t().reshape(1, width, 14, 14)
    grid_tab = F.interpolate(grid_tab, size=(gh, gw), mode="bilinear", align_corners=False).reshape(width, -1).t()
    x = torch.cat([visual.class_embedding.expand(B, 1, width), x], 1) + torch.cat([table[:1], grid_tab])
    z = _layer_norm(x, visual.ln_pre)
    n_blocks = len(visual.blocks)
    first = n_blocks - calibrated
    attentions, outputs, mid = {}, [], {}
    p = None
    for i, blk in enumerate(visual.blocks):
        u = _layer_norm(z, blk.ln_1)
        wq, wk, wv = blk.attn.in_proj_weight.split(width)
        bq, bk, bv = blk.attn.in_proj_bias.split(width)
        q, k, v = u @ wq.t() + bq, u @ wk.t() + bk, u @ wv.t() + bv
        outs, probs, s_total = [], [], 0
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
            a = torch.softmax(qh @ kh.transpose(1, 2) / 8.0, dim=-1)
            probs.append(a)
            outs.append(a @ vh)
            if i >= first:
                s = (torch.softmax(qh @ qh.transpose(1, 2) / 8.0, -1) + torch.softmax(kh @ kh.transpose(1, 2) / 8.0, -1)
                     + torch.softmax(vh @ vh.transpose(1, 2) / 8.0, -1)) / 3.0
                if relation is not None:
                    s = s.clone()
                    s[:, 1:, 1:] += relation
                s_total = s_total + s
        residual = torch.cat(outs, -1) @ blk.attn.out_proj.weight.t() + blk.attn.out_proj.bias
        if i >= first:
            if p is None:
                p = z
            new = torch.cat([s_total @ v[..., h * d:(h + 1) * d] for h in range(heads)], -1)
            p = p + new @ blk.attn.out_proj.weight.t() + blk.attn.out_proj.bias
            attentions[i] = sum(probs)
            mid[i] = z + residual
        else:
            attentions[i] = sum(probs) / heads
        z = z + residual
        m = _layer_norm(z, blk.ln_2) @ blk.mlp.c_fc.weight.t() + blk.mlp.c_fc.bias
        m = m * torch.sigmoid(1.702 * m)
        z = z + m @ blk.mlp.c_proj.weight.t() + blk.mlp.c_proj.bias
        outputs.append(z)
    # decoder maps as the reference's in-place updates leave them (1-based: F_l for l = first + 1 .. n - 1
    # is block l's output plus block l + 1's attention residual; F_first the calibrated path)
    feats = outputs[: first - 1] + [p] + [mid[i] for i in range(first + 1, n_blocks)] + [outputs[-1]]
    tokens = torch.cat([z[:, :1], p[:, 1:]], 1)
    return tokens, attentions, feats


def test_calibrated_forward_matches_per_head_restatement():
    torch.manual_seed(0)
    model = random_clip(TWO_HEADS, seed=1).double()
    visual = model.visual
    images = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    out = visual.forward_calibrated(images, calibrated=5, attention_blocks=range(8), features=True)
    tokens, attentions, feats = _restated_forward(visual, images, 5)
    torch.testing.assert_close(out.tokens, tokens, rtol=1e-10, atol=1e-10)
    assert sorted(out.attentions) == list(range(8))
    for i in range(8):
        torch.testing.assert_close(out.attentions[i], attentions[i], rtol=1e-10, atol=1e-10)
    assert out.attentions[5].sum(-1).allclose(torch.full((2, 13), 2.0, dtype=torch.float64))  # head sum: rows sum to 2
    assert len(out.features) == 8
    for got, want in zip(out.features, feats):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the learnable calibration's per-image relation matrix enters every head before the head sum
    relation = torch.rand(2, 12, 12, dtype=torch.float64)
    out_r = visual.forward_calibrated(images, calibrated=5, relation=relation)
    torch.testing.assert_close(out_r.tokens, _restated_forward(visual, images, 5, relation)[0], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out_r.tokens, out.tokens)
    # the original path is untouched: its CLS token is plain CLIP's
    plain = visual.forward_intermediates(images).tokens
    torch.testing.assert_close(out.tokens[:, 0], plain[:, 0], rtol=1e-10, atol=1e-10)


def test_recalibration_equals_a_second_full_pass_with_the_relation():
    """The dynamic pass of online labels reuses the static pass's original path (q, k, v of the calibrated
    blocks): the same operations on the same numbers, so the same tokens as running every block again."""
    visual = random_clip(TWO_HEADS, seed=4).visual
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    relation = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(5))
    static = visual.forward_calibrated(images, calibrated=5, attention_blocks=range(2, 8), features=True, keep_qkv=True)
    full = visual.forward_calibrated(images, calibrated=5, attention_blocks=range(2, 8), relation=relation)
    again = visual.recalibrate(static, relation)
    assert torch.equal(again.tokens, full.tokens) and not torch.equal(again.tokens, static.tokens)
    assert sorted(again.attentions) == sorted(full.attentions) == list(range(2, 8))
    assert all(torch.equal(again.attentions[i], full.attentions[i]) for i in full.attentions)
    with pytest.raises(ValueError, match="keep_qkv"):
        visual.recalibrate(full, relation)


def test_positional_table_through_the_reference_grid():
    visual = random_clip(TWO_HEADS, seed=2).visual
    pos = visual.positional_embedding
    width = pos.shape[1]

    def resize(table, side_h, side_w):
        g = int(round(math.sqrt(table.shape[0] - 1)))
        grid = F.interpolate(table[1:].t().reshape(1, width, g, g), size=(side_h, side_w), mode="bilinear",
                             align_corners=False)
        return torch.cat([table[:1], grid.reshape(width, -1).t()])

    via20 = resize(pos, 20, 20)
    torch.testing.assert_close(visual.pos_embed((20, 20), via=20), via20)
    torch.testing.assert_close(visual.pos_embed((24, 32), via=20), resize(via20, 24, 32))
    assert not torch.allclose(visual.pos_embed((24, 32), via=20), visual.pos_embed((24, 32)))


# --------------------------------------------------------------------------- patch-text CAM
def test_patch_text_cam_equals_hand_computation():
    feats = torch.tensor([[[2.0, 0.3], [1.0, 0.0], [0.0, 1.0], [0.5, -0.5]]], dtype=torch.float64)  # CLS + 3 patches
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]], dtype=torch.float64)              # 2 fg + 1 bg
    got = excel.patch_text_cams(feats, text, num_classes=2, temperature=2.0)[0].numpy()
    c = [[sum(f * t for f, t in zip(tok, row)) for row in text.tolist()] for tok in feats[0].tolist()]
    e = [math.exp(2 * v) for v in c[0]]
    p = [x / sum(e) for x in e]
    w = [x / (sum(p) / 3) for x in p]
    s = [[w[k] * c[i][k] - sum(w[j] * c[i][j] for j in range(3)) / 3 for k in range(3)] for i in range(4)]
    want = np.zeros((3, 2))
    for k in range(2):
        col = [s[i][k] for i in range(4)]  # the CLS token takes part in the min-max
        lo, hi = min(col), max(col)
        for i in range(1, 4):
            want[i - 1, k] = (col[i] - lo) / (hi - lo)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[:, 0].max() < 1  # class 0 peaks on the CLS token, which takes part in the min-max


# ------------------------------------------------------------------------------------- TSE
def test_enrichment_weights_on_hand_made_embeddings():
    t = torch.tensor([[0.5, 0.1, -0.3, 0.2, 0.0, 0.4, -0.1, 0.3, 0.2, 0.6]], dtype=torch.float64)
    centres = torch.eye(10, dtype=torch.float64)  # attribute j = unit vector j, so the weights show up as is
    got = (tse.enrich(t, centres) - t)[0]
    kept = [0.5, 0.1, None, 0.2, 0.0, 0.4, -0.1, 0.3, 0.2, 0.6]  # int(0.1 * 10) = 1 lowest score masked
    denom = sum(math.exp(v) for v in kept if v is not None)
    want = torch.tensor([0.0 if v is None else math.exp(v) / denom for v in kept], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    # 112 attributes: 11 masked, 101 used
    centres = torch.eye(112, dtype=torch.float64)
    scores = torch.linspace(-1, 1, 112, dtype=torch.float64)[None]
    w = tse.enrich(scores, centres) - scores
    assert int((w[0] > 1e-12).sum()) == 101 and w[0, :11].abs().max() < 1e-12


def _embeddings(seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = []
    for c, spread in enumerate([0.05, 0.6, 0.3]):
        base = rng.normal(size=8)
        e = base + spread * rng.normal(size=(12, 8))
        groups.append((e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32))
    return groups


def test_clusters_belong_to_one_class_each_and_follow_spread():
    bank = tse.cluster(_embeddings(), total=12, seed=0, clustering="per-class")
    assert bank.centres.shape == (12, 8) and bank.membership.shape == (3, 12)
    assert (bank.membership.sum(axis=0) == 1).all()
    counts = bank.membership.sum(axis=1)
    assert counts.sum() == 12 and counts[1] > counts[2] > counts[0] >= 1  # more varied classes get more
    again = tse.cluster(_embeddings(), total=12, seed=0, clustering="per-class")
    np.testing.assert_array_equal(bank.centres, again.centres)
    with pytest.raises(ValueError, match="between 3 and 36"):
        tse.cluster(_embeddings(), total=40, clustering="per-class")


def test_bank_round_trips_both_formats(tmp_path):
    classes = ClassList(names=("a", "b", "c"), prompts=("a", "b", "c"), background=())
    bank = tse.cluster(_embeddings(), total=9, seed=0)
    tse.save_bank(tmp_path / "bank.npz", tse.AttributeBank(bank.centres, bank.membership, classes.names))
    ours = tse.load_bank(tmp_path / "bank.npz", classes, embed_dim=8)
    np.testing.assert_array_equal(ours.centres, bank.centres)
    np.testing.assert_array_equal(ours.membership, bank.membership)
    # the reference's file: torch.save of [centres (E x B), membership (classes x B)]
    torch.save([torch.from_numpy(bank.centres.T.copy()), torch.from_numpy(bank.membership)], tmp_path / "ref.pth")
    ref = tse.load_bank(tmp_path / "ref.pth", classes, embed_dim=8)
    np.testing.assert_array_equal(ref.centres, bank.centres)
    np.testing.assert_array_equal(ref.membership, bank.membership)
    tse.save_reference_bank(tmp_path / "ours_ref.pth", ours)
    back = torch.load(tmp_path / "ours_ref.pth", weights_only=True)
    assert back[0].shape == (8, 9) and torch.equal(back[0].t(), torch.from_numpy(bank.centres))


def test_bad_bank_and_description_files_name_the_file(tmp_path):
    classes = ClassList(names=("a", "b"), prompts=("a", "b"), background=())
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a bank at all")
    with pytest.raises(ValueError, match="garbage.pth: not an attribute bank"):
        tse.load_bank(garbage, classes)
    pickled = tmp_path / "pickled.pth"
    torch.save({"centres": object()}, pickled)
    with pytest.raises(ValueError, match="pickled.pth") as e:
        tse.load_bank(pickled, classes)
    assert "weights_only" not in str(e.value)
    wrong = tmp_path / "three.pth"
    torch.save([torch.zeros(8, 6), torch.zeros(3, 6)], wrong)
    with pytest.raises(ValueError, match="three.pth: attribute bank is for 3 classes but the vocabulary has 2"):
        tse.load_bank(wrong, classes)
    torch.save([torch.zeros(8, 6), torch.zeros(2, 6)], wrong)
    with pytest.raises(ValueError, match="8 dims but the CLIP model embeds in 16"):
        tse.load_bank(wrong, classes, embed_dim=16)
    cases = {"broken.json": "{not json", "list.json": "[1, 2]", "missing.json": json.dumps({"a": ["red"]}),
             "unknown.json": json.dumps({"a": ["red"], "b": ["blue"], "zebra": ["stripes"]}),
             "empty.json": json.dumps({"a": ["red"], "b": []})}
    messages = {"broken.json": "cannot read", "list.json": "JSON object", "missing.json": "no descriptions for b",
                "unknown.json": "'zebra' is not a class", "empty.json": "class 'b' needs a non-empty list"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=messages[name]) as e:
            tse.load_descriptions(tmp_path / name, classes)
        assert str(tmp_path / name) in str(e.value)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": ["red", "round", "red"], "b": ["blue", "square"]}))
    with pytest.raises(ValueError, match="good.json: 5 attributes asked for, but 2 classes with 4 distinct"):
        excel.make_config("folder", classes, True, None, {"descriptions": str(good), "attributes": 5})
    assert excel.make_config("folder", classes, True, None, {"descriptions": str(good)}).attributes == 4


def test_shipped_descriptions_cover_the_vocabularies():
    for name in ("voc", "coco"):
        classes = builtin(name)
        descs = tse.load_descriptions(f"data/descriptions/{name}.json", classes)
        assert all(len(d) >= 15 and len(set(d)) == len(d) for d in descs), name
        assert sum(len(set(d)) for d in descs) >= excel.ATTRIBUTES[name]


# --------------------------------------------------------------------------- stage, pseudo
def _folder_dataset(tmp_path):
    root = tmp_path / "shots"
    root.mkdir()
    for i, (h, w) in enumerate([(64, 80), (64, 80), (48, 96)]):
        Image.fromarray(textured_image(h, w, seed=10 + i)).save(root / f"img{i}.png")
    (tmp_path / "classes.yaml").write_text("classes: [kettle, {name: teapot, prompt: tea pot}, mug]\n"
                                           "background: [table, wall]\n")
    (tmp_path / "labels.json").write_text(json.dumps({"img0": ["kettle"], "img1": ["mug", "teapot"], "img2": ["mug"]}))
    (tmp_path / "descriptions.json").write_text(json.dumps({
        "kettle": ["a shiny steel body", "a black plastic handle", "a short spout", "a round lid"],
        "teapot": ["a white porcelain body", "a curved spout", "painted blue flowers"],
        "mug": ["a cylindrical ceramic cup", "a single loop handle", "a printed logo", "a thick rim"]}))
    return root


def test_folder_dataset_end_to_end_with_own_vocabulary_and_descriptions(tmp_path, tiny_clip_path):
    from pipeline.data.datasets import build_dataset
    from pipeline.labels.pseudo import PseudoConfig, run_pseudo

    root = _folder_dataset(tmp_path)
    out = tmp_path / "cams"
    argv = ["--method", "excel", "--dataset", "folder", "--root", str(root), "--clip", str(tiny_clip_path),
            "--classes", str(tmp_path / "classes.yaml"), "--labels", str(tmp_path / "labels.json"),
            "--descriptions", str(tmp_path / "descriptions.json"), "--attributes", "6", "--out", str(out),
            "--workers", "0", "--save-init", "--no-progress"]
    assert cams_main(argv) == 0
    d = load_cams(out / "img1.npz")
    assert d["keys"].tolist() == [2, 1] and d["cams"].shape == (2, 4, 5) and d["image_size"].tolist() == [64, 80]
    assert d["cams_init"].shape == (2, 4, 5) and 0 <= d["cams"].min() and d["cams"].max() <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    cam = manifest["config"]["cam"]
    assert manifest["config"]["method"] == "excel" and cam["attributes"] == 6 and cam["tse"]
    assert len(cam["descriptions_sha256"]) == 64 and "sklearn" in cam
    assert cams_main(argv) == 0  # resumes: nothing to do
    assert cams_main(["5" if a == "6" else a for a in argv]) == 2  # another bank size: refused, not mixed
    ds = build_dataset("folder", root, tmp_path / "classes.yaml", tmp_path / "labels.json")
    res = run_pseudo(ds, ds.ids("all"), out, tmp_path / "pseudo", PseudoConfig(refine="par", require_gt=False),
                     n_jobs=1, progress=False)
    assert res["failed"] == 0
    label = np.array(Image.open(tmp_path / "pseudo" / "img1.png"))
    assert label.shape == (64, 80) and set(np.unique(label)) <= {0, 2, 3}  # argmax over bg + keys, no 255
    assert json.loads((tmp_path / "pseudo" / "manifest.json").read_text())["config"]["par_input_size"] == 0


def test_stage_square_input_static_maps_and_option_errors(tmp_path, tiny_clip_path, capsys):
    items = [("2007_000001", (96, 128), ["cat", "dog"]), ("2007_000002", (80, 112), ["person"])]
    root = tmp_path / "VOC"
    split = make_voc(root, items)
    out = tmp_path / "cams"
    s = run_cams(CamsConfig(dataset="voc", root=str(root), split=str(split), clip=str(tiny_clip_path), out=str(out),
                            method="excel", workers=0, progress=False, save_init=True, batch_size=2,
                            cam_options={"tse": False, "input_size": 64}))
    assert (s.written, s.failed) == (2, 0)
    d = load_cams(out / "2007_000001.npz")
    assert d["cams"].shape == (2, 4, 4) and d["image_size"].tolist() == [96, 128]
    # cams_init are the static patch-text CAMs of the image's classes, straight from the engine
    from pipeline.clip.model import load_clip

    model = load_clip(tiny_clip_path)
    cfg = excel.make_config("voc", builtin("voc"), True, None, {"tse": False, "input_size": 64})
    engine = excel.ExcelEngine(model, builtin("voc"), cfg)
    image, size = excel.load_for_model(root / "JPEGImages" / "2007_000001.jpg", input_size=64)
    static, _ = engine.maps(image[None])
    np.testing.assert_allclose(d["cams_init"], static[0, [7, 11]].numpy(), rtol=1e-5, atol=1e-6)
    # PAR labels take the CAM stage's square input size from its manifest for their guide image
    from pipeline.data.datasets import build_dataset
    from pipeline.labels.pseudo import PseudoConfig, run_pseudo

    res = run_pseudo(build_dataset("voc", root), ["2007_000001"], out, tmp_path / "pseudo",
                     PseudoConfig(refine="par", require_gt=False), n_jobs=1, progress=False)
    assert res["failed"] == 0
    assert json.loads((tmp_path / "pseudo" / "manifest.json").read_text())["config"]["par_input_size"] == 64
    # CLIP-ES-only flags and ExCEL-only flags are refused with the other method
    base = ["--dataset", "voc", "--root", str(root), "--split", str(split), "--clip", str(tiny_clip_path)]
    with pytest.raises(SystemExit):
        cams_main(base + ["--method", "excel", "--fusion", "cam"])
    with pytest.raises(SystemExit):
        cams_main(base + ["--input-size", "320"])
    assert "ExCEL options" in capsys.readouterr().err
    # a bad bank stops the stage before anything is written, naming the file
    bad = tmp_path / "bank.pth"
    bad.write_bytes(b"\x00" * 10)
    assert cams_main(base + ["--method", "excel", "--attribute-bank", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert f"{bad}: not an attribute bank" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
