"""make bench: every benchmark part in turn, each part's time printed after it.

    python -m benchmarks                       # cams, pseudo, train (+ gpu on a CUDA machine): ~10 min on 2 cores
    python -m benchmarks --quick               # every part at toy sizes: checks the code (a test runs it)
    python -m benchmarks --parts pseudo --n 4 --agreement 0     # one part, with that part's own flags

Flags other than --parts go to every part run (``--quick`` is understood by all; a flag only some parts know needs
``--parts`` naming that part). Parts: cams (``benchmarks.cams``), pseudo (``benchmarks.pseudo``), train
(``benchmarks.train``), gpu (``benchmarks.gpu``, the GPU rows; by default only where CUDA is available).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

PARTS = ("cams", "pseudo", "train", "gpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {', '.join(PARTS)}")
    a, rest = p.parse_known_args(argv)
    if a.parts:
        parts = a.parts.split(",")
        unknown = [x for x in parts if x not in PARTS]
        if unknown:
            p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    else:
        import torch

        parts = [x for x in PARTS if x != "gpu" or torch.cuda.is_available()]
    times, rc = [], 0
    for name in parts:
        print(f"\n=== {name} (python -m benchmarks.{name} {' '.join(rest)})", flush=True)
        start = time.perf_counter()
        rc = importlib.import_module(f"benchmarks.{name}").main(rest) or rc
        times.append(f"{name} {time.perf_counter() - start:.0f} s")
    print(f"\nbench: {', '.join(times)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
