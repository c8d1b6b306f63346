"""torchrun for the Makefile's NPROC=N (make cams, make train): the same flags, but a failed run ends
with its processes' own error line and exit status instead of torchrun's failure report (a traceback).

    python -m stages.launch --standalone --nproc_per_node 2 -m stages.cams ...
"""
from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the others were stopped because of it
        if failure.exitcode >= 0:
            return failure.exitcode  # the process printed its own error line
        name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else "a signal"
        print(f"error: process of rank {rank} (pid {failure.pid}) was killed by {name}", file=sys.stderr)
        return 128 - failure.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main())
