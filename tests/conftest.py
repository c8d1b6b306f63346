"""Shared fixtures: tiny random CLIPs written to disk in OpenAI's formats, small VOC-layout folders."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pipeline.clip.random import TINY, random_clip, save_clip  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op torch thread: tests of many small tensor ops (PAR, CRF lattices, test-sized convolutions)
    slow down 10-20x when OpenMP threads spin on a busy 2-core machine. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def strict_device():
    """``with strict_device():`` makes every tensor created without ``device=`` land on 'meta', and makes any
    operation whose tensor arguments (other than 0-dim scalars and copies) sit on different devices raise, so
    code that should follow its inputs' device but makes or keeps a tensor elsewhere fails on CPU inputs, the
    same way it would fail with CUDA inputs (matmul, gather and indexing alone would not raise on meta + cpu).
    Build models before entering."""
    import torch

    from device_check import one_device

    @contextlib.contextmanager
    def ctx():
        # the device as a context restores the state exactly; set_default_device(cpu) afterwards would
        # leave a device mode installed that changes how later tests run (autograd.grad re-enters itself)
        with torch.device("meta"), one_device():
            yield

    return ctx


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> Path:
    """A tiny random CLIP ViT saved as an OpenAI-style TorchScript archive (fp16 weights)."""
    return save_clip(random_clip(TINY, seed=3), tmp_path_factory.mktemp("clip") / "tiny-ViT.pt")


def write_voc_xml(path: Path, names: list[str], size: tuple[int, int]) -> None:
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>"
                    f"{objs}</annotation>")


def textured_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (3 + c) + yy * (5 - c)) % 256 for c in range(3)], -1)
    return np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def make_voc(root: Path, items: list[tuple[str, tuple[int, int], list[str]]], split: str = "demo") -> Path:
    """VOC layout with JPEG images of the given sizes and annotations; writes ImageSets list ``split``."""
    for i, (image_id, size, names) in enumerate(items):
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(textured_image(*size, seed=i)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
        write_voc_xml(root / "Annotations" / f"{image_id}.xml", names, size)
    lst = root / f"{split}.txt"
    lst.write_text("".join(f"{image_id}\n" for image_id, _, _ in items))
    return lst


@pytest.fixture
def voc_small(tmp_path) -> tuple[Path, Path]:
    """Six images, two sizes, 1-3 labels each; returns (root, split list)."""
    items = [(f"2007_00000{i}", (96, 128) if i % 2 else (80, 112), names) for i, names in enumerate(
        [["person"], ["cat", "dog"], ["person", "chair", "person"], ["bird"], ["car", "bus", "train"], ["tvmonitor"]])]
    root = tmp_path / "VOC2012"
    return root, make_voc(root, items)
