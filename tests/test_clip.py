"""CLIP backbone: checkpoint formats, architecture inference, refusals, intermediates, text tower."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.clip.model import CLIP, CheckpointError, CLIPArch, interpolate_pos_embed, load_clip, read_state_dict
from pipeline.clip.random import TINY, VIT_B_16, VIT_B_32, VIT_L_14, random_clip, save_clip
from pipeline.clip.tokenizer import tokenize
from reference import ReferenceCLIP


def test_torchscript_and_state_dict_load_the_same_weights(tmp_path, tiny_clip_path):
    model = random_clip(TINY, seed=3)
    plain = save_clip(model, tmp_path / "plain.pt", torchscript=False)
    a, b = load_clip(tiny_clip_path), load_clip(plain)
    assert a.arch == b.arch == TINY
    # OpenAI ships fp16 weights: both files hold the fp16-rounded values of the same model
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a.visual.proj, model.visual.proj.half().float())
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_wrapped_and_ddp_prefixed_state_dicts_load(tmp_path):
    sd = {f"module.{k}": v for k, v in random_clip(TINY).state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    assert load_clip(tmp_path / "wrapped.pth").arch == TINY


@pytest.mark.parametrize("arch", [VIT_B_16, VIT_B_32, VIT_L_14], ids=["B16", "B32", "L14"])
def test_architecture_inferred_from_weight_shapes(arch):
    with torch.device("meta"):
        sd = CLIP(arch).state_dict()
    inferred = CLIPArch.from_state_dict(sd)
    assert inferred == arch
    assert inferred.name == {768: "ViT-B", 1024: "ViT-L"}[arch.vision_width] + f"/{arch.patch_size}"


def test_refuses_resnet_clip():
    sd = {"visual.layer1.0.conv1.weight": torch.zeros(1), "visual.attnpool.c_proj.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="ResNet CLIP"):
        CLIPArch.from_state_dict(sd, "RN50.pt")


def test_refuses_truncated_unrelated_and_missing_files(tmp_path, tiny_clip_path):
    data = tiny_clip_path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt.*truncated"):
        load_clip(tmp_path / "cut.pt")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not an OpenAI CLIP checkpoint"):
        load_clip(tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_clip(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="not found"):
        load_clip(tmp_path / "absent.pt")
    sd = read_state_dict(tiny_clip_path)
    sd["visual.proj"] = torch.zeros(5, 5)
    torch.save(sd, tmp_path / "bad_shape.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_clip(tmp_path / "bad_shape.pt")


def test_pos_embed_interpolation_non_square_grid():
    torch.manual_seed(0)
    pos = torch.randn(1 + 14 * 14, 768)
    out = interpolate_pos_embed(pos, (24, 32))
    assert out.shape == (1 + 24 * 32, 768)
    assert torch.equal(out[0], pos[0])
    grid = pos[1:].t().reshape(1, 768, 14, 14)
    want = F.interpolate(grid, size=(24, 32), mode="bilinear", align_corners=False)[0]
    # token t >= 1 sits at row (t-1)//w, column (t-1)%w
    assert torch.allclose(out[1 + 5 * 32 + 7], want[:, 5, 7], atol=1e-6)
    assert torch.allclose(interpolate_pos_embed(pos, (14, 14)), pos, atol=1e-6)


def test_intermediates_attention_qkv_and_blocks(tiny_clip_path):
    model = load_clip(tiny_clip_path)
    x = torch.randn(2, 3, 48, 80)
    full = model.visual.forward_intermediates(x, attention="heads", block_outputs=[2, 11], qkv_blocks=[11])
    mean = model.visual.forward_intermediates(x, attention="mean", attention_blocks=[4, 11])
    L = 1 + 3 * 5
    assert full.attentions[0].shape == (2, TINY.vision_width // 64, L, L)
    assert set(mean.attentions) == {4, 11} and mean.attentions[11].shape == (2, L, L)
    assert torch.allclose(full.attentions[11].mean(1), mean.attentions[11], atol=1e-6)
    assert torch.allclose(mean.attentions[4].sum(-1), torch.ones(2, L), atol=1e-5)
    assert torch.allclose(full.blocks[11], full.tokens) and torch.allclose(full.tokens, mean.tokens, atol=1e-5)
    q, k, v = full.qkv[11]
    assert q.shape == k.shape == v.shape == (2, 1, L, 64)
    # attention recomputed from the returned q, k equals the recorded attention
    a = ((q / 8) @ k.transpose(-2, -1)).softmax(-1)
    assert torch.allclose(a, full.attentions[11], atol=1e-5)
    part = model.visual.forward_intermediates(x, n_blocks=3, block_outputs=[2])
    assert torch.equal(part.tokens, part.blocks[2]) and torch.allclose(part.tokens, full.blocks[2], atol=1e-6)


def test_matches_openai_style_model(tiny_clip_path):
    """Our towers equal an nn.MultiheadAttention, sequence-first model built from the same weights."""
    model = load_clip(tiny_clip_path)
    ref = ReferenceCLIP(read_state_dict(tiny_clip_path))
    tokens = tokenize(["a clean origami cat.", "a clean origami person with clothes,people,human."])
    assert torch.allclose(model.encode_text(tokens), ref.encode_text(tokens), atol=1e-5)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = model.visual.forward_intermediates(x, n_blocks=11, attention="mean")
        theirs, attns = ref.encode_image(x)
    assert torch.allclose(ours.tokens[0], theirs[:, 0], atol=1e-5)
    assert all(torch.allclose(ours.attentions[i], attns[i], atol=1e-6) for i in range(11))


def test_tokenizer_does_not_import_clip_or_torchvision():
    code = ("import sys; from pipeline.clip.tokenizer import tokenize; t = tokenize('a clean origami cat.'); "
            "assert t[0, 0] == 49406 and 49407 in t[0]; "
            "assert 'clip' not in sys.modules and 'torchvision' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_synonyms_with_and_without_spaces_tokenise_alike():
    a, b = tokenize(["clothes,people,human", "clothes, people, human"])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="tokens long"):
        tokenize(["word " * 100])
