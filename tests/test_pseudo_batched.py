"""The pseudo-label stage with the torch CRF as it runs on a GPU (here on the CPU, asked for by a batch
size): threads read and write while one device labels batches of images of mixed sizes and label counts.
Its labels equal ``pseudo_label`` image by image, with every confidence rule, guide and the resolution cap;
per-image errors are the worker path's; ``cams-pseudo`` streams through it; and a failed write (a full
disk) stops the run, naming the image, on both paths."""
import errno
import json
import shutil

import numpy as np
import pytest

from pipeline.data import synthetic
from pipeline.data.camfile import load_cams, save_cams
from pipeline.data.datasets import build_dataset
from pipeline.data.image import load_rgb
from pipeline.data.labelio import read_label
from pipeline.labels import crf
from pipeline.labels.pseudo import PseudoConfig, StreamingLabeller, pseudo_label, run_pseudo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Nine scenes of two sizes with 1-4 labels, and their CAM files."""
    root = tmp_path_factory.mktemp("mixed")
    ids = (synthetic.make_scenes(root, 5, (48, 64), seed=3, prefix="a", split="a", max_objects=4)
           + synthetic.make_scenes(root, 4, (40, 52), seed=4, prefix="b", split="b"))
    synthetic.make_noisy_cams(root, root / "cams", ids=ids, seed=3)
    (root / "all.txt").write_text("".join(f"{i}\n" for i in ids))
    return root, ids


@pytest.fixture
def scenes(mixed, tmp_path):
    """A private copy (tests that break inputs must not affect others)."""
    root = tmp_path / "voc"
    shutil.copytree(mixed[0], root)
    return root, list(mixed[1])


def expected(root, image_id, cfg):
    d = load_cams(root / "cams" / f"{image_id}.npz")
    return pseudo_label(load_rgb(root / "JPEGImages" / f"{image_id}.jpg"), d["keys"], d["cams"], cfg)


CONFIGS = [PseudoConfig(backend="torch"),
           PseudoConfig(backend="torch", confidence="raw", conf=0.9, power=2.0, guide="rgb", max_pixels=2500),
           PseudoConfig(backend="torch", confidence="none", guide="plain", crf=crf.CRFParams(iters=3, bi_w=5))]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["clipes", "raw-rgb-capped", "none-plain"])
def test_batched_labels_equal_pseudo_label_image_by_image(mixed, tmp_path, cfg):
    root, ids = mixed
    counts = {len(load_cams(root / "cams" / f"{i}.npz")["keys"]) for i in ids}
    assert len(counts) > 1  # batches group images by label count: several groups, two sizes
    res = run_pseudo(build_dataset("voc", root), ids, root / "cams", tmp_path / "out", cfg, n_jobs=2,
                     progress=False, batch=3)
    assert res["failed"] == 0 and res["done"] == len(ids)
    for i in ids:
        assert np.array_equal(read_label(tmp_path / "out" / f"{i}.png"), expected(root, i, cfg)), i


def test_per_image_errors_are_the_worker_paths(scenes, tmp_path):
    root, ids = scenes
    (root / "cams" / f"{ids[1]}.npz").unlink()
    d = load_cams(root / "cams" / f"{ids[2]}.npz")
    save_cams(root / "cams" / f"{ids[2]}.npz", d["keys"], d["cams"] * 3, (48, 64))  # CAMs > 1: negative background
    (root / "SegmentationClass" / f"{ids[6]}.png").unlink()
    ds = build_dataset("voc", root)
    out = tmp_path / "torch"
    out.mkdir()
    (out / f"{ids[1]}.png").write_bytes(b"a label from an older run")
    batched = run_pseudo(ds, ids, root / "cams", out, PseudoConfig(backend="torch"), n_jobs=2, progress=False,
                         overwrite=True, batch=4)
    workers = run_pseudo(ds, ids, root / "cams", tmp_path / "dcrf", PseudoConfig(backend="pydensecrf"), n_jobs=1,
                         progress=False)
    assert batched["errors"] == workers["errors"] and sorted(batched["errors"]) == sorted([ids[1], ids[2], ids[6]])
    assert ">= 0" in batched["errors"][ids[2]] and not (out / f"{ids[1]}.png").exists()
    assert json.loads((out / "manifest.json").read_text())["summary"]["failed"] == 3


def test_cams_pseudo_streams_through_the_batched_crf(mixed, tmp_path):
    root, ids = mixed
    cfg = PseudoConfig(backend="torch")
    labeller = StreamingLabeller(build_dataset("voc", root), tmp_path / "s", cfg, cams_config=None, n_jobs=2, batch=4)
    assert labeller.pool is None
    for i in ids:
        d = load_cams(root / "cams" / f"{i}.npz")
        labeller.submit(i, d["keys"], d["cams"])
    assert labeller.close() == {} and labeller.done_count == len(ids)
    assert all(np.array_equal(read_label(tmp_path / "s" / f"{i}.png"), expected(root, i, cfg)) for i in ids)


def full_disk_at_the_second_write(monkeypatch) -> list[str]:
    """Make the stage's label writer fail as ``io.atomic_open`` reports a full disk, from its second call on."""
    from pipeline.labels import pseudo

    real, tried = pseudo.write_label, []

    def write(path, label, fmt="palette"):
        tried.append(str(path))
        if len(tried) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, label, fmt)

    monkeypatch.setattr("pipeline.labels.pseudo.write_label", write)
    return tried


def test_a_failed_write_stops_the_run_and_names_the_image(scenes, monkeypatch, capsys):
    from stages.pseudo import main

    root, ids = scenes
    tried = full_disk_at_the_second_write(monkeypatch)
    out = root / "pseudo"
    assert main(["--dataset", "voc", "--root", str(root), "--split", str(root / "all.txt"), "--cams",
                 str(root / "cams"), "--out", str(out), "-j", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(tried) == 2 and f"{tried[1]}: no space left on device; free some space" in err
    assert [p.name for p in out.glob("*.png")] == [tried[0].rsplit("/", 1)[1]]


def test_a_failed_write_stops_the_batched_run_too(scenes, monkeypatch):
    root, ids = scenes
    tried = full_disk_at_the_second_write(monkeypatch)
    with pytest.raises(OSError) as e:
        run_pseudo(build_dataset("voc", root), ids, root / "cams", root / "pseudo", PseudoConfig(backend="torch"),
                   n_jobs=1, progress=False, batch=2)
    assert e.value.errno == errno.ENOSPC and e.value.filename == tried[1] and len(tried) == 2
