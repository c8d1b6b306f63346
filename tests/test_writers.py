"""One writer per output folder (issue 22 item 1): every stage holds an OS lock on its output folder for
the length of its run; a second run is refused naming the first one's pid and command; the kernel
drops the lock of a killed run (SIGKILL too); the processes of one torchrun run share it."""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.data import synthetic
from pipeline.io import FolderInUse, output_lock

ROOT = Path(__file__).resolve().parent.parent

# A process that holds the locks named on its command line ("folder" or "folder::lock file name") until killed.
HOLDER = textwrap.dedent("""
    import contextlib, sys, time
    sys.path.insert(0, sys.argv[1])
    from pipeline.io import output_lock
    with contextlib.ExitStack() as stack:
        for spec in sys.argv[2:]:
            folder, _, name = spec.partition("::")
            stack.enter_context(output_lock(folder, **({"name": name} if name else {})))
        print("holding", flush=True)
        time.sleep(600)
""")


def hold(*specs: str, env: dict | None = None) -> subprocess.Popen:
    """Start a holder process and wait until it holds every lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), *map(str, specs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    if line.strip() != "holding":
        proc.kill()
        raise AssertionError(f"holder failed: {line}{proc.stderr.read()}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers") / "VOC"
    ids = synthetic.make_scenes(root, 3, (32, 48), seed=2)
    synthetic.make_noisy_cams(root, root.parent / "cams", seed=2)
    return root, synthetic.split_file(root), ids


def test_a_second_run_is_refused_with_the_first_ones_pid_and_command(scenes, tmp_path):
    root, split, _ = scenes
    out = tmp_path / "viz"
    holder = hold(out)
    try:
        second = subprocess.run([sys.executable, "-m", "stages.viz", "--dataset", "voc", "--root", str(root),
                                 "--split", str(split), "--cams", str(root.parent / "cams"), "--pseudo", "none",
                                 "--out", str(out), "--no-progress", "-j", "1"],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        stop(holder)
    assert second.returncode == 2, second.stderr
    assert f"pid {holder.pid}" in second.stderr and "import contextlib, sys, time" in second.stderr  # its command
    assert second.stderr.startswith("error: ") and len(second.stderr.strip().splitlines()) == 1
    assert not any(p.suffix == ".png" for p in out.iterdir())  # the refused run wrote nothing


def test_a_killed_holder_leaves_no_stale_lock(scenes, tmp_path):
    from stages import viz

    root, split, ids = scenes
    out = tmp_path / "viz"
    holder = hold(out)
    with pytest.raises(FolderInUse, match=f"pid {holder.pid}"):
        with output_lock(out):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / ".lock").is_file()  # the file stays; the kernel dropped the lock with the process
    args = ["--dataset", "voc", "--root", str(root), "--split", str(split), "--cams", str(root.parent / "cams"),
            "--pseudo", "none", "--out", str(out), "--no-progress", "-j", "1"]
    assert viz.main(args) == 0
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)


def test_a_folder_made_for_a_refused_run_is_removed_again(tmp_path):
    out = tmp_path / "new" / "deeper"
    with pytest.raises(ValueError):
        with output_lock(out):
            raise ValueError("refused before writing")
    assert not (tmp_path / "new").exists()
    with output_lock(out):  # a folder that received outputs stays, with its lock file
        (out / "a.png").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "a.png"]


def test_processes_of_one_torchrun_run_share_the_lock_and_others_are_refused(tmp_path):
    run = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "run-a", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611"}
    rank0 = hold(tmp_path, env={**run, "RANK": "0"})
    try:
        rank1 = hold(tmp_path, env={**run, "RANK": "1"})  # joins: same run
        stop(rank0)
        other = {**run, "TORCHELASTIC_RUN_ID": "run-b", "RANK": "0"}
        proc = subprocess.run([sys.executable, "-c", HOLDER, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                              env={**os.environ, **other}, timeout=60)
        assert proc.returncode != 0 and "another run is writing" in proc.stderr  # rank 1 of run-a still writes
        assert f"pid {rank0.pid}" in proc.stderr  # the record names the run's first process
        stop(rank1)
    finally:
        stop(rank0)
    with output_lock(tmp_path):  # the whole run is gone: free
        pass


STAGES = ["cams", "cams-pseudo", "pseudo", "eval", "viz", "prompts", "export-mmseg", "predict", "eval-model", "train",
          "attributes", "demo"]


# Every stage that writes a folder: its arguments, and the lock it takes ("folder" or "folder::name").
def _stage_cases(root: Path, split: Path, clip: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    data = ["--dataset", "voc", "--root", str(root), "--split", str(split), "--no-progress"]
    out = tmp / "out"
    return {
        "cams": (["-m", "stages.cams", *data, "--clip", str(clip), "--out", str(out)], str(out)),
        "cams-pseudo": (["-m", "stages.cams", *data, "--clip", str(clip), "--pseudo-out", str(out), "--no-keep-cams"],
                        str(out)),
        "pseudo": (["-m", "stages.pseudo", *data, "--cams", str(tmp / "cams"), "--out", str(out)], str(out)),
        "eval": (["-m", "stages.eval", "--what", "pseudo", *data, "--pseudo", str(tmp / "p"), "--out", str(out)], str(out)),
        "viz": (["-m", "stages.viz", *data, "--out", str(out)], str(out)),
        "prompts": (["-m", "stages.prompts", *data, "--clip", str(clip), "--out", str(out)], str(out)),
        "export-mmseg": (["-m", "stages.export_mmseg", *data, "--out", str(out)], str(out)),
        "predict": (["-m", "stages.predict", "--checkpoint", str(clip), "--images", str(root / "JPEGImages"),
                     "--out", str(out)], str(out)),
        "eval-model": (["-m", "stages.evaluate_model", *data, "--checkpoint", str(clip), "--out", str(out)], str(out)),
        "train": (["-m", "stages.train", "--config", "configs/weclip_voc.yaml", "--root", str(root), "--split", str(split),
                   "--clip", str(clip), "--out", str(out)], str(out)),
        "attributes": (["-m", "stages.attributes", "--dataset", "voc", "--clip", str(clip), "--out", str(out / "a.npz")],
                       f"{out}::.a.npz.lock"),
        "demo": (["-m", "stages.demo", "--out", str(out)], str(out)),
    }


@pytest.fixture(scope="module")
def held(scenes, tiny_clip_path, tmp_path_factory):
    """One holder process locking the output folder of every stage case (each in its own folder)."""
    root, split, _ = scenes
    base = tmp_path_factory.mktemp("held")
    cases = {name: _stage_cases(root, split, tiny_clip_path, base / name)[name] for name in STAGES}
    holder = hold(*(spec for _, spec in cases.values()))
    yield holder, cases
    stop(holder)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_is_refused_while_another_run_holds_its_folder(held, stage, capsys):
    holder, cases = held
    args, spec = cases[stage]
    rc = importlib.import_module(args[1]).main(args[2:])
    err = capsys.readouterr().err
    assert rc == 2 and f"pid {holder.pid}" in err, (stage, err)
    folder = Path(spec.partition("::")[0])
    assert [p.name for p in folder.iterdir()] == [spec.partition("::")[2] or ".lock"]  # nothing else written


def test_the_lock_file_names_the_holder(tmp_path):
    with output_lock(tmp_path):
        doc = json.loads((tmp_path / ".lock").read_text())
        assert doc["pid"] == os.getpid() and "pytest" in doc["command"] and doc["run"] is None
        with output_lock(tmp_path):  # the same process again: re-entrant
            pass
    with output_lock(tmp_path):  # released
        pass


@pytest.mark.slow  # two torchrun processes (about 15 s)
def test_make_cams_nproc_2_shares_the_lock_and_prints_one_total(tmp_path, tiny_clip_path):
    from conftest import make_voc

    root = tmp_path / "VOC"
    split = make_voc(root, [(f"im{i}", (32, 48), ["cat"]) for i in range(4)] + [("bad", (32, 48), ["griffin"])])
    cmd = ["make", "-s", "-f", str(ROOT / "Makefile"), f"PY={sys.executable}", "cams", "NPROC=2", f"ROOT={root}",
           f"SPLIT={split}", f"CLIP={tiny_clip_path}", f"OUT={tmp_path / 'cams'}",
           "ARGS=--no-progress --workers 0 --device cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    totals = [line for line in proc.stdout.splitlines() if line.startswith("cams:")]
    assert totals == [totals[0]] and totals[0].startswith("cams: 4 written, 0 already done, 1 failed"), proc.stdout
    assert "failed bad:" in proc.stderr and "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert proc.returncode == 2  # make turns the stage's 1 (some images failed) into 2
    assert json.loads((tmp_path / "cams" / "manifest.json").read_text())["counts"] == {"images": 5, "written": 4,
                                                                                      "failed": 1}
