"""Text side: sharpness, template ranking, synonym fusion modes, ablation switches, custom vocabularies."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from pipeline.labels.affinity import minmax
from pipeline.cams.gradcam import CAMConfig, CAMEngine, class_scores
from pipeline.classes import ClassList, builtin
from pipeline.clip.model import load_clip
from pipeline.cams.prompts import (PromptsConfig, best_template, propose_background, run_prompts, score_templates,
                              sharpness)
from pipeline.clip.text import encode_prompts, text_variants

TEMPLATES = ["a clean origami {}.", "a photo of a {}.", "a sketch of the {}.", "itap of my {}.", "there is a {} in the scene."]


@pytest.fixture(scope="module")
def model(tiny_clip_path):
    return load_clip(tiny_clip_path)


def test_sharpness_matches_hand_computation():
    a = torch.tensor([[0.5, 0.3], [0.2, 0.2]])      # image 1: 2 templates x 2 labels
    b = torch.tensor([[0.9], [0.4]])                # image 2: single label, variance 0
    c = torch.tensor([[0.1, 0.2, 0.6], [0.3, 0.3, 0.3]])
    # template 0: vars 0.01, 0, 0.04666..; means 0.4, 0.9, 0.3
    var0 = 0.01 + 0 + np.var([0.1, 0.2, 0.6])
    want0 = var0 / (0.4 + 0.9 + 0.3)
    want1 = 0.0 / (0.2 + 0.4 + 0.3)
    got = sharpness([a, b, c])
    assert got[0].item() == pytest.approx(want0, rel=1e-6) and got[1].item() == pytest.approx(want1, abs=1e-9)


def test_ranking_is_invariant_to_image_order(model):
    voc = builtin("voc")
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(1, 3, 48, 64, generator=g), lab) for lab in ([14, 8], [2], [7, 11, 1], [19])]
    fwd = score_templates(model, voc, TEMPLATES, items)
    rev = score_templates(model, voc, TEMPLATES, items[::-1])
    assert torch.allclose(fwd, rev, rtol=1e-5)
    assert fwd.argsort().tolist() == rev.argsort().tolist()
    # equals the direct definition with the engine's own softmax targets
    scale = float(model.logit_scale.exp())
    per_image = []
    for x, lab in items:
        emb = model.visual.pool(model.visual.forward_intermediates(x).tokens, "patch_mean")
        emb = emb / emb.norm(dim=-1, keepdim=True)
        rows = [class_scores(scale * emb @ encode_prompts(model, list(voc.prompts) + list(voc.background), [t]).t(),
                             [lab], 20)[0] for t in TEMPLATES]
        per_image.append(torch.stack(rows))
    assert torch.allclose(fwd, sharpness(per_image), rtol=1e-4)


def test_feature_fusion_of_one_synonym_equals_plain(model):
    voc = builtin("voc")
    sentence = text_variants(model, voc, fusion="sentence")
    feature = text_variants(model, voc, fusion="feature")
    assert sentence.shape == feature.shape == (1, 45, model.arch.embed_dim)
    single = [c for c in range(20) if "," not in voc.prompts[c]]
    assert torch.allclose(sentence[0, single], feature[0, single], atol=1e-6)
    person = voc.index("person")  # "person with clothes,people,human": three synonyms averaged
    parts = encode_prompts(model, ["person with clothes", "people", "human"], [voc.template])
    fused = parts.mean(0) / parts.mean(0).norm()
    assert torch.allclose(feature[0, person], fused, atol=1e-6)
    assert not torch.allclose(feature[0, person], sentence[0, person], atol=1e-3)
    cam_level = text_variants(model, voc, fusion="cam")
    assert cam_level.shape[0] == 3 and torch.allclose(cam_level[2, person], parts[2], atol=1e-6)
    assert torch.allclose(cam_level[2, 0], cam_level[0, 0])  # one-synonym classes repeat
    plain = text_variants(model, voc, synonyms=False, background=False)
    assert plain.shape == (1, 20, model.arch.embed_dim)
    assert torch.allclose(plain[0, person], encode_prompts(model, ["person"], [voc.template])[0], atol=1e-6)


def test_cam_level_fusion_averages_per_synonym_maps(model):
    classes = ClassList(names=("thing", "other"), prompts=("thing,object", "other"), background=("ground",))
    x = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    fused = CAMEngine(model, classes, CAMConfig(fusion="cam", affinity="none"))(x, [[0]])[0]
    maps = []
    for syn in ("thing", "object"):
        one = ClassList(names=("thing", "other"), prompts=(syn, "other"), background=("ground",))
        maps.append(CAMEngine(model, one, CAMConfig(affinity="none"))(x, [[0]])[0].init)
    want = minmax(torch.from_numpy((maps[0] + maps[1]) / 2)).numpy()
    np.testing.assert_allclose(fused.init, want, atol=1e-5)


def test_ablation_switches(model):
    voc = builtin("voc")
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(3))
    base = CAMEngine(model, voc)(x, [[14, 8]])[0]
    none = CAMEngine(model, voc, CAMConfig(affinity="none"))(x, [[14, 8]])[0]
    np.testing.assert_array_equal(none.cams, none.init)
    np.testing.assert_allclose(none.init, base.init, atol=1e-6)
    mhsa = CAMEngine(model, voc, CAMConfig(affinity="mhsa"))(x, [[14, 8]])[0]
    assert np.abs(mhsa.cams - base.cams).max() > 1e-3
    # softmax over one label and no background is constant: its gradient is rounding noise, far
    # below the 1e-7 of the min-max denominator, so the map stays near zero
    lone = CAMEngine(model, voc, CAMConfig(background=False))(x, [[14]])[0]
    assert lone.init.max() < 0.05
    raw = CAMEngine(model, voc, CAMConfig(softmax=False, background=False))(x, [[14]])[0]
    assert raw.init.max() > 0.5
    logits = torch.randn(2, 25, generator=torch.Generator().manual_seed(4))
    every = class_scores(logits, [[3, 1], [7]], 20, all_classes=True)
    assert torch.allclose(every[0], logits[0].softmax(0)[[3, 1]]) and every[1, 1] == 0
    assert torch.equal(class_scores(logits, [[3, 1], [7]], 20, softmax=False)[0], logits[0, [3, 1]])
    with pytest.raises(ValueError, match="affinity"):
        CAMConfig(affinity="crf")


def test_propose_background_excludes_collisions():
    classes = ClassList(names=("christmas tree", "door handle", "rocks"), prompts=("christmas tree", "door handle", "rocks,stones"),
                        background=())
    words = propose_background(classes)
    assert "tree" not in words and "door" not in words and "rock" not in words and "stone" not in words
    assert "sky" in words and "grass" in words
    voc = builtin("voc")
    assert "keyboard" in propose_background(voc) and "table" in propose_background(voc)


def test_custom_vocabulary_end_to_end(tmp_path, tiny_clip_path):
    """folder dataset + own class YAML through make prompts, make cams (PROMPT=best) and make pseudo."""
    from PIL import Image

    from conftest import textured_image
    from pipeline.data.datasets import build_dataset
    from pipeline.labels.pseudo import PseudoConfig, run_pseudo
    from pipeline.cams.stage import CamsConfig, run_cams

    imgs = tmp_path / "photos"
    imgs.mkdir()
    labels = {}
    for i in range(4):
        Image.fromarray(textured_image(48, 64, seed=i)).save(imgs / f"p{i}.png")
        labels[f"p{i}"] = [["widget"], ["gadget", "widget"], ["gadget"], ["widget"]][i]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "vocab.yaml").write_text("template: a photo of a {}.\nbox_threshold: 0.4\nclasses:\n  - widget\n"
                                         "  - {name: gadget, prompt: 'gadget,gizmo'}\nbackground: [table, wall]\n")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    common = dict(dataset="folder", root=str(imgs), split="all", clip=str(tiny_clip_path),
                  classes=str(tmp_path / "vocab.yaml"), labels=str(tmp_path / "labels.json"))
    ranking, errors = run_prompts(PromptsConfig(out=str(tmp_path / "prompts"), templates=str(tmp_path / "templates.txt"),
                                                progress=False, **common))
    assert not errors and sorted(ranking.templates) == sorted(TEMPLATES)
    with open(tmp_path / "prompts" / "ranking.csv") as f:
        assert [r["template"] for r in csv.DictReader(f)] == ranking.templates
    assert (tmp_path / "prompts" / "sharpness.png").stat().st_size > 1000
    best = best_template(tmp_path / "prompts" / "ranking.csv")
    assert best == ranking.templates[0]

    s = run_cams(CamsConfig(out=str(tmp_path / "cams"), workers=0, progress=False, cam_options={"template": "best"},
                            prompt_ranking=str(tmp_path / "prompts" / "ranking.csv"), **common))
    assert s.written == 4
    manifest = json.loads((tmp_path / "cams" / "manifest.json").read_text())
    assert manifest["config"]["cam"]["template"] == best
    data = build_dataset("folder", imgs, tmp_path / "vocab.yaml", tmp_path / "labels.json")
    summary = run_pseudo(data, data.ids("all"), tmp_path / "cams", tmp_path / "pseudo",
                         PseudoConfig(require_gt=False), n_jobs=1, progress=False)
    assert len(list((tmp_path / "pseudo").glob("*.png"))) == 4, summary
