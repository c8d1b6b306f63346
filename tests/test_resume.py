"""Resume: typed config values, inputs compared by content (the CLIP file, the pseudo-label folder), and a
run killed between a checkpoint and its pointer."""

import pytest

from pipeline import checkpoint as ckpt_io
from pipeline.train.config import load_config
from pipeline.train.loop import train
from seg_helpers import make_data, overrides

QUIET = {"progress": False, "tensorboard": False, "log": lambda *_: None}
TINY_DEEPLAB = {"model.name": "deeplabv2", "model.layers": "[1,1,1,1]", "model.base_width": 8, "data.crop": 32,
                "train.batch_size": 2, "schedule.iters": 4, "schedule.warmup_iters": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("resume"), 4, 0, size=(48, 64), seed=2)


def deeplab(data, **extra):
    return load_config(None, overrides(data, **{**TINY_DEEPLAB, **extra}))


def test_resume_with_the_same_lr_written_another_way(data, tmp_path):
    train(deeplab(data, **{"optim.lr": "1e-3"}), tmp_path, stop_at=1, **QUIET)
    res = train(deeplab(data, **{"optim.lr": "0.001"}), tmp_path, resume=True, **QUIET)
    assert res["iteration"] == 4 and ckpt_io.load(tmp_path)["meta"]["config"]["optim"]["lr"] == 0.001
