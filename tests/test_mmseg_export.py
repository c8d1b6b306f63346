"""mmseg export: the written dataset/training configs parse with mmengine.Config (pure Python, installed
without mmcv), name only paths that exist, and carry classes, palette, reduce_zero_label=False, ignore 255."""
import shutil
from pathlib import Path

import pytest

from pipeline.classes import palette
from pipeline.data.datasets import build_dataset
from pipeline.eval.mmseg_export import ExportError, export
from seg_helpers import NAMES, make_data


def parse(path: Path) -> dict:
    """mmengine.Config when installed; otherwise execute the (plain Python, base-free) dataset file."""
    try:
        from mmengine.config import Config
    except ImportError:  # fallback: the dataset config is self-contained Python
        ns: dict = {}
        exec(compile(path.read_text(), str(path), "exec"), ns)
        return {k: v for k, v in ns.items() if not k.startswith("__")}
    return Config.fromfile(str(path)).to_dict()


def check_dataset(ds_cfg: dict, n_ids: int, seg_suffix: str = ".png"):
    assert ds_cfg["type"] == "BaseSegDataset" and ds_cfg["reduce_zero_label"] is False and ds_cfg["ignore_index"] == 255
    assert ds_cfg["metainfo"]["classes"] == ("background", *NAMES)
    assert [list(c) for c in ds_cfg["metainfo"]["palette"]] == palette()[:5].tolist()
    ann = Path(ds_cfg["ann_file"])
    for p in (ds_cfg["data_root"], ann, ds_cfg["data_prefix"]["img_path"], ds_cfg["data_prefix"]["seg_map_path"]):
        assert Path(p).is_absolute() and Path(p).exists(), p
    ids = ann.read_text().split()
    assert len(ids) == n_ids
    for i in ids:  # mmseg reads <img_path>/<id><img_suffix> and <seg_map_path>/<id><seg_map_suffix>
        assert (Path(ds_cfg["data_prefix"]["img_path"]) / f"{i}{ds_cfg['img_suffix']}").is_file()
        assert (Path(ds_cfg["data_prefix"]["seg_map_path"]) / f"{i}{ds_cfg['seg_map_suffix']}").is_file()
    assert ds_cfg["seg_map_suffix"] == seg_suffix


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("mmseg"), 5, 2, size=(64, 80), seed=2)


def test_export_parses_with_mmengine_and_names_existing_paths(data, tmp_path):
    ds = build_dataset("voc", data["root"], data["classes"])
    model_cfg = tmp_path / "deeplabv3plus_r50.py"  # the shape of an mmseg model config
    model_cfg.write_text("norm_cfg = dict(type='SyncBN', requires_grad=True)\n"
                         "model = dict(type='EncoderDecoder', data_preprocessor=dict(type='SegDataPreProcessor'),\n"
                         "    decode_head=dict(type='DepthwiseSeparableASPPHead', num_classes=19, norm_cfg=norm_cfg))\n")
    out = tmp_path / "export"
    written = export(ds, data["train_ids"], data["val_ids"], data["pseudo"], out, crop=320, model_config=model_cfg)
    cfg = parse(written["dataset_config"])
    check_dataset(cfg["train_dataloader"]["dataset"], 5)
    check_dataset(cfg["val_dataloader"]["dataset"], 2)
    assert cfg["train_dataloader"]["dataset"]["data_prefix"]["seg_map_path"] == str(data["pseudo"].resolve())
    assert cfg["crop_size"] == (320, 320) and cfg["val_evaluator"]["type"] == "IoUMetric"
    assert {"LoadAnnotations", "RandomCrop", "PackSegInputs"} <= {s["type"] for s in cfg["train_pipeline"]}
    train_cfg = parse(written["train_config"])
    head = train_cfg["model"]["decode_head"]
    assert head["type"] == "DepthwiseSeparableASPPHead" and head["num_classes"] == 5 and head["ignore_index"] == 255
    assert train_cfg["model"]["data_preprocessor"]["size"] == (320, 320)
    check_dataset(train_cfg["train_dataloader"]["dataset"], 5)


def test_scattered_images_are_linked_and_missing_labels_named(data, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(data["root"], root)
    ds = build_dataset("voc", root, root / "classes.yaml")
    moved = ds.image_path(data["train_ids"][0])
    elsewhere = tmp_path / "elsewhere" / moved.name
    elsewhere.parent.mkdir()
    shutil.move(moved, elsewhere)
    ds.image_path = lambda i, base=ds.image_path: elsewhere if i == data["train_ids"][0] else base(i)
    written = export(ds, data["train_ids"], [], root / "pseudo", tmp_path / "out")
    train = parse(written["dataset_config"])["train_dataloader"]["dataset"]
    assert train["data_prefix"]["img_path"] == str(tmp_path / "out" / "images")
    check_dataset(train, 5)
    assert "train_config" not in written  # no model config given: the dataset config is the product
    (root / "pseudo" / f"{data['train_ids'][2]}.png").unlink()
    with pytest.raises(ExportError, match=f"{data['train_ids'][2]}.png"):
        export(ds, data["train_ids"], [], root / "pseudo", tmp_path / "out2")
