"""File contracts: an interrupted write never leaves a file at the final path, errors.json
disappears after a clean re-run, checkpoint pruning keeps the newest files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, make_voc
from pipeline import checkpoint as ckpt_io
from pipeline import io as pio
from pipeline.cams.stage import CamsConfig, run_cams


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_exception_inside_atomic_open_leaves_no_file(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with pytest.raises(RuntimeError, match="interrupted"):
        with pio.atomic_open(target) as f:
            f.write(b"half of the data")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_exception_inside_atomic_open_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old contents")
    with pytest.raises(KeyboardInterrupt):
        with pio.atomic_open(target) as f:
            f.write(b"new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old contents"


@pytest.mark.parametrize("old", [None, b"old contents"])
def test_sigkilled_writer_leaves_nothing_at_the_final_path(tmp_path, old):
    """A process killed mid-write (no exception handler runs) must not leave a partial file."""
    target = tmp_path / "out.npz"
    if old is not None:
        target.write_bytes(old)
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pipeline.io import atomic_open
        with atomic_open({str(target)!r}) as f:
            f.write(b"x" * 100000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    if old is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == old


@pytest.mark.parametrize("write", [
    lambda p: pio.write_bytes(p, b"new" * 1000),
    lambda p: pio.write_json(p, {"new": list(range(100))}),
    lambda p: pio.save_npz(p, {"a": np.arange(1000)}),
], ids=["write_bytes", "write_json", "save_npz"])
def test_writers_commit_only_after_the_data_is_on_disk(tmp_path, monkeypatch, write):
    """A failure before the commit (here: the flush to disk) keeps the old file and removes the temp."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old contents")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pio.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write(target)
    assert target.read_bytes() == b"old contents"
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    write(target)
    assert target.read_bytes() != b"old contents" and _leftovers(tmp_path) == []


def test_write_errors_removes_a_stale_errors_file(tmp_path):
    pio.write_errors(tmp_path, {"b": "broken", "a": "also broken"})
    assert json.loads((tmp_path / "errors.json").read_text()) == {"a": "also broken", "b": "broken"}
    pio.write_errors(tmp_path, {})
    assert not (tmp_path / "errors.json").exists()
    pio.write_errors(tmp_path, {})  # nothing to remove is fine too
    assert not (tmp_path / "errors.json").exists()


def test_clean_rerun_of_the_cam_stage_removes_errors_json(tmp_path, tiny_clip_path):
    root = tmp_path / "VOC"
    split = make_voc(root, [("good", (32, 48), ["cat"]), ("bad", (32, 48), ["dog"])])
    image = root / "JPEGImages" / "bad.jpg"
    fine = image.read_bytes()
    image.write_bytes(fine[: len(fine) // 3])
    cfg = CamsConfig(dataset="voc", root=str(root), split=str(split), clip=str(tiny_clip_path),
                     out=str(tmp_path / "cams"), workers=0, progress=False)
    assert run_cams(cfg).failed == 1
    assert set(json.loads((tmp_path / "cams" / "errors.json").read_text())) == {"bad"}
    image.write_bytes(fine)  # the user repairs the file and re-runs
    s = run_cams(cfg)
    assert (s.written, s.failed) == (1, 0)
    assert not (tmp_path / "cams" / "errors.json").exists()


@pytest.mark.parametrize("keep", [1, 3])
def test_checkpoint_pruning_keeps_the_newest(tmp_path, keep):
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    steps = [5, 1200, 40, 999999, 300, 10000]
    for i, step in enumerate(steps):  # created out of order, with mtimes unrelated to the iteration
        f = ckdir / f"iter_{step:07d}.pt"
        f.write_bytes(b"ckpt")
        os.utime(f, (1_000_000 + 10 * i, 1_000_000 + 10 * (len(steps) - i)))
    (ckdir / "notes.txt").write_text("not a checkpoint")
    ckpt_io.write_latest(ckdir, f"iter_{max(steps):07d}.pt", max(steps))
    ckpt_io.prune(ckdir, keep)
    kept = sorted(int(p.stem.removeprefix("iter_")) for p in ckdir.glob("iter_*.pt"))
    assert kept == sorted(steps)[-keep:]
    assert (ckdir / "notes.txt").exists()
    assert ckpt_io.resolve(tmp_path).exists()  # the file latest.json names survives, so --resume finds it


def test_checkpoint_pruning_with_keep_0_keeps_everything(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"iter_{step:07d}.pt").write_bytes(b"ckpt")
    ckpt_io.prune(tmp_path, 0)
    assert len(list(tmp_path.glob("iter_*.pt"))) == 3
