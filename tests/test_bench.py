"""The benchmarks' code, run at toy sizes (figures meaningless): `make bench ARGS=--quick` runs every part
with the flag, and the GPU rows of `make gpu-check` (``benchmarks.gpu``) run on the CPU, every row measured."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

# whole benchmark programs, even at toy sizes: about 20 s each on a quiet 2-core machine
pytestmark = pytest.mark.slow


def test_make_bench_quick_reaches_every_part():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "bench", f"PY={sys.executable}", "ARGS=--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    for part, figure in (("cams", "tiny ViT, 64x48 input"), ("pseudo", "2 synthetic images of 48x64"),
                         ("train", "deeplabv2-msc")):
        assert f"=== {part} (python -m benchmarks.{part} --quick)" in out and figure in out, part
    assert out.strip().splitlines()[-1].startswith("bench: cams ")


def test_gpu_rows_run_on_the_cpu(tmp_path, one_thread):
    from benchmarks import gpu

    rows = gpu.collect(torch.device("cpu"), None, tmp_path, quick=True, log=lambda *_, **__: None)
    assert [r["note"] for r in rows if str(r.get("note", "")).startswith("FAILED")] == []
    assert len(rows) == 2 + 2 + len(gpu.QUICK.crf_labels) + 2 + 3 + 1
    assert all(r["measured"] > 0 for r in rows)
    assert all(r["meets"] == ("-" if r["floor"] is None else "yes" if r["measured"] >= r["floor"] else "NO")
               for r in rows)
    assert "reference_point" in gpu.format_rows(rows).splitlines()[0]
