"""Training config: typed values from YAML files and --set overrides, refusals naming the key (its type,
the nearest known key), resume comparing typed values."""

import copy
from pathlib import Path

import pytest

from pipeline.train.config import ConfigError, load_config, resume_differences
from stages.train import main as train_main


def test_exponent_floats_are_floats_in_overrides_and_files(tmp_path):
    assert load_config(None, ["optim.lr=1e-3"])["optim"]["lr"] == 0.001
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1e-3   # YAML 1.1 reads this as a string\n  eps: 1e-8\n")
    cfg = load_config(f)
    assert cfg["optim"]["lr"] == 0.001 and cfg["optim"]["eps"] == 1e-8
    assert isinstance(cfg["optim"]["lr"], float)


def test_values_take_their_keys_types():
    cfg = load_config(None, ["schedule.iters=7", "data.scales=[1, 2]", "model.encoder_blocks=11",
                             "data.split=2012", "model.freeze_bn=true"])
    assert cfg["schedule"]["iters"] == 7 and cfg["data"]["scales"] == [1.0, 2.0]
    assert cfg["data"]["split"] == "2012" and cfg["model"]["freeze_bn"] is True
    assert load_config(None, ["model.freeze_bn=auto"])["model"]["freeze_bn"] == "auto"


@pytest.mark.parametrize("item,match", [
    ("optim.lr=abc", r"optim\.lr takes a float, got 'abc'"),
    ("schedule.iters=1.5", r"schedule\.iters takes an integer, got 1\.5"),
    ("data.crop=big", r"data\.crop takes an integer or null, got 'big'"),
    ("optim.betas=x", r"optim\.betas takes a list of floats"),
    ("schedule.itres=5", r"unknown key 'itres' in schedule; the nearest known key is schedule\.iters"),
    ("optm.lr=1", r"unknown key 'optm'; the nearest known key is optim"),
    ("model=3", r"model is a section"),
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
