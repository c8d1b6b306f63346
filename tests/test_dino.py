"""The DINOv2 backbone: equality with facebookresearch/dinov2's ``DinoVisionTransformer`` (restated in
``reference_dino.py``) on random weights of the released shapes, with and without registers, on grids
that shrink, grow and keep the positional table; the released file format and its refusals; block
outputs on request."""
import re

import pytest
import torch

from pipeline.dino.model import CheckpointError, DinoArch, load_dino, read_state_dict
from pipeline.dino.random import TINY, TINY_REG, VIT_S_14, VIT_S_14_REG, random_dino, save_dino
from reference_dino import reference_patch_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def image(h, w, seed=0):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", [TINY, TINY_REG], ids=["plain", "registers"])
@pytest.mark.parametrize("size", [(308, 420), (560, 280), (518, 518), (14, 28)], ids=str)
def test_patch_tokens_equal_the_reference_on_every_kind_of_grid(arch, size):
    """22 x 30 and 40 x 20 grids resize the 37 x 37 table down and up (offset scale factors without
    antialiasing, or antialiased sizes with registers); 37 x 37 keeps it as is."""
    model = random_dino(arch, seed=1)
    x = image(*size, seed=sum(size))
    got = model(x)[0].double()
    want = reference_patch_tokens(model.state_dict(), x[0])
    assert got.shape == want.shape == (size[0] // 14 * size[1] // 14, 128)
    assert (got - want).abs().max() <= 1e-4


def test_released_shapes_equal_the_reference():
    """ViT-S/14 as released (384 wide, 12 blocks of 6 heads, 37 x 37 table), plain on a non-square grid
    and with its 4 registers on the training crops' 22 x 22 grid: max |d| <= 1e-4 on the patch tokens."""
    for arch, size in ((VIT_S_14, (224, 420)), (VIT_S_14_REG, (308, 308))):
        model = random_dino(arch, seed=2)
        x = image(*size, seed=7)
        d = (model(x)[0].double() - reference_patch_tokens(model.state_dict(), x[0])).abs().max()
        assert d <= 1e-4, (arch.name, float(d))


def test_released_file_round_trip_reads_the_architecture_off_the_weights(tmp_path):
    model = random_dino(TINY_REG, seed=3)
    path = save_dino(model, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    sd = torch.load(path, weights_only=True)
    assert {"cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight",
            "blocks.1.ls2.gamma", "blocks.0.attn.qkv.bias", "norm.bias"} <= set(sd)
    loaded = load_dino(path)
    assert loaded.arch == TINY_REG and loaded.arch.heads == 2 and loaded.arch.name == "ViT-w128/14 + 4 registers"
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = image(42, 56)
    assert torch.equal(loaded(x), model(x))
    # wrapped and prefixed state dicts, as training scripts save them
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    assert torch.equal(load_dino(tmp_path / "wrapped.pth")(x), model(x))
    assert DinoArch.from_state_dict(random_dino(VIT_S_14).state_dict()) == VIT_S_14


def test_block_outputs_on_request():
    model = random_dino(TINY, seed=4)
    x = image(28, 42)
    out = model.forward_features(x, block_outputs=(0, 1))
    manual = model.blocks[0](model.embed(x))
    assert torch.allclose(out.blocks[0], manual, atol=1e-6)
    assert torch.equal(out.blocks[1], out.prenorm) and out.grid == (2, 3)
    assert torch.allclose(out.patch_tokens, model.norm(out.prenorm)[:, 1:], atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the DINOv2 patch size 14"):
        model(image(30, 42))


def test_follows_its_inputs_device(strict_device):
    model = random_dino(TINY_REG, seed=5)
    x = image(28, 42)
    with strict_device():
        out = model(x)
    assert out.device.type == "cpu" and out.shape == (1, 6, 128)


def test_bad_files_are_refused_with_the_file_and_the_fix(tmp_path, tiny_clip_path):
    def refused(path, pattern):
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_dino(path)
        assert str(path) in str(e.value) and "Traceback" not in str(e.value)

    refused(tmp_path / "missing.pth", "not found.*DINO=")
    (tmp_path / "empty.pth").write_bytes(b"")
    refused(tmp_path / "empty.pth", "empty")
    good = save_dino(random_dino(TINY), tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:5000])
    refused(tmp_path / "cut.pth", "truncated")
    from pipeline.clip.model import read_state_dict as read_clip

    torch.save(read_clip(tiny_clip_path), tmp_path / "clip.pth")
    refused(tmp_path / "clip.pth", "CLIP checkpoint")
    sd = read_state_dict(good)
    torch.save({re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", k): v for k, v in sd.items()}, tmp_path / "chunked.pth")
    refused(tmp_path / "chunked.pth", "chunked")
    swiglu = {k.replace("mlp.fc1", "mlp.w12"): v for k, v in sd.items()}
    torch.save(swiglu, tmp_path / "g14.pth")
    refused(tmp_path / "g14.pth", "SwiGLU")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    refused(tmp_path / "other.pth", "not a DINOv2 backbone")
    bad = dict(sd)
    bad["blocks.1.mlp.fc1.weight"] = torch.zeros(7, 128)
    torch.save(bad, tmp_path / "bad.pth")
    refused(tmp_path / "bad.pth", "do not fit")
