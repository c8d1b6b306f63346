"""Training loop: exact resume, data stream, config, input validation before training, DDP on CPU."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import checkpoint as ckpt_io
from pipeline.clip.random import TINY, random_clip
from pipeline.data.segdata import AugConfig, ResumableBatchSampler, augment
from pipeline.train.config import ConfigError, load_config
from pipeline.train.loop import train
from seg_helpers import log_rows, make_data, overrides, torchrun_train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("segdata"), 12, 2, size=(72, 96), seed=5)


def tiny_weclip_cfg(data, **extra):
    base = {"model.name": "weclip", "data.crop": 48, "data.scale_range": "[0.7,1.3]", "train.batch_size": 2,
            "train.accum": 2, "schedule.iters": 100, "schedule.warmup_iters": 10, "train.log_every": 1}
    return load_config(None, overrides(data, **{**base, **extra}))


def test_resume_after_50_equals_100_uninterrupted_iterations(data, tmp_path):
    clip = random_clip(TINY, seed=3)
    cfg = tiny_weclip_cfg(data)
    full = train(cfg, tmp_path / "full", progress=False, tensorboard=False, clip_model=clip, log=lambda *_: None)
    half = train(cfg, tmp_path / "split", stop_at=50, progress=False, tensorboard=False, clip_model=clip,
                 log=lambda *_: None)
    assert half["iteration"] == 50
    ck = ckpt_io.load(tmp_path / "split")
    assert ck["iteration"] == 50 and set(ck["rng"][0]) >= {"torch", "numpy", "python"}
    # the resumed half may use DataLoader workers: the stream depends on (seed, iteration) only
    resumed_cfg = tiny_weclip_cfg(data, **{"data.workers": 2})
    rest = train(resumed_cfg, tmp_path / "split", resume=True, progress=False, tensorboard=False, clip_model=clip,
                 log=lambda *_: None)
    assert rest["iteration"] == full["iteration"] == 100
    a, b = ckpt_io.load(tmp_path / "full"), ckpt_io.load(tmp_path / "split")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert log_rows(tmp_path / "full") == log_rows(tmp_path / "split")  # same losses and lrs at every step
    # and a different seed really does change the result (the equality above is not vacuous)
    other = train(tiny_weclip_cfg(data, **{"train.seed": 2, "schedule.iters": 5}), tmp_path / "other", progress=False,
                  tensorboard=False, clip_model=clip, log=lambda *_: None)
    assert other["loss"] != log_rows(tmp_path / "full")[4]["loss"]


def test_data_stream_is_a_function_of_seed_and_position():
    s = ResumableBatchSampler(10, 2, seed=7)
    later = ResumableBatchSampler(10, 2, seed=7, start_batch=6)
    first = [b for b, _ in zip(s, range(9))]
    assert [b for b, _ in zip(later, range(3))] == first[6:9]
    epoch0 = [i for b in first[:5] for i, _ in b]
    assert sorted(epoch0) == list(range(10)) and [c for b in first for _, c in b] == list(range(18))
    ranks = [ResumableBatchSampler(10, 2, seed=7, rank=r, world_size=2) for r in (0, 1)]
    b0, b1 = ranks[0].batch(0), ranks[1].batch(0)
    assert {i for i, _ in b0}.isdisjoint({i for i, _ in b1}) and len({c for _, c in b0 + b1}) == 4
    img = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    lab = np.tile(np.arange(40, dtype=np.uint8) % 5, (30, 1))
    cfg = AugConfig(crop=48, scale_range=(0.5, 1.0))
    i1, l1 = augment(img, lab, cfg, np.random.default_rng([7, 3]))
    i2, l2 = augment(img, lab, cfg, np.random.default_rng([7, 3]))
    assert np.array_equal(i1, i2) and np.array_equal(l1, l2) and i1.shape == (48, 48, 3)
    assert (l1 == 255).any() and (i1[l1 == 255] == 0).all()  # padding: label 255, image 0 (WeCLIP's transforms)
    cut = AugConfig(crop=20, scale_range=None, flip=True)
    for seed in range(6):  # image and label stay aligned through flip and crop
        ci, cl = augment(np.repeat(lab[..., None] * 40, 3, -1), lab, cut, np.random.default_rng(seed))
        assert np.array_equal(ci[..., 0], cl * 40)


def test_config_overrides_and_unknown_keys():
    cfg = load_config("configs/deeplab_voc.yaml", ["schedule.iters=7", "data.scales=[1.0, 2.0]", "model.pretrained=null"])
    assert cfg["schedule"]["iters"] == 7 and cfg["data"]["scales"] == [1.0, 2.0] and cfg["optim"]["name"] == "sgd"
    assert cfg["train"]["batch_size"] == 5 and cfg["train"]["accum"] == 2 and cfg["schedule"]["power"] == 0.9
    with pytest.raises(ConfigError, match="unknown key 'itres'"):
        load_config(None, ["schedule.itres=5"])
    with pytest.raises(ConfigError, match="train.loss"):
        load_config(None, ["train.loss=focal"])


def _break(data, tmp_path, how):
    """A private copy of the data with one problem."""
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(data["root"], root)
    d = {**data, "root": root, "classes": root / "classes.yaml", "pseudo": root / "pseudo",
         "train": root / data["train"].relative_to(data["root"]), "val": root / data["val"].relative_to(data["root"])}
    victim = root / "pseudo" / f"{data['train_ids'][3]}.png"
    if how == "value":
        lab = np.array(Image.open(victim))
        lab[0, 0] = 9  # 4 classes: valid values are 0..4 and 255
        im = Image.fromarray(lab, "P")
        im.putpalette(Image.open(victim).getpalette())
        im.save(victim)
    elif how == "size":
        Image.open(victim).resize((50, 40), Image.NEAREST).save(victim)
    elif how == "missing":
        victim.unlink()
    elif how == "empty":
        d["train"].write_text("# nothing\n")
    return d, victim


@pytest.mark.parametrize("how,match", [("value", r"label values \[9\] outside 0..4"),
                                       ("size", "label size 40x50 differs from image"),
                                       ("missing", "label file not found"), ("empty", "no image ids")])
def test_bad_inputs_fail_before_training_naming_the_file(data, tmp_path, how, match):
    d, victim = _break(data, tmp_path, how)
    cfg = load_config(None, overrides(d, **{"model.name": "deeplabv2", "model.layers": "[1,1,1,1]",
                                            "model.base_width": 8, "schedule.iters": 2}))
    with pytest.raises(ValueError, match=match) as e:
        train(cfg, tmp_path / "run", progress=False, tensorboard=False, log=lambda *_: None)
    if how != "empty":
        assert str(victim) in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing saved


def test_resume_refuses_another_model_or_class_count(data, tmp_path):
    common = {"schedule.iters": 2, "data.crop": 32, "train.batch_size": 2}
    cfg = load_config(None, overrides(data, **{"model.name": "deeplabv2", "model.layers": "[1,1,1,1]",
                                               "model.base_width": 8, **common}))
    train(cfg, tmp_path / "run", progress=False, tensorboard=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, tmp_path / "run", progress=False, tensorboard=False, log=lambda *_: None)
    other = load_config(None, overrides(data, **{"model.name": "weclip", **common}))
    with pytest.raises(ckpt_io.CheckpointMismatch, match="'deeplabv2' model, this run builds 'weclip'"):
        train(other, tmp_path / "run", resume=True, progress=False, tensorboard=False,
              clip_model=random_clip(TINY, seed=0), log=lambda *_: None)
    more = tmp_path / "classes21.yaml"
    more.write_text("classes: [" + ", ".join(f"c{i}" for i in range(20)) + ", aeroplane]\n")
    with pytest.raises(ckpt_io.CheckpointMismatch, match="5 classes"):
        cfg21 = load_config(None, overrides(data, **{"model.name": "deeplabv2", "model.layers": "[1,1,1,1]",
                                                     "model.base_width": 8, "data.classes": more, **common}))
        train(cfg21, tmp_path / "run", resume=True, progress=False, tensorboard=False, log=lambda *_: None)


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_gloo(data, tmp_path):
    clip = tmp_path / "tiny.pt"
    from pipeline.clip.random import save_clip

    save_clip(random_clip(TINY, seed=3), clip)
    sets = overrides(data, **{"model.name": "weclip", "model.clip": clip, "data.crop": 48, "train.batch_size": 2,
                              "schedule.iters": 6, "train.ckpt_every": 3, "train.log_every": 1,
                              "train.val_every": 3})  # validation on rank 0 while rank 1 waits
    torchrun_train("configs/weclip_voc.yaml", tmp_path / "ddp", sets, timeout=120)
    ck = ckpt_io.load(tmp_path / "ddp")
    assert ck["iteration"] == 6 and len(ck["rng"]) == 2  # both ranks' RNG states, for an exact resume
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    assert len(log_rows(tmp_path / "ddp")) == 6
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").glob("iter_*.pt")) == \
        ["iter_0000003.pt", "iter_0000006.pt"]


@pytest.mark.parametrize("method, missing", [(None, "SegmentationClassAug/"), ("weclip", "Annotations/")])
def test_a_root_of_another_layout_is_refused_before_the_model_loads(tmp_path, monkeypatch, method, missing):
    """Online training reads image-level labels (Annotations/), validation reads masks: a VOC root without
    them is refused naming what is missing, before anything is built."""
    (tmp_path / "JPEGImages").mkdir()
    cfg = load_config("configs/weclip-online_voc.yaml" if method else "configs/weclip_voc.yaml",
                      [f"data.root={tmp_path}"])
    import pipeline.models

    monkeypatch.setattr(pipeline.models, "build_model", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises(ValueError, match=f"has no .*{missing}"):
        train(cfg, tmp_path / "run")


def test_a_non_finite_loss_stops_the_run_naming_its_iteration_before_any_later_checkpoint(data, tmp_path,
                                                                                          monkeypatch):
    """Losses stay on the device between log steps; a NaN is still caught, named by its own iteration, and
    no checkpoint of the weights it spoiled is written."""
    from pipeline.train import step as step_module

    calls, loss = [], step_module.model_loss

    def nan_at_the_third(*args, **kwargs):
        calls.append(1)
        value = loss(*args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(step_module, "model_loss", nan_at_the_third)
    cfg = tiny_weclip_cfg(data, **{"train.accum": 1, "schedule.iters": 8, "train.log_every": 4,
                                   "train.ckpt_every": 2})
    with pytest.raises(FloatingPointError, match="loss became nan at iteration 3;"):
        train(cfg, tmp_path, progress=False, tensorboard=False, clip_model=random_clip(TINY, seed=3),
              log=lambda *_: None)
    assert ckpt_io.load(tmp_path)["iteration"] == 2


def test_no_host_read_between_log_steps(data, tmp_path):
    """On a GPU a host read at every step makes the host wait for the device before it can queue the next
    step: the number of reads does not grow with the iterations between two log steps."""
    from dispatch_count import count

    clip = random_clip(TINY, seed=3)

    def run(iters, folder):
        cfg = tiny_weclip_cfg(data, **{"schedule.iters": iters, "train.log_every": 100, "train.ckpt_every": 100,
                                       "schedule.warmup_iters": 0})
        return count(train, cfg, tmp_path / folder, progress=False, tensorboard=False, clip_model=clip,
                     log=lambda *_: None)[0]

    two, six = run(2, "two"), run(6, "six")
    assert six.syncs == two.syncs, (two.sync_ops, six.sync_ops)
