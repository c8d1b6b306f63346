"""make gpu-check's own logic on the CPU: the fp16 rows against their bounds, the time limits of the
benchmark sections, the stopped test run."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from benchmarks import gpu, gpu_check
from conftest import ROOT


def test_spread_rows_bound_each_statistic(tmp_path):
    ref = {"max_abs": 0.1, "mean_abs": 0.01, "min_pearson": 0.99, "maps": 5}
    ours = {"init": {"max_abs": 0.25, "mean_abs": 0.011, "min_pearson": 0.985, "maps": 5},
            "cams": {"max_abs": 0.1, "mean_abs": 0.03, "min_pearson": 0.999, "maps": 4}}
    margins = {"init": {"max_abs": 3.0, "mean_abs": 1.5, "one_minus_r": 2.0},
               "cams": {"max_abs": 3.0, "mean_abs": 1.5, "one_minus_r": 2.0}}
    (tmp_path / "fp16_spread.json").write_text(json.dumps(
        {"reference": {"init": ref, "cams": {**ref, "maps": 4}}, "ours": ours, "margins": margins}))
    rows = gpu_check.spread_rows(tmp_path)
    meets = {(r["what"].split(",")[1].split(":")[0].strip(), r["what"].split(": ")[1].split(" (")[0]): r["meets"]
             for r in rows}
    assert meets == {("GradCAM", "max |diff|"): "yes", ("GradCAM", "mean |diff|"): "yes",
                     ("GradCAM", "1 - min r"): "yes", ("refined", "max |diff|"): "yes",
                     ("refined", "mean |diff|"): "NO", ("refined", "1 - min r"): "yes"}
    assert rows[0]["floor"] == 0.1 * 3.0 and rows[2]["measured"] == 1 - 0.985
    assert gpu_check.spread_rows(tmp_path / "none") == []


def test_no_section_starts_after_the_deadline(tmp_path):
    said = []
    rows = gpu.collect(torch.device("cpu"), None, tmp_path, quick=True, sections=["crf", "eval"],
                       log=lambda *a, **_: said.append(a[0]), deadline=0.0)
    assert [r["what"] for r in rows] == ["crf", "eval"]
    assert all("time limit" in r["note"] for r in rows) and len(said) == 2


def test_a_test_run_past_its_limit_is_stopped(monkeypatch, tmp_path):
    def slow(*args, timeout, **kwargs):
        raise subprocess.TimeoutExpired(args[0], timeout)

    monkeypatch.setattr(gpu_check.subprocess, "run", slow)
    assert gpu_check.run_tests(torch.device("cpu"), tmp_path / "clip.pt", tmp_path, 1) == -1


def test_a_section_running_past_the_stop_ends_the_run_with_its_stacks(tmp_path):
    code = ("import sys, time, torch; from pathlib import Path; from benchmarks import gpu\n"
            "gpu.SECTIONS['stuck'] = lambda s: time.sleep(60) or []\n"
            "gpu.collect(torch.device('cpu'), None, Path(sys.argv[1]), quick=True, sections=['stuck'],"
            " stop=time.perf_counter() + 3)\n"
            "print('not stopped')\n")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "not stopped" not in proc.stdout
    assert "Timeout" in proc.stderr and "<lambda>" in proc.stderr       # where it hung
    assert time.perf_counter() - t < 30


def test_a_machine_short_of_a_package_is_told_before_anything_runs(monkeypatch, capsys):
    assert gpu_check.preflight() == []                      # this machine has everything

    def started(*args, **kwargs):
        raise AssertionError("the check started")

    monkeypatch.setattr(gpu_check, "MODULES", ("pytest", "no_such_package_xyz"))
    monkeypatch.setattr(gpu, "write_clip", started)
    assert gpu_check.main(["--device", "cpu", "--no-tests", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "python package no_such_package_xyz" in out and "python package pytest" not in out
