"""make gpu-check: the GPU tests (tests/test_gpu.py), then the GPU rows of the benchmarks (benchmarks.gpu),
then one table: every figure with its floor and peak memory, and the fp16 CAM spread the tests measured.

    python -m benchmarks.gpu_check            # on a CUDA machine; elsewhere it says so and exits 0
    python -m benchmarks.gpu_check --no-tests --quick --device cpu    # checks this code on a CPU

One random CLIP of the ViT-B/16 shapes is written once for the tests and the benchmarks. Exit status: 1
when a GPU test fails, else 0 (a figure below its floor is marked NO in the table, not an error).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import gpu

ROOT = Path(__file__).resolve().parent.parent


def spread_rows(report: Path) -> list[dict]:
    """The fp16 figures ``tests/test_gpu.py`` wrote: ours vs the reference's own spread, times the margin."""
    path = report / "fp16_spread.json"
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    rows = []
    for kind, label in (("init", "GradCAM"), ("cams", "refined, same boxes")):
        o, r = d["ours"][kind], d["reference"][kind]
        rows.append({"what": f"fp16 vs float32 CAMs, {label}: max |diff|", "measured": o["max_abs"],
                     "unit": "", "floor": d["margin"] * r["max_abs"],
                     "meets": "yes" if o["max_abs"] <= d["margin"] * r["max_abs"] else "NO",
                     "reference_point": f"reference {r['max_abs']:.4f}",
                     "note": f"floor = {d['margin']}x the reference's; mean |diff| {o['mean_abs']:.5f} "
                             f"(ref {r['mean_abs']:.5f}), min r {o['min_pearson']:.5f} (ref {r['min_pearson']:.5f})"})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (benchmarks.gpu --quick)")
    p.add_argument("--no-tests", action="store_true", help="only the benchmark rows")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device on this machine (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda or 'none'}); nothing to check. Run it on a machine with a GPU.")
        return 0
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu-check on {name}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        clip = gpu.write_clip(gpu.QUICK.arch if a.quick else gpu.FULL.arch, work / "ViT-B-16-random.pt")
        tests_rc = 0
        if not a.no_tests:
            env = dict(os.environ, CLIP_WSSS_GPU_CLIP=str(clip), CLIP_WSSS_GPU_REPORT=str(work),
                       CLIP_WSSS_TEST_DEVICE=str(device))
            t = time.perf_counter()
            tests_rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       "tests/test_gpu.py"], cwd=ROOT, env=env).returncode
            print(f"  [tests: {time.perf_counter() - t:.0f} s]")
        print("benchmark rows:", flush=True)
        (work / "bench").mkdir()
        rows = gpu.collect(device, clip, work / "bench", a.quick) + spread_rows(work)
    print()
    print(gpu.format_rows(rows))
    tests = "skipped" if a.no_tests else ("passed" if tests_rc == 0 else f"FAILED (pytest exit {tests_rc})")
    below = [r["what"] for r in rows if r.get("meets") == "NO"]
    failed = [r["what"] for r in rows if str(r.get("note", "")).startswith("FAILED")]
    print(f"\ntests/test_gpu.py: {tests}; {len(below)} figure(s) below the floor, {len(failed)} row(s) failed; "
          f"{time.perf_counter() - start:.0f} s in all")
    return 1 if tests_rc else 0


if __name__ == "__main__":
    sys.exit(main())
