"""Image loading/preprocessing and dataset label reading."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.classes import ClassList, builtin, palette
from pipeline.data.datasets import COCODataset, FolderDataset, SampleError, VOCDataset, read_labels_file
from pipeline.data.image import CLIP_MEAN, CLIP_STD, ImageError, load_image, preprocess, target_size
from conftest import textured_image, write_voc_xml


def test_target_size_rounds_up_to_multiples_of_16_and_caps_patches():
    assert target_size(375, 500) == (384, 512)
    assert target_size(10, 7) == (16, 16)
    h, w = target_size(6000, 9000, max_patches=4096)
    assert h % 16 == 0 and w % 16 == 0 and (h // 16) * (w // 16) <= 4096
    assert abs((w / h) - 1.5) < 0.05  # aspect kept when scaling down


def test_preprocess_is_pil_bicubic_then_clip_normalisation():
    arr = textured_image(37, 53, seed=0)
    x = preprocess(Image.fromarray(arr), (48, 64))
    want = np.asarray(Image.fromarray(arr).resize((64, 48), Image.BICUBIC), np.float32) / 255.0
    want = (want - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    assert x.shape == (3, 48, 64) and x.dtype == torch.float32
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), want, atol=1e-5)


def test_palette_image_resized_before_rgb_in_exact_mode():
    idx = (np.arange(40 * 40).reshape(40, 40) % 7).astype(np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette(palette().ravel().tolist())
    exact = preprocess(img, (32, 48), exact=True)
    fixed = preprocess(img, (32, 48), exact=False)
    # nearest resampling (reference) keeps only palette colours; RGB-first bicubic blends them
    want = np.asarray(img.resize((48, 32), Image.BICUBIC).convert("RGB"), np.float32) / 255
    got = exact.permute(1, 2, 0).numpy() * np.array(CLIP_STD, np.float32) + np.array(CLIP_MEAN, np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not torch.allclose(exact, fixed)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "LA", "I;16", "1"])
def test_odd_modes_load_and_preprocess(tmp_path, mode):
    arr = textured_image(30, 40, seed=1)
    if mode == "I;16":
        img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
        path = tmp_path / "x16.png"
    else:
        img = Image.fromarray(arr).convert(mode)
        path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    img.save(path)
    loaded = load_image(path)
    x = preprocess(loaded, (32, 48))
    assert x.shape == (3, 32, 48) and torch.isfinite(x).all()
    if mode == "I;16":  # 16-bit scaled to 8-bit, not clipped to white
        assert loaded.mode == "L"
        np.testing.assert_allclose(np.asarray(loaded, np.int32), arr[..., 0], atol=1)


def test_exif_orientation_is_opt_in(tmp_path):
    img = Image.fromarray(textured_image(20, 40, seed=2))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (40, 20)
    assert load_image(tmp_path / "r.jpg", exif_transpose=True).size == (20, 40)


def test_corrupt_truncated_and_missing_images_raise_naming_the_file(tmp_path):
    Image.fromarray(textured_image(64, 64, seed=3)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    for name in ("cut.jpg", "junk.jpg", "absent.jpg"):
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)


def test_voc_labels_first_appearance_order_and_errors(tmp_path):
    root = tmp_path / "VOC"
    write_voc_xml(root / "Annotations" / "a.xml", ["person", "chair", "person", "dog"], (10, 10))
    write_voc_xml(root / "Annotations" / "b.xml", ["person", "unicorn"], (10, 10))
    write_voc_xml(root / "Annotations" / "c.xml", [], (10, 10))
    (root / "Annotations" / "d.xml").write_text("<annotation><object>")
    ds = VOCDataset(root)
    assert ds.labels("a") == [14, 8, 11]
    with pytest.raises(SampleError, match=r"b\.xml.*unicorn"):
        ds.labels("b")
    with pytest.raises(SampleError, match="no foreground labels"):
        ds.labels("c")
    with pytest.raises(SampleError, match=r"d\.xml: malformed"):
        ds.labels("d")
    with pytest.raises(SampleError, match=r"e\.xml: annotation not found"):
        ds.labels("e")


def test_shipped_voc_splits():
    ds = VOCDataset.__new__(VOCDataset)
    ds.name = "voc"
    counts = {s: len(VOCDataset.ids(ds, s)) for s in ("train", "train_aug", "val")}
    assert counts == {"train": 1464, "train_aug": 10582, "val": 1449}


def test_labels_file_formats(tmp_path):
    voc = builtin("voc")
    (tmp_path / "l.txt").write_text("img1 14 8 14\nimg2 0\n")
    (tmp_path / "l.json").write_text(json.dumps({"img1": ["person", "chair"], "img2": "aeroplane"}))
    (tmp_path / "l.csv").write_text("id,labels\nimg1,person;chair\nimg2,aeroplane\n")
    for name in ("l.txt", "l.json", "l.csv"):
        assert read_labels_file(tmp_path / name, voc) == {"img1": [14, 8], "img2": [0]}
    (tmp_path / "bad.csv").write_text("img1,person;griffin\n")
    with pytest.raises(SampleError, match="griffin"):
        read_labels_file(tmp_path / "bad.csv", voc)


def test_coco_labels_from_masks_ascending(tmp_path):
    root = tmp_path / "coco"
    (root / "SegmentationClass" / "train2014").mkdir(parents=True)
    mask = np.zeros((8, 8), np.uint8)
    mask[:2] = 17
    mask[4:] = 1
    mask[0, 0] = 255
    Image.fromarray(mask, "L").save(root / "SegmentationClass" / "train2014" / "COCO_train2014_000000000009.png")
    assert COCODataset(root).labels("COCO_train2014_000000000009") == [0, 16]


def test_folder_dataset_with_custom_vocabulary(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.fromarray(textured_image(20, 20, 0)).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(textured_image(20, 20, 1)).save(tmp_path / "imgs" / "sub" / "b.jpeg")
    (tmp_path / "classes.yaml").write_text("template: a photo of a {}.\nclasses:\n  - widget\n"
                                           "  - {name: gadget, prompt: 'gadget,gizmo'}\nbackground: [table]\n")
    (tmp_path / "labels.json").write_text(json.dumps({"a": ["gadget"], "b": ["widget", "gadget"]}))
    classes = ClassList.from_yaml(tmp_path / "classes.yaml")
    ds = FolderDataset(tmp_path / "imgs", classes, tmp_path / "labels.json")
    assert ds.ids("all") == ["a", "b"]
    assert ds.labels("b") == [0, 1] and ds.image_path("b").name == "b.jpeg"
    assert classes.synonyms(1) == ["gadget", "gizmo"]


# ------------------------------------------------------------------ exact ids (issue 22 item 3)
def test_split_lines_keep_dots_and_spaces_and_read_the_known_two_column_layouts(tmp_path):
    from pipeline.data.datasets import read_id_list

    (tmp_path / "s.txt").write_text("photo.2021\nmy cat\n  v1.2.final  \n# a comment\n\nx.jpg\nmy dog.JPG\n"
                                    "JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png\n"
                                    "/JPEGImages/2007_000033.jpg /SegmentationClassAug/2007_000033.png\n"
                                    "COCO_train2014_000000000009 0 16\n")
    assert read_id_list(tmp_path / "s.txt") == ["photo.2021", "my cat", "v1.2.final", "x", "my dog", "2007_000032",
                                                "2007_000033", "COCO_train2014_000000000009"]


def test_ids_with_dots_and_spaces_find_their_own_images(tmp_path, tiny_clip_path):
    from pipeline.cams.stage import CamsConfig, run_cams
    from pipeline.data.datasets import build_dataset

    root = tmp_path / "imgs"
    root.mkdir()
    for i, name in enumerate(["photo.2021", "photo", "my cat", "my"]):
        Image.fromarray(textured_image(32, 48, i)).save(root / f"{name}.jpg")
    labels = {"photo.2021": ["dog"], "photo": ["cat"], "my cat": ["bird"], "my": ["person"]}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "split.txt").write_text("photo.2021\nmy cat\n")
    ds = build_dataset("folder", root, "data/voc.yaml", tmp_path / "labels.json")
    assert ds.ids(str(tmp_path / "split.txt")) == ["photo.2021", "my cat"]
    assert ds.image_path("photo.2021").name == "photo.2021.jpg" and ds.image_path("my cat").name == "my cat.jpg"
    s = run_cams(CamsConfig(dataset="folder", root=str(root), split=str(tmp_path / "split.txt"), clip=str(tiny_clip_path),
                            out=str(tmp_path / "cams"), classes="data/voc.yaml", labels=str(tmp_path / "labels.json"),
                            workers=0, progress=False))
    assert (s.written, s.failed) == (2, 0)
    voc = builtin("voc")
    for image_id in ("photo.2021", "my cat"):
        z = np.load(tmp_path / "cams" / f"{image_id}.npz")
        assert z["keys"].tolist() == [voc.index(labels[image_id][0])]


def test_duplicate_ids_are_reported_once_and_used_once(tmp_path, capsys):
    root = tmp_path / "VOC"
    (root / "JPEGImages").mkdir(parents=True)
    (tmp_path / "s.txt").write_text("a\nb\na\nc\na\nb\n")
    assert VOCDataset(root).ids(str(tmp_path / "s.txt")) == ["a", "b", "c"]
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "3 duplicate line(s) for 2 id(s) (a, b)" in err and "s.txt" in err


def test_an_id_listed_twice_with_other_labels_fails_that_image(tmp_path):
    voc = builtin("voc")
    (tmp_path / "l.csv").write_text("a,cat\nb,dog\na,dog\nb,dog\n")
    (tmp_path / "l.json").write_text('{"a": ["cat"], "b": ["dog"], "a": ["dog"]}')
    for name in ("l.csv", "l.json"):
        errors: dict[str, str] = {}
        assert read_labels_file(tmp_path / name, voc, errors) == {"b": [11]}
        assert "listed more than once with different labels (cat / dog)" in errors["a"]


@pytest.mark.parametrize("dataset,make,needs,missing", [
    ("voc", ["JPEGImages"], ("images", "labels"), "Annotations/"),
    ("voc", ["Annotations"], ("images",), "JPEGImages/"),
    ("voc", ["JPEGImages", "Annotations"], ("masks",), "SegmentationClassAug/ or SegmentationClass/"),
    ("coco", ["JPEGImages"], ("images", "labels"), "labels file"),
    ("coco", [], ("images",), "JPEGImages/, train2014/ or val2014/"),
])
def test_a_root_of_another_layout_is_refused_naming_what_is_missing(tmp_path, dataset, make, needs, missing):
    from pipeline.data.datasets import build_dataset

    for d in make:
        (tmp_path / d).mkdir()
    with pytest.raises(ValueError, match="dataset root has no ") as e:
        build_dataset(dataset, tmp_path, needs=needs)
    assert str(e.value).startswith(f"{tmp_path}: ") and missing in str(e.value)
    build_dataset(dataset, tmp_path)  # nothing needed: nothing refused


def test_cams_refuse_a_root_without_annotations_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from stages import cams

    root = tmp_path / "VOC"
    (root / "JPEGImages").mkdir(parents=True)
    Image.fromarray(textured_image(32, 32, 0)).save(root / "JPEGImages" / "a.jpg")
    (tmp_path / "s.txt").write_text("a\n")
    monkeypatch.setattr("pipeline.cams.stage.load_clip", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = cams.main(["--dataset", "voc", "--root", str(root), "--split", str(tmp_path / "s.txt"),
                    "--clip", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "cams")])
    err = capsys.readouterr().err
    assert rc == 2 and "has no Annotations/" in err and "--labels" in err
    assert not (tmp_path / "cams").exists()
