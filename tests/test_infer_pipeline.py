"""make predict / make eval WHAT=model as a pipeline: images decoded ahead in reader threads, outputs written
in writer threads, the CRF kept on the device; results equal to the one-image-at-a-time path, restated here."""
from __future__ import annotations

import errno
import io
import os
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.classes import palette
from pipeline.data.datasets import build_dataset
from pipeline.eval import infer
from pipeline.eval.infer import InferConfig, crf_labels_on_device, device_crf, msc_logits, predict_split
from pipeline.labels.crf import crf_scores, guide_image
from pipeline.models import build_model
from seg_helpers import make_data

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)   # ImageNet on the 0-255 scale


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = make_data(tmp_path_factory.mktemp("pipe"), 0, 6, size=(72, 100), seed=5)
    return d, build_dataset("voc", d["root"], d["classes"])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model({"name": "deeplabv2", "layers": [1, 1, 1, 1], "base_width": 8}, 5, log=lambda *_: None).eval()


def reference_label(model, path, cfg: InferConfig) -> np.ndarray:
    """Today's sequential prediction of one image, written out by hand: (x - mean) / std, per scale the
    logits of the image and of its mirror averaged, resized to the image, averaged over scales; softmax and
    CRF (host marginals, first maximum) when on, else the argmax."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()
    x = ((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))[None]
    H, W = rgb.shape[:2]
    total = 0
    with torch.no_grad():
        for s in cfg.scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            logits = model(xs).float()
            if cfg.flip:
                logits = (logits + model(xs.flip(-1)).float().flip(-1)) / 2
            total = total + F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        logits = (total / len(cfg.scales))[0]
    if not cfg.crf:
        return logits.argmax(0).byte().numpy()
    params, kind = cfg.crf_setup()
    q = crf_scores(rgb, torch.softmax(logits, 0).numpy().astype(np.float32), params, guide=kind, backend="torch",
                   device="cpu", max_pixels=None)
    return np.argmax(q, axis=0).astype(np.uint8)


def palette_png(label: np.ndarray) -> bytes:
    im = Image.fromarray(label)
    im.putpalette(palette().reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


CASES = {"msc+flip": InferConfig(scales=(1.0, 0.75), flip=True),
         "crf": InferConfig(scales=(1.0,), flip=False, crf=True, crf_backend="torch", crf_preset="deeplab")}


@pytest.mark.parametrize("case", list(CASES))
def test_pngs_and_scores_equal_the_sequential_path_with_a_bad_image_in_the_middle(data, model, case, tmp_path):
    from pipeline.eval.metrics import confusion_matrix

    d, ds = data
    ids = list(d["val_ids"])
    bad = ds.image_path(ids[2])
    good = bad.read_bytes()
    bad.write_bytes(b"not a jpeg")
    try:
        res = predict_split(model, ds, ids, tmp_path / "p", CASES[case], torch.device("cpu"), gt=True, progress=False,
                            overlay_dir=tmp_path / "o", readers=3, writers=2)
        with pytest.raises(OSError) as decode_error:
            Image.open(bad)
    finally:
        bad.write_bytes(good)
    assert res["errors"] == {ids[2]: f"{bad}: cannot decode image ({decode_error.value}); re-download or re-encode "
                                     f"the file"}
    assert (res["total"], res["done"], res["failed"]) == (6, 5, 1)
    conf = np.zeros((5, 5), np.int64)
    for i in ids[:2] + ids[3:]:
        want = reference_label(model, ds.image_path(i), CASES[case])
        assert (tmp_path / "p" / f"{i}.png").read_bytes() == palette_png(want), i
        with Image.open(ds.mask_path(i)) as m:
            conf += confusion_matrix(want, np.asarray(m), 5)
        assert (tmp_path / "o" / f"{i}.jpg").is_file()
    assert not (tmp_path / "p" / f"{ids[2]}.png").exists() and not (tmp_path / "o" / f"{ids[2]}.jpg").exists()
    assert np.array_equal(res["conf"], conf)


def test_resume_keeps_existing_pngs_unless_overwrite(data, model, tmp_path):
    d, ds = data
    ids = d["val_ids"][:3]
    cfg = InferConfig(scales=(1.0,), flip=False)
    (tmp_path / "p").mkdir()
    kept = tmp_path / "p" / f"{ids[1]}.png"
    kept.write_bytes(b"earlier")
    predict_split(model, ds, ids, tmp_path / "p", cfg, torch.device("cpu"), overwrite=False, progress=False)
    assert kept.read_bytes() == b"earlier" and (tmp_path / "p" / f"{ids[0]}.png").is_file()
    predict_split(model, ds, ids, tmp_path / "p", cfg, torch.device("cpu"), overwrite=True, progress=False)
    assert kept.read_bytes() == palette_png(reference_label(model, ds.image_path(ids[1]), cfg))


def test_images_are_decoded_while_the_model_runs_and_written_while_the_next_computes(data, model, tmp_path,
                                                                                      monkeypatch):
    """The first forward waits until a reader thread has decoded the second image, and the first label's
    write waits until the second image has been predicted: a loop that decodes or writes on the device's
    thread would wait for itself (and fail after the timeout). The confusion is summed off that thread too."""
    d, ds = data
    ids = d["val_ids"][:4]
    cfg = InferConfig(scales=(1.0,), flip=False)
    want = predict_split(model, ds, ids, tmp_path / "plain", cfg, torch.device("cpu"), gt=True, progress=False)
    decoded, second_decoded, second_predicted, predicted = [], threading.Event(), threading.Event(), []
    load_rgb, write_label, predict_image = infer.load_rgb, infer.write_label, infer.predict_image

    def reading(path, *a):
        image = load_rgb(path, *a)
        decoded.append(threading.current_thread() is threading.main_thread())
        if len(decoded) == 2:
            second_decoded.set()
        return image

    def predicting(*a, **k):
        if not predicted and not second_decoded.wait(timeout=20):
            raise AssertionError("the second image was not decoded while the first one was computed")
        predicted.append(1)
        if len(predicted) == 2:
            second_predicted.set()
        return predict_image(*a, **k)

    def held(path, *a):
        if not second_predicted.wait(timeout=20):
            raise AssertionError("the second image waited for the first file's write")
        assert threading.current_thread() is not threading.main_thread()
        write_label(path, *a)

    from pipeline.eval import metrics

    counted, confusion = [], metrics.confusion_matrix

    def counting(*a):
        counted.append(threading.current_thread() is threading.main_thread())
        return confusion(*a)

    monkeypatch.setattr(infer, "load_rgb", reading)
    monkeypatch.setattr(infer, "predict_image", predicting)
    monkeypatch.setattr(infer, "write_label", held)
    monkeypatch.setattr(metrics, "confusion_matrix", counting)
    res = predict_split(model, ds, ids, tmp_path / "p", cfg, torch.device("cpu"), gt=True, progress=False)
    assert res["done"] == 4 and len(decoded) == 4 and not any(decoded) and counted == [False] * 4
    assert np.array_equal(res["conf"], want["conf"])
    assert all((tmp_path / "p" / f"{i}.png").read_bytes() == (tmp_path / "plain" / f"{i}.png").read_bytes() for i in ids)
    assert want["done"] == 4


def test_disk_full_stops_the_run_with_one_message(data, model, tmp_path, capsys, monkeypatch):
    """The first failed write ends the run (rc 2, the file and the fix named) instead of predicting every
    remaining image into a full disk; no temp file is left."""
    from pipeline import checkpoint as ckpt_io
    from stages import predict

    d, ds = data
    meta = {"model": {"name": "deeplabv2", "layers": [1, 1, 1, 1], "base_width": 8}, "num_classes": 5,
            "class_names": ["background", *ds.classes.names], "infer": {"scales": [1.0], "flip": False}}
    ckpt_io.save(tmp_path / "m.pt", {"meta": meta, "model": model.state_dict(), "iteration": 1})
    calls = []
    real = infer.predict_image
    monkeypatch.setattr(infer, "predict_image", lambda *a, **k: calls.append(1) or real(*a, **k))

    fsync = os.fsync

    def full(fd):   # the disk fills up once predictions are written (the manifest went in before)
        if not calls:
            return fsync(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "pred"
    rc = predict.main(["--dataset", "voc", "--root", str(d["root"]), "--classes", str(d["classes"]), "--split",
                       str(d["val"]), "--checkpoint", str(tmp_path / "m.pt"), "--out", str(out), "--no-progress",
                       "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {out}" in err and ": no space left on device; free some space" in err, err
    assert ".png: no space left" in err or ".jpg: no space left" in err, err     # the output file is named
    assert len(calls) < len(d["val_ids"])
    assert not list(out.rglob("*.tmp"))


def test_device_crf_equals_the_host_path_and_follows_its_inputs(data, model, strict_device):
    """The device CRF (softmax, unary, mean field, argmax on the logits' device, images in one batch) gives
    the host path's labels here; its unary uses torch's float32 log, which may differ from numpy's in the last
    bit, so a label may differ at an exact tie. It makes nothing off its inputs' device."""
    d, ds = data
    cfg = CASES["crf"]
    params, kind = cfg.crf_setup()
    unaries, guides, want = [], [], []
    for i in d["val_ids"][:3]:
        with Image.open(ds.image_path(i)) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)[: 60 + 5 * len(want)]    # sizes differ
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()
        x = ((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))[None]
        logits = msc_logits(model, x, cfg)[0]
        probs = torch.softmax(logits, 0).numpy()
        want.append(np.argmax(crf_scores(rgb, probs, params, guide=kind, backend="torch", max_pixels=None), 0))
        with strict_device():
            unary, finite = infer.device_unary(logits)
        assert bool(finite) and unary.device.type == "cpu"
        unaries.append(unary)
        guides.append(torch.from_numpy(guide_image(rgb, kind)))
    with strict_device():
        labels = crf_labels_on_device(unaries, guides, params)
    assert all(lab.device.type == "cpu" and lab.dtype == torch.uint8 for lab in labels)
    assert all(np.array_equal(lab.numpy(), w) for lab, w in zip(labels, want))
    # the device path is taken for the torch CRF on an accelerator, for images within the pixel cap only
    assert not device_crf(cfg, torch.device("cpu"), (72, 100))
    assert device_crf(cfg, torch.device("cuda"), (72, 100))
    assert not device_crf(InferConfig(crf=True, crf_backend="pydensecrf"), torch.device("cuda"), (72, 100))
    assert not device_crf(InferConfig(crf=True, crf_backend="torch", crf_max_pixels=1000), torch.device("cuda"), (72, 100))


def test_device_crf_batches_images_and_records_a_broken_one(data, model, tmp_path, monkeypatch):
    """predict_split with the CRF on the device (forced here on the CPU): images go through the CRF
    ``crf_batch`` at a time with the host path's PNGs; an image whose probabilities are not finite is
    recorded with the host path's message and the others complete."""
    d, ds = data
    ids = list(d["val_ids"])
    cfg = CASES["crf"]
    host = predict_split(model, ds, ids, tmp_path / "host", cfg, torch.device("cpu"), gt=True, progress=False)
    batches, unary = [], infer.device_unary
    crf_labels = infer.crf_labels_on_device
    monkeypatch.setattr(infer, "device_crf", lambda *a: True)
    monkeypatch.setattr(infer, "crf_labels_on_device", lambda u, *a: batches.append(len(u)) or crf_labels(u, *a))
    res = predict_split(model, ds, ids, tmp_path / "dev", cfg, torch.device("cpu"), gt=True, progress=False,
                        crf_batch=4)
    assert batches == [4, 2] and res["errors"] == {} and np.array_equal(res["conf"], host["conf"])
    assert all((tmp_path / "dev" / f"{i}.png").read_bytes() == (tmp_path / "host" / f"{i}.png").read_bytes() for i in ids)
    calls = []

    def broken_second(logits):
        calls.append(1)
        u, finite = unary(logits)
        return u, finite & (len(calls) != 2)

    monkeypatch.setattr(infer, "device_unary", broken_second)
    res = predict_split(model, ds, ids, tmp_path / "nan", cfg, torch.device("cpu"), gt=True, progress=False,
                        crf_batch=4)
    assert res["errors"] == {ids[1]: "probabilities contain NaN or Inf: the CAMs or model outputs are broken"}
    assert res["done"] == 5 and not (tmp_path / "nan" / f"{ids[1]}.png").exists()
    assert all((tmp_path / "nan" / f"{i}.png").read_bytes() == (tmp_path / "host" / f"{i}.png").read_bytes()
               for i in ids if i != ids[1])


@pytest.mark.parametrize("name", ["weclip", "excel", "deeplabv2"])
def test_mirror_in_one_batch_equals_two_forwards_up_to_rounding(name):
    """``batch_mirror`` (image and mirror as a batch of 2) against two forwards of batch 1, at VOC size with
    random tiny models: equal to float rounding (measured: at most 2.4e-7 on logits near 1, labels equal),
    not bit for bit, which is why it is off on the CPU (on by default on an accelerator)."""
    from pipeline.clip.random import TINY, random_clip

    torch.manual_seed(0)
    kwargs = {"clip": random_clip(TINY, seed=0)} if name != "deeplabv2" else {"log": lambda *_: None}
    spec = {"name": name} if name != "deeplabv2" else {"name": name, "layers": [1, 1, 1, 1], "base_width": 8}
    net = build_model(spec, 21, **kwargs).eval()
    cfg = InferConfig(scales=(1.0, 0.75)) if name != "excel" else \
        InferConfig(square=320, scales=(0.7, 1.0), unflipped_scales=(1.0,))
    x = torch.randn(1, 3, 375, 500, generator=torch.Generator().manual_seed(1))
    one, both = msc_logits(net, x, cfg), msc_logits(net, x, cfg, batch_mirror=True)
    torch.testing.assert_close(both, one, rtol=0, atol=1e-6)
    assert torch.equal(both.argmax(1), one.argmax(1))


def test_device_crf_host_reads_do_not_grow_with_the_batch(data, model, tmp_path, monkeypatch):
    """CPU proxy for the GPU (``dispatch_count``): with the CRF on the device, 6 images in one CRF batch make
    as many host reads as 3 do (the finiteness, the CRF's lattice builds, one read of the labels), where
    the host path reads every image's probabilities and marginals back."""
    from dispatch_count import count

    d, ds = data
    cfg = CASES["crf"]
    run = lambda ids, k, out: predict_split(model, ds, ids, tmp_path / out, cfg, torch.device("cpu"), gt=True,  # noqa: E731
                                            progress=False, crf_batch=k)
    host3, _ = count(run, d["val_ids"][:3], 8, "h3")
    host6, _ = count(run, d["val_ids"], 8, "h6")
    monkeypatch.setattr(infer, "device_crf", lambda *a: True)
    three, _ = count(run, d["val_ids"][:3], 3, "d3")
    six, _ = count(run, d["val_ids"], 6, "d6")
    assert six.syncs == three.syncs, (three.sync_ops, six.sync_ops)
    assert host6.syncs >= host3.syncs + 3 * 2, (host3.sync_ops, host6.sync_ops)
