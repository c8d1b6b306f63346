"""Training config: typed values from YAML files and --set overrides, refusals naming the key (its type,
the nearest known key), resume comparing typed values."""

import copy
from pathlib import Path

import pytest

from pipeline.train.config import ConfigError, check_config, defaults, flatten, load_config, resume_differences
from stages.train import main as train_main


def test_exponent_floats_are_floats_in_overrides_and_files(tmp_path):
    assert load_config(None, ["optim.lr=1e-3"])["optim"]["lr"] == 0.001
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1e-3   # YAML 1.1 reads this as a string\n  eps: 1e-8\n")
    cfg = load_config(f)
    assert cfg["optim"]["lr"] == 0.001 and cfg["optim"]["eps"] == 1e-8
    assert isinstance(cfg["optim"]["lr"], float)


def test_values_take_their_keys_types():
    cfg = load_config(None, ["schedule.iters=7", "data.scales=[1, 2]", "model.encoder_blocks=11", "data.split=2012"])
    assert cfg["schedule"]["iters"] == 7 and cfg["data"]["scales"] == [1.0, 2.0] and cfg["data"]["split"] == "2012"
    deeplab = ["model.name=deeplabv2", "model.pretrained=r101.pth", "data.normalize=imagenet"]
    assert load_config(None, deeplab + ["model.freeze_bn=true"])["model"]["freeze_bn"] is True
    assert load_config(None, deeplab + ["model.freeze_bn=auto"])["model"]["freeze_bn"] == "auto"


@pytest.mark.parametrize("item,match", [
    ("optim.lr=abc", r"optim\.lr takes a float, got 'abc'"),
    ("schedule.iters=1.5", r"schedule\.iters takes an integer, got 1\.5"),
    ("data.crop=big", r"data\.crop takes an integer or null, got 'big'"),
    ("optim.betas=x", r"optim\.betas takes a list of floats"),
    ("schedule.itres=5", r"unknown key 'itres' in schedule; the nearest known key is schedule\.iters"),
    ("optm.lr=1", r"unknown key 'optm'; the nearest known key is optim"),
    ("model=3", r"model is a section"),
    ("data.root=/d/${USER}/voc", r"data\.root: Interpolation key 'USER' not found"),
])
def test_bad_overrides_name_the_key(item, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [item])


def test_bad_file_keys_name_the_file_and_the_nearest_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_sise: 2\n")
    with pytest.raises(ConfigError, match=rf"{f}: unknown key 'batch_sise' in train; the nearest known key is "
                                          r"train\.batch_size"):
        load_config(f)


def test_cli_refuses_a_mistyped_value_in_one_line(capsys):
    assert train_main(["--config", "configs/weclip_voc.yaml", "--set", "optim.lr=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr takes a float, got 'abc'" in err[0]


def test_shipped_configs_load_and_keep_their_comments():
    for path in sorted(Path("configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg["optim"]["lr"], float) and isinstance(cfg["schedule"]["iters"], int)
        assert path.read_text().count("#") > 5, path


def test_resume_compares_typed_values():
    new = load_config(None, ["optim.lr=0.001"])
    assert resume_differences(load_config(None, ["optim.lr=1e-3"]), new) == []
    old = copy.deepcopy(new)
    old["optim"]["lr"] = "1e-3"   # how an older run stored --set optim.lr=1e-3
    assert resume_differences(old, new) == []
    assert resume_differences(load_config(None, ["optim.lr=2e-3"]), new) == ["optim.lr"]


@pytest.mark.parametrize("config,item,match", [
    ("configs/excel_voc.yaml", "model.encoder_blocks=5", r"model\.encoder_blocks: the excel model does not read it"),
    ("configs/weclip-online_voc.yaml", "online.tse=false", r"online\.tse: online method weclip does not read it"),
    ("configs/weclip-online_voc.yaml", "online.descriptions=d.json", r"online\.descriptions: online method weclip"),
    ("configs/weclip-online_voc.yaml", "online.attribute_bank=b.npz", r"online\.attribute_bank: online method weclip"),
    ("configs/weclip-online_voc.yaml", "online.segmentation_targets_from=5", r"online\.segmentation_targets_from: "),
    ("configs/weclip_voc.yaml", "online.switch_iter=5", r"online\.switch_iter: offline training"),
    ("configs/deeplab_voc.yaml", "model.clip=ViT-B-16.pt", r"model\.clip: the deeplabv2 model does not read it "
                                                           r"\(read by weclip, excel, weclip-plus\)"),
    ("configs/deeplab_voc.yaml", "train.aff_weight=0.1", r"train\.aff_weight: the deeplabv2 model"),
    ("configs/weclip_voc.yaml", "optim.momentum=0.5", r"optim\.momentum: optimiser adamw does not read it"),
    ("configs/excel_voc.yaml", "data.supervision=gt", r"data\.supervision=gt trains on ground-truth masks"),
    ("configs/weclip-online_voc.yaml", "online.refine=all", r"online\.refine must be one of"),
    (None, "model.name=weclip-pro", r"model\.name must be one of"),
])
def test_keys_the_run_does_not_read_are_refused(config, item, match):
    with pytest.raises(ConfigError, match=match):
        load_config(config, [item])


def test_a_set_key_is_refused_even_at_its_default_value():
    # online.tse defaults to true: setting it for WeCLIP still asks for something nothing does
    with pytest.raises(ConfigError, match=r"online\.tse"):
        load_config("configs/weclip-online_voc.yaml", ["online.tse=true"])


def test_the_loop_refuses_unread_keys_of_a_config_built_by_hand():
    cfg = load_config("configs/excel_voc.yaml")
    cfg["model"]["encoder_blocks"] = 4
    with pytest.raises(ConfigError, match=r"model\.encoder_blocks"):
        check_config(cfg)
    check_config(load_config("configs/excel_voc.yaml"))   # its own keys are all read


@pytest.mark.parametrize("item", ["online.static_layers=8", "online.filter_layers=7", "model.attention_layers=4"])
def test_excel_refuses_more_attention_maps_than_its_pass_records(item):
    with pytest.raises(ConfigError, match=r"exceed model\.attention_layers"):
        load_config("configs/excel_voc.yaml", [item])
    load_config("configs/excel_voc.yaml", [item, "online.refine=none"])   # no refinement, no attention maps


def test_every_model_and_method_declares_existing_keys():
    from pipeline.models import CONFIG_KEYS as MODEL_KEYS, MODELS
    from pipeline.train.online import CONFIG_KEYS as METHOD_KEYS, METHODS
    from pipeline.train.optim import CONFIG_KEYS as OPTIM_KEYS

    known = set(flatten(defaults()))
    for section, table, names in (("model", MODEL_KEYS, MODELS), ("online", METHOD_KEYS, METHODS),
                                  ("optim", OPTIM_KEYS, ("adamw", "sgd"))):
        assert set(names) <= set(table), section
        for keys in table.values():
            assert {k if "." in k else f"{section}.{k}" for k in keys} <= known, section


def test_weclip_voc_switch_is_the_references_first_second_phase_iteration():
    """WeCLIP's model counts every forward (training, and validation with batch 1 over the 1464 images of
    VOC train after every 2000th iteration) and makes second-phase labels once the count exceeds 15000;
    its COCO script never validates (switch at a count above 40000)."""
    def first_late(threshold, val_images, val_every, iters):
        count = 0
        for t in range(iters):
            count += 1                       # this iteration's training forward
            if count > threshold:
                return t
            if (t + 1) % val_every == 0:
                count += val_images
    from pipeline.train.online.weclip import WeCLIPConfig

    voc = first_late(15000, 1464, 2000, 30000)
    assert voc == 9144
    assert WeCLIPConfig().switch_iter == voc
    assert load_config("configs/weclip-online_voc.yaml")["online"]["switch_iter"] == voc
    assert load_config("configs/weclip-online_coco.yaml")["online"]["switch_iter"] == first_late(40000, 0, 10**9, 80000)
