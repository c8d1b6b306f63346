"""Online WeCLIP training end to end on synthetic scenes with a tiny random CLIP: image-level labels
only (no mask is opened), exact resume across the RFM phase switch, the affinity loss as an option
of the offline mode, and proof that online labels and the decoder learn (injected CAMs)."""
import numpy as np
import PIL.Image
import pytest
import torch

from pipeline import checkpoint as ckpt_io
from pipeline.eval import metrics
from pipeline.data.datasets import build_dataset
from pipeline.train.online import build_label_maker
from pipeline.clip.random import TINY, random_clip
from pipeline.train.config import load_config
from pipeline.train.inputs import aug_config
from pipeline.train.loop import train
from seg_helpers import (InjectedCAMs, ScoredLabels, assert_same_weights, forbid_label_maps, log_rows, make_data,
                          overrides, torchrun_train, without_masks)


pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = "configs/weclip-online_voc.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("online"), 8, 0, size=(64, 80), seed=5)


def tiny_cfg(d, **extra):
    sets = {"data.crop": 48, "data.scale_range": "[0.8,1.2]", "train.batch_size": 2, "schedule.iters": 3,
            "schedule.warmup_iters": 2, "train.log_every": 1, "online.switch_iter": 2, **extra}
    return load_config(CONFIG, overrides(d, **sets))


def test_trains_from_image_level_labels_without_opening_a_mask(data, tmp_path, monkeypatch):
    d = {**without_masks(data, tmp_path / "nomasks"), "pseudo": None}
    opened = forbid_label_maps(monkeypatch)
    res = train(tiny_cfg(d, **{"schedule.iters": 2}), tmp_path / "run", progress=False, tensorboard=False,
                clip_model=random_clip(TINY, seed=3), log=lambda *_: None)
    assert res["iteration"] == 2 and np.isfinite(res["loss"])
    assert not [p for p in opened if p.endswith(".png")]
    assert any(p.endswith(".jpg") for p in opened)             # the images themselves were read


def test_online_resume_continues_exactly_across_the_phase_switch(data, tmp_path):
    clip = random_clip(TINY, seed=3)
    cfg = tiny_cfg(data)
    kw = {"progress": False, "tensorboard": False, "clip_model": clip, "log": lambda *_: None}
    train(cfg, tmp_path / "full", **kw)
    train(cfg, tmp_path / "split", stop_at=2, **kw)          # stops just before the switch at iteration 2
    train(cfg, tmp_path / "split", resume=True, **kw)
    a, b = ckpt_io.load(tmp_path / "full"), ckpt_io.load(tmp_path / "split")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    full = log_rows(tmp_path / "full")
    assert full == log_rows(tmp_path / "split")              # same losses (so same online labels) at every step
    assert len(full) == 3 and any(r["loss_aff"] > 0 for r in full)
    assert a["meta"]["config"]["online"]["refine"] == "both" and a["meta"]["infer"]["crf_preset"] == "weclip"
    from pipeline.eval.infer import InferConfig

    icfg = InferConfig.from_dict(a["meta"]["infer"])             # what make predict / eval WHAT=model read
    assert icfg.long_side == 512 and icfg.scales == (1.0, 0.75) and icfg.flip and icfg.average_at == "logits"
    params, guide = icfg.crf_setup()
    assert (params.pos_xy, params.bi_xy, params.bi_rgb, guide) == (3.0, 64.0, 5.0, "rgb")
    # an ablation is a config value, recorded with the run, and it changes the labels (and so the losses)
    train(tiny_cfg(data, **{"online.refine": "none", "schedule.iters": 1}), tmp_path / "ablation", **kw)
    assert ckpt_io.load(tmp_path / "ablation")["meta"]["config"]["online"]["refine"] == "none"
    assert log_rows(tmp_path / "ablation")[0]["loss_seg"] != full[0]["loss_seg"]


def test_offline_weclip_takes_the_affinity_loss_from_label_pngs(data, tmp_path):
    sets = {"model.name": "weclip", "data.crop": 48, "train.batch_size": 2, "schedule.iters": 2, "train.log_every": 1,
            "train.aff_weight": 0.1, "train.loss": "bgfg"}
    cfg = load_config(None, overrides(data, **sets))
    train(cfg, tmp_path / "off", progress=False, tensorboard=False, clip_model=random_clip(TINY, seed=3),
          log=lambda *_: None)
    for r in log_rows(tmp_path / "off"):
        assert r["loss_aff"] > 0 and abs(r["loss"] - r["loss_seg"] - 0.1 * r["loss_aff"]) < 1e-4


def test_online_mode_refuses_datasets_whose_labels_live_in_masks(data, tmp_path):
    from pipeline.train.config import ConfigError
    from pipeline.train.step_online import image_level_samples

    ds = build_dataset("coco", data["root"], data["classes"])
    with pytest.raises(ConfigError, match="labels file"):
        image_level_samples(ds, str(data["train"]))


# ----------------------------------------------------------------------------- proof of learning
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("online_learn"), 32, 8, size=(160, 192), seed=1)


@pytest.mark.slow
def test_full_rfm_labels_beat_the_injected_cams_and_the_decoder_beats_its_first_labels(scenes, tmp_path):
    """The whole method (RFM on frozen attention, then on the decoder's affinity from the switch at
    iteration 60, then PAR) makes online labels that beat the CAMs they come from, and the decoder
    trained on them ends above the labels it started from.

    The injected CAMs trade two co-occurring classes in half the crops that show two or more
    (``synthetic.swap_cooccurring``): RFM and PAR repair the shapes of one crop but not which class a
    region is, while the decoder sees each class on its own colour in most crops. Without that error
    PAR makes the first labels near perfect (0.95-0.96) at pixel level and a decoder predicting at
    patch resolution from random CLIP features cannot pass them in a test-sized run (0.74-0.83).
    128-pixel crops (8 x 8 patches): on 64-pixel crops (4 x 4) the box masks' never-boxed last row and
    column weigh so much that the full RFM's labels fell below the CAMs.
    Measured when written (120 iterations, scenes of seeds 1 / 2 / 3): CAMs 0.552 / 0.515 / 0.544, online
    labels 0.621 / 0.569 / 0.600, first 10 iterations' labels 0.724 / 0.541 / 0.538, decoder on held-out
    scenes 0.877 / 0.667 / 0.654. With a trade in 30 % of such crops instead, seed 3's decoder
    (0.653) did not pass its first labels (0.661).
    """
    iters, early = 120, 10
    sets = {"data.crop": 128, "data.scale_range": "[0.6,1.0]", "train.batch_size": 4, "schedule.iters": iters,
            "schedule.warmup_iters": 10, "train.log_every": 100, "online.switch_iter": iters // 2,
            "train.val_every": iters}
    cfg = load_config(CONFIG, overrides(scenes, **sets))
    assert cfg["online"]["refine"] == "both" and 0 < cfg["online"]["switch_iter"] < iters
    clip = random_clip(TINY, seed=3)
    ds = build_dataset("voc", scenes["root"], scenes["classes"])
    blocks = build_label_maker(cfg["online"], clip, ds.classes).attention_blocks
    # the crops' ground truth is re-drawn with the training's own augmentation seed
    inject = InjectedCAMs(ds, ds.ids(str(scenes["train"])), aug_config(cfg["data"]), cfg["train"]["seed"], blocks,
                          swap=0.5)
    scored = ScoredLabels(build_label_maker(cfg["online"], clip, ds.classes, cams=inject), inject,
                          ds.classes.num_classes, early)
    res = train(cfg, tmp_path / "run", progress=False, tensorboard=False, clip_model=clip, label_maker=scored,
                log=lambda *_: None)
    cams, labels, first = (metrics.mean_iou(scored.conf[k]) for k in ("cams", "labels", "first"))
    print(f"injected CAMs {cams:.3f}, online labels {labels:.3f}, first {early} its' labels {first:.3f}, "
          f"decoder val {res['val_miou']:.3f}")
    assert labels > cams + MARGIN_LABELS, (labels, cams)
    assert res["val_miou"] > first + MARGIN_DECODER, (res["val_miou"], first)


MARGIN_LABELS = 0.03    # measured +0.054 to +0.069 over three scene seeds
MARGIN_DECODER = 0.05   # measured +0.113 to +0.153 over three scene seeds


@pytest.mark.slow
def test_online_ddp_two_processes_equal_one_process_at_the_global_batch(data, tmp_path):
    """Every step of WeCLIP's label making is per crop (no batch statistics) and the losses pool their
    counts over the processes, so 2 gloo processes at batch 1 train as one process at batch 2 over the
    same crops, once dropout (drawn per process) is off: exactly so without RFM (``online.refine:
    none``). RFM's box masks threshold the CAMs, so the float rounding of the batched GradCAM (about
    1e-6, it depends on the batch's composition) can move a box when a CAM value sits on the threshold:
    measured here, one crop of the third global batch changed 592 of its 2304 pixels. The full method
    is run under DDP across the switch too, and must train and keep both ranks' RNG states."""
    from pipeline.clip.random import save_clip

    clip = save_clip(random_clip(TINY, seed=3), tmp_path / "tiny.pt")
    sets = lambda batch, **kw: overrides(data, **{"model.clip": clip, "data.crop": 48, "train.batch_size": batch,  # noqa: E731
                                                  "online.switch_iter": 1, "train.log_every": 1, "model.dropout": 0,
                                                  "data.pseudo": None, **kw})
    torchrun_train(CONFIG, tmp_path / "full", sets(1, **{"schedule.iters": 2}))
    ck = ckpt_io.load(tmp_path / "full")
    assert ck["iteration"] == 2 and len(ck["rng"]) == 2 and len(log_rows(tmp_path / "full")) == 2
    plain = {"schedule.iters": 4, "online.refine": "none"}
    torchrun_train(CONFIG, tmp_path / "ddp", sets(1, **plain))
    train(load_config(CONFIG, sets(2, **plain)), tmp_path / "one", progress=False, tensorboard=False,
          log=lambda *_: None)
    a, b = ckpt_io.load(tmp_path / "ddp"), ckpt_io.load(tmp_path / "one")
    x, y = log_rows(tmp_path / "ddp"), log_rows(tmp_path / "one")
    assert [r["iteration"] for r in x] == [1, 2, 3, 4] and any(r["loss_aff"] > 0 for r in x)
    for p, q in zip(x, y, strict=True):                      # logged losses: the global batch's
        assert p == pytest.approx(q, rel=1e-5, abs=2e-6), (p, q)
    assert_same_weights(a["model"], b["model"])


def test_folder_dataset_image_level_labels_from_csv(tmp_path):
    from pipeline.train.step_online import image_level_samples

    (tmp_path / "imgs").mkdir()
    for i in ("a", "b"):
        PIL.Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / f"{i}.jpg")
    (tmp_path / "labels.csv").write_text("id,labels\na,bird;aeroplane\nb,boat\n")
    (tmp_path / "classes.yaml").write_text("classes: [aeroplane, bicycle, bird, boat]\n")
    ds = build_dataset("folder", tmp_path / "imgs", tmp_path / "classes.yaml", tmp_path / "labels.csv")
    paths, labels = image_level_samples(ds, "all")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a.jpg", "b.jpg"]
    assert labels == [[0, 2], [3]]                               # ascending, as the reference's classes
    (tmp_path / "labels.csv").write_text("id,labels\na,bird\nb,boat\nc,bird\n")
    ds = build_dataset("folder", tmp_path / "imgs", tmp_path / "classes.yaml", tmp_path / "labels.csv")
    with pytest.raises(ValueError, match="c.jpg: image file not found"):
        image_level_samples(ds, "all")
